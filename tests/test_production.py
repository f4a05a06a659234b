"""The winner as a production config, from committed reports (docs/) and small edits of them."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.__main__ import main
from pytest_llamabench.config import load_matrix
from pytest_llamabench.errors import ConfigError
from pytest_llamabench.outputs.production import production_config, verdict_of, winner_footer
from pytest_llamabench.results import RunReport

REPO = Path(__file__).resolve().parent.parent
GPU_REPORT = REPO / "docs" / "gpu-run" / "synthetic-matrix-16GiB.json"  # C7 won on an H100, 16 GiB budget
CPU_REPORT = REPO / "docs" / "default-run" / "report.json"  # the main job: a tie within noise


def _data(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _report(data: dict[str, Any], source: str = "report.json") -> RunReport:
    return RunReport.from_dict(data, source=source)


def _args_of(data: dict[str, Any], config: str) -> list[str]:
    return next(r["server"]["args"] for r in data["results"] if r["config"] == config and r.get("server"))


def test_the_winner_command_is_the_benchmarked_argv() -> None:
    data = _data(GPU_REPORT)
    production = production_config(_report(data))
    assert production.config == "C7"
    argv = shlex.split(production.cmd())
    assert argv[0] == data["binary"]["path"]
    assert argv[1:7] == ["--model", data["fingerprint"]["models"]["Qwen3-30B-A3B-synthetic-Q4_K_M.gguf"]["path"],
                         "--host", "127.0.0.1", "--port", "8080"]  # fmt: skip
    assert argv[7:] == _args_of(data, "C7")  # exactly what the launcher passed: --n-cpu-moe 24, KV q8_0, ...
    lines = production.rationale.lines()
    assert "short 72.3" in lines[0] and "multi-turn 68.8" in lines[0]
    assert "VRAM 13412 MiB of 16384 MiB budget (82%)" in lines[1]
    assert lines[2] == "margin over C5: ×1.79"
    assert lines[-1].startswith("WINNER: C7 beats C5")


def test_the_toml_is_a_matrix_that_measures_the_same_server_again(tmp_path: Path) -> None:
    data = _data(GPU_REPORT)
    toml = production_config(_report(data)).render("toml")
    (tmp_path / "winner.toml").write_text(toml)
    (tmp_path / "workloads.toml").write_text("[workloads.short]\nprompt_tokens = 8\nn_predict = 8\n")
    matrix = load_matrix([tmp_path / "winner.toml", tmp_path / "workloads.toml"])
    config = matrix.configs["C7"]
    assert config.gpu
    assert config.server_args() == _args_of(data, "C7")
    assert str(config.model.resolve()).endswith("Qwen3-30B-A3B-synthetic-Q4_K_M.gguf")


def test_a_tie_names_no_winner_and_says_how_to_pick_one() -> None:
    report = _report(_data(CPU_REPORT), "docs/default-run/report.json")
    verdict = report.extra["winner"]  # the committed main-job run ended in a tie
    assert verdict["winner"] is None and verdict["runner_up"], verdict
    with pytest.raises(ConfigError) as info:
        production_config(report)
    assert f"tie within noise: {verdict['best']} ≈ {verdict['runner_up']}" in info.value.message
    assert f"--config {verdict['best']}" in info.value.message
    best = production_config(report, verdict["best"])  # either of the tied pair, by hand
    assert best.rationale.lines()[-1].startswith("tie within noise")
    chosen = production_config(report, "kv-q8")
    assert "--cache-type-k q8_0" in chosen.cmd() and "tie within noise" in chosen.rationale.lines()[-1]
    assert winner_footer(report, dict(report.extra["winner"])) == ""  # no winner: no footer


def test_an_unknown_or_never_started_config_is_a_clear_error() -> None:
    report = _report(_data(GPU_REPORT))
    with pytest.raises(ConfigError, match="no results for config 'C9'; configs in this report: C1, C2"):
        production_config(report, "C9")
    with pytest.raises(ConfigError, match="config C2 measured nothing .*xfailed"):
        production_config(report, "C2")  # an expected OOM: its server never ran


def _container_report(tmp_path: Path) -> RunReport:
    """The GPU report as if C7 had run in a container (what container.py's describe() records)."""
    data = copy.deepcopy(_data(GPU_REPORT))
    for result in data["results"]:
        if result["config"] == "C7":
            result["server"].update(launcher="docker", image="ghcr.io/ggml-org/llama.cpp:server-cuda",
                                    image_id="sha256:" + "1" * 64, image_digest="sha256:" + "2" * 64,
                                    memory_limit=8 * 2**30, gpu=True,
                                    env={"LLAMA_API_KEY": "***", "GGML_CUDA_NO_PINNED": "1"})  # fmt: skip
    return _report(data)


def test_a_container_config_gives_docker_run_and_compose(tmp_path: Path) -> None:
    production = production_config(_container_report(tmp_path))
    docker = shlex.split(production.docker())
    image = "ghcr.io/ggml-org/llama.cpp@sha256:" + "2" * 64  # the registry digest that ran, not the tag
    assert docker[:2] == ["docker", "run"]
    assert ["-p", "127.0.0.1:8080:8080"] == docker[docker.index("-p"):docker.index("-p") + 2]
    assert "/root/.cache/pytest-llamabench/synthetic-models:/models:ro" in docker
    assert "--gpus" in docker and "all" in docker
    assert ["--memory", f"{8 * 2**30}b"] == docker[docker.index("--memory"):docker.index("--memory") + 2]
    assert "LLAMA_API_KEY=***" in docker  # the secret itself is never in a report
    tail = docker[docker.index(image) + 1:]
    assert tail[:6] == ["--model", "/models/Qwen3-30B-A3B-synthetic-Q4_K_M.gguf", "--host", "0.0.0.0", "--port", "8080"]
    compose = production.render("compose")
    assert f'image: "{image}"' in compose
    assert 'ports: ["127.0.0.1:8080:8080"]' in compose
    assert "capabilities: [gpu]" in compose
    assert json.loads(compose.split("command: ", 1)[1].splitlines()[0]) == tail
    assert production.as_dict()["docker"] == production.docker()


def test_docker_formats_of_a_process_config_say_why_not() -> None:
    production = production_config(_report(_data(GPU_REPORT)))
    for fmt in ("docker", "compose"):
        with pytest.raises(ConfigError, match="ran as a local process, not in a container.*use --format cmd"):
            production.render(fmt)


def test_a_locally_built_image_keeps_its_tag(tmp_path: Path) -> None:
    data = copy.deepcopy(_data(GPU_REPORT))
    for result in data["results"]:
        if result["config"] == "C7":
            digest = "sha256:" + "3" * 64  # a local image has only its ID as "digest"
            result["server"].update(image="pytest-llamabench/llama-server:local", image_id=digest, image_digest=digest)
    assert production_config(_report(data)).image == "pytest-llamabench/llama-server:local"


def test_the_quality_verdict_of_the_winners_model_is_in_the_rationale() -> None:
    data = copy.deepcopy(_data(GPU_REPORT))
    data["quality"] = [
        {"config": "q8", "model_file": "Qwen3-30B-A3B-synthetic-Q8_0.gguf", "verdict": "Reference", "ppl": 6.5342},
        {"config": "q4", "model_file": "Qwen3-30B-A3B-synthetic-Q4_K_M.gguf", "verdict": "RECOMMENDED",
         "ppl": 6.6688, "increase_pct": 2.06, "kld_mean": 0.0123},
    ]  # fmt: skip
    production = production_config(_report(data))
    assert production.rationale.quality == "RECOMMENDED (ppl 6.669, increase_pct 2.06, kld_mean 0.0123)"
    assert "quality: RECOMMENDED" in production.footer()


def test_the_footer_and_the_json_carry_the_production_config() -> None:
    report = _report(_data(GPU_REPORT))
    verdict = verdict_of(report)  # this older report has no verdict of its own: decided from its results
    text = winner_footer(report, verdict)
    assert "production config (C7): " in text and "--n-cpu-moe 24" in text
    assert verdict["production"]["argv"][7:] == _args_of(_data(GPU_REPORT), "C7")
    assert verdict["production"]["rationale"]["vram_budget_mib"] == 16384
    markdown = winner_footer(report, verdict_of(report), markdown=True)
    assert "**Production config: C7**" in markdown and "```bash\n" in markdown


def test_secrets_in_args_and_env_stay_redacted() -> None:
    data = copy.deepcopy(_data(GPU_REPORT))
    for result in data["results"]:
        if result["config"] == "C7":
            result["server"]["args"] += ["--api-key", "***"]
            result["server"]["env"] = {"HF_TOKEN": "hf_secret", "CUDA_VISIBLE_DEVICES": "0"}
    cmd = production_config(_report(data)).cmd()
    assert "hf_secret" not in cmd and "HF_TOKEN='***'" in cmd and "CUDA_VISIBLE_DEVICES=0" in cmd
    assert "--api-key '***'" in cmd


def test_cli_winner_formats_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["winner", str(GPU_REPORT)]) == 0
    assert "--n-cpu-moe 24" in capsys.readouterr().out
    assert main(["winner", str(GPU_REPORT), "--format", "toml"]) == 0
    assert "[configs.C7]" in capsys.readouterr().out
    assert main(["winner", str(CPU_REPORT)]) == 2
    assert "pick a config yourself with --config NAME" in capsys.readouterr().err
    assert main(["winner", str(tmp_path / "missing.json")]) == 2
    assert "no such report" in capsys.readouterr().err
