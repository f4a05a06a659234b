"""Vision, chat templates and thinking against the real llama-server (embedded SmolLM2-135M)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.errors import ChatTemplateError, ConfigError, ModelLoadError, UnsupportedArchitecture
from pytest_llamabench.measure.workload import run_workload
from pytest_llamabench.model.synth.projector import PROJECTOR_SHAPES, write_synthetic_projector
from pytest_llamabench.model.synth.writer import gguf_file
from pytest_llamabench.server.launcher import LocalServer
from tests.matrices import load_text

REPO = Path(__file__).resolve().parent.parent
QWEN35_TEMPLATE = REPO / "configs/templates/qwen3.5.jinja"


@pytest.fixture(scope="module")
def vlm_model_path() -> Path:
    """SmolLM2-135M with SmolVLM's image tokens: the text model of the (synthetic) SmolVLM projector."""
    from pytest_llamabench.model.files import embedded_model_path

    return embedded_model_path("smollm2-135m-instruct-q4_1-vlm-tokens")


def _config(tmp_path: Path, model_path: Path, *, model_extra: str = "", config_extra: str = "") -> ServerConfig:
    head = f'[models.m]\npath = "{model_path}"\n{model_extra}\n[defaults]\nmodel = "m"\nthreads = 2\nctx = 2048\n'
    return load_text(tmp_path, f"[configs.c]\n{config_extra}\n", head=head).configs["c"]


@pytest.fixture
def start(server_bin: Path, tmp_path: Path) -> Iterator[Callable[[ServerConfig], LocalServer]]:
    servers: list[LocalServer] = []

    def launch(config: ServerConfig) -> LocalServer:
        server = LocalServer(config, binary=server_bin, log_dir=tmp_path / "logs")
        servers.append(server)
        server.start()
        return server

    yield launch
    for server in servers:
        server.stop()


# -- vision ---------------------------------------------------------------------------------------


def test_images_go_through_the_real_multimodal_path(start: Callable[[ServerConfig], LocalServer], tmp_path: Path,
                                                     vlm_model_path: Path) -> None:  # fmt: skip
    server = start(_config(tmp_path, vlm_model_path, model_extra='mmproj = "synth:tiny"'))
    assert server.projector is not None and server.projector.projector_type == "idefics3"
    assert "--mmproj" in server.args and server.props.get("modalities", {}).get("vision") is True
    workload = Workload("v", kind="vision", prompt_tokens=8, n_predict=8, repetitions=2, warmup=0, images=2,
                        image_size=64)  # fmt: skip
    m = run_workload(server, workload)
    metrics = m.metrics()
    assert all(s.predicted_n == 8 for s in m.samples)
    # 2 images of 64 px: one 4x4-patch tile each, shuffled to 4 tokens, plus the markers around them
    assert all(s.prompt_n > 8 + 2 * PROJECTOR_SHAPES["tiny"].tokens_per_tile for s in m.samples)
    assert len(metrics["image_encode_ms"].samples) == 2 and metrics["image_encode_ms"].median > 0  # type: ignore[operator]
    assert m.facts["mmproj"]["projector_type"] == "idefics3" and m.facts["images"]["count"] == 2
    assert m.facts["sampling"]["temperature"] == 0.0


def test_a_vision_workload_without_mmproj_is_a_config_error(start: Callable[[ServerConfig], LocalServer],
                                                            tmp_path: Path, model_path: Path) -> None:  # fmt: skip
    server = start(_config(tmp_path, model_path))
    with pytest.raises(ConfigError, match=r"kind = \"vision\" needs a vision projector.*set mmproj"):
        run_workload(server, Workload("v", kind="vision", n_predict=4, repetitions=1, warmup=0, image_size=64))


def test_an_mmproj_for_another_model_fails_before_launch(server_bin: Path, tmp_path: Path, vlm_model_path: Path) -> None:
    wrong = write_synthetic_projector(PROJECTOR_SHAPES["tiny"], tmp_path / "mmproj-qwen.gguf", projection_dim=2048)
    server = LocalServer(_config(tmp_path, vlm_model_path, model_extra=f'mmproj = "{wrong}"'), binary=server_bin,
                         log_dir=tmp_path / "logs")  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"models\.m\.mmproj: .*2048-wide.*576 wide.*another model"):
        server.start()
    assert not server.log_path.exists()  # refused before any server started


# -- architecture -----------------------------------------------------------------------------------


def test_the_pinned_build_knows_qwen35moe_and_refuses_what_it_does_not(server_bin: Path, tmp_path: Path,
                                                                      model_path: Path) -> None:  # fmt: skip
    from pytest_llamabench.server.arch import build_knows_architecture

    assert build_knows_architecture(server_bin, "qwen35moe") is True  # the seed's "Docker image supports qwen35moe"
    assert build_knows_architecture(server_bin, "llama") is True
    assert build_knows_architecture(server_bin, "qwen99moe") is False
    import numpy as np

    path = tmp_path / "future.gguf"  # a model of an architecture this build has never heard of
    with gguf_file(path, "qwen99moe") as writer:
        writer.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))
    server = LocalServer(_config(tmp_path, path), binary=server_bin, log_dir=tmp_path / "logs")
    with pytest.raises(UnsupportedArchitecture, match=r"does not know architecture 'qwen99moe'.*build-server --sdist"):
        server.start()
    assert not server.log_path.exists()


# -- chat templates -----------------------------------------------------------------------------------


def test_the_template_check_reports_match_and_diff(start: Callable[[ServerConfig], LocalServer], tmp_path: Path,
                                                   model_path: Path) -> None:  # fmt: skip
    workload = Workload("t", kind="template", prompt_tokens=8, n_predict=4, repetitions=1, warmup=0)
    own = run_workload(start(_config(tmp_path, model_path)), workload).facts["template_check"]
    assert own["match"] is True and own["diff"] == ""
    explicit = start(_config(tmp_path, model_path, config_extra=f'chat_template = "file:{QWEN35_TEMPLATE}"'))
    check = run_workload(explicit, workload).facts["template_check"]
    assert check["match"] is False and check["template"] == f"file:{QWEN35_TEMPLATE}"
    assert "+<think>" in check["diff"]  # Qwen3.5's template opens a thinking block; SmolLM2's does not
    assert check["gguf_sha256"] == own["rendered_sha256"]  # the reference server rendered the GGUF's template


def test_a_template_file_that_does_not_parse_is_one_clear_error(server_bin: Path, tmp_path: Path,
                                                               model_path: Path) -> None:  # fmt: skip
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }")
    config = _config(tmp_path, model_path, config_extra=f'chat_template = "file:{broken}"')
    server = LocalServer(config, binary=server_bin, log_dir=tmp_path / "logs")
    with pytest.raises(ChatTemplateError, match=rf"chat template .*{broken.name}.* does not parse.*chat_template"):
        server.start()


# -- thinking and sampling ------------------------------------------------------------------------------


def test_thinking_on_a_model_without_a_reasoning_template_is_one_clear_error(
    start: Callable[[ServerConfig], LocalServer], tmp_path: Path, model_path: Path
) -> None:
    server = start(_config(tmp_path, model_path))
    workload = Workload("think", kind="chat", turns=1, n_predict=4, repetitions=1, warmup=0, thinking="on",
                        source="m.toml:workloads.think")  # fmt: skip
    with pytest.raises(ConfigError, match=r"workloads\.think\.thinking: \"on\", but the GGUF's chat template .*no "
                                          r"thinking switch"):  # fmt: skip
        run_workload(server, workload)


def test_reasoning_and_answer_tokens_are_split_and_the_used_sampling_recorded(
    start: Callable[[ServerConfig], LocalServer], tmp_path: Path, model_path: Path
) -> None:
    server = start(_config(tmp_path, model_path, config_extra=f'chat_template = "file:{QWEN35_TEMPLATE}"'))
    sampling = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "presence_penalty": 0.5}
    workload = Workload("think", kind="chat", turns=1, prompt_tokens=16, n_predict=24, repetitions=2, warmup=0,
                        thinking="on", reasoning_budget=6, sampling=sampling)  # fmt: skip
    m = run_workload(server, workload)
    for s in m.samples:
        assert s.predicted_n == 24
        assert s.reasoning_tokens >= 1 and s.answer_tokens >= 1  # type: ignore[attr-defined]
        assert s.reasoning_tokens + s.answer_tokens <= 24  # type: ignore[attr-defined]
    used = m.facts["sampling"]
    assert (used["temperature"], used["top_k"], used["presence_penalty"]) == pytest.approx((0.6, 20, 0.5))
    assert used["top_p"] == pytest.approx(0.95) and used["reasoning_format"] == "deepseek"
    off = run_workload(server, dataclasses.replace(workload, thinking="off", reasoning_budget=None))
    assert all(s.reasoning_tokens == 0 for s in off.samples)  # type: ignore[attr-defined]


# -- through the plugin ------------------------------------------------------------------------------------


def test_the_report_carries_the_details_and_vision_runs_only_where_there_is_mmproj(
    pytester: pytest.Pytester, write_matrix: Callable[..., Path], bench_args: Callable[[Path], list[str]],
    tmp_path: Path,
) -> None:
    from tests.conftest import MATRIX_TEST

    matrix = write_matrix(
        textwrap.dedent("""
            [models.vlm]
            embedded = "smollm2-135m-instruct-q4_1-vlm-tokens"
            mmproj = "synth:tiny"

            [configs.text]

            [configs.vlm]
            model = "vlm"
            """),
        workloads=textwrap.dedent("""
            [workloads.see]
            kind = "vision"
            prompt_tokens = 8
            n_predict = 4
            image_size = 64
            repetitions = 1
            warmup = 0

            [workloads.chat]
            kind = "chat"
            turns = 1
            prompt_tokens = 8
            n_predict = 4
            repetitions = 1
            warmup = 0
            temperature = 0.5
            """),
    )
    pytester.makepyfile(test_bench=MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(passed=3, deselected=1)  # text x see is not run
    report = json.loads((tmp_path / "report.json").read_text())
    entries = {f'{e["config"]}-{e["workload"]}': e for e in report["results"]}
    assert set(entries) == {"text-chat", "vlm-chat", "vlm-see"}
    assert entries["vlm-see"]["details"]["mmproj"]["projector_type"] == "idefics3"
    assert "image_encode_ms" in entries["vlm-see"]["metrics"]
    assert entries["text-chat"]["details"]["sampling"]["temperature"] == pytest.approx(0.5)
