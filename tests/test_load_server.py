"""Concurrent load against the real llama-server: closed and open loop, the checks, the errors
before sending, and the plugin's throughput-vs-latency table and report."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.config import ServerConfig, Workload, load_matrix
from pytest_llamabench.config_load import LoadLevel, Slo
from pytest_llamabench.errors import ConfigError, MeasurementInvalid
from pytest_llamabench.measure.load import LoadSample
from pytest_llamabench.measure.workload import run_workload
from pytest_llamabench.server.launcher import LocalServer, Server
from pytest_llamabench.server.stream_async import AsyncStreams

from .conftest import MATRIX_TEST

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerConfig:
    path = tmp_path_factory.mktemp("m") / "m.toml"
    path.write_text(f'[models.m]\npath = "{model_path}"\n[defaults]\nmodel = "m"\nthreads = 2\n'
                    "[configs.np4]\nparallel = 4\nctx = 1024\n")  # fmt: skip
    return load_matrix([path]).configs["np4"]


@pytest.fixture(scope="module")
def server(config: ServerConfig, server_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with LocalServer(config, binary=server_bin, log_dir=tmp_path_factory.mktemp("logs")) as srv:
        yield srv


def level_workload(prompt: int = 16, n: int = 16, **load: Any) -> Workload:
    level = LoadLevel("load", **{"requests": 8, **load})
    return Workload(f"load-{level.suffix}", kind="load", prompt_tokens=prompt, n_predict=n, repetitions=2, warmup=0,
                    load=level)  # fmt: skip


def samples(server: Server, workload: Workload) -> list[LoadSample]:
    out = run_workload(server, workload).samples
    assert all(isinstance(s, LoadSample) for s in out)
    return out  # type: ignore[return-value]


def test_closed_loop_runs_the_streams_at_once_with_exact_work(server: LocalServer) -> None:
    got = samples(server, level_workload(concurrency=4, slo=Slo(ttft_ms=600000, itl_ms=600000)))
    assert len(got) == 2
    for s in got:
        assert len(s.requests) == 8 and s.predicted_n == 8 * 16 and s.prompt_n == 8 * 16 and s.cache_n == 0
        assert all(r["predicted_n"] == 16 for r in s.requests)
        assert s.agg_tok_s > 0 and s.req_s > 0
        assert s.goodput_pct == 100  # an SLO nobody can miss
    # the server really ran requests side by side: seen by the client (requests generating at
    # once) and by the server (busy slots in /slots)
    assert max(s.gen_overlap_max for s in got) >= 2
    assert max(s.slots_busy_max or 0 for s in got) >= 2


def test_busy_slots_come_from_metrics_when_the_server_has_them(config: ServerConfig, server_bin: Path, tmp_path: Path) -> None:
    with LocalServer(dataclasses.replace(config, args=("--metrics",)), binary=server_bin, log_dir=tmp_path) as srv:
        assert srv.props.get("endpoint_metrics") is True
        got = samples(srv, level_workload(concurrency=2, requests=4))
    assert max(s.slots_busy_max or 0 for s in got) >= 1  # llamacpp:requests_processing, read while they ran


def test_open_loop_sends_at_poisson_arrivals(server: LocalServer) -> None:
    got = samples(server, level_workload(rate=20.0, requests=6, seed=3))
    starts = [[r["sent_s"] for r in s.requests] for s in got]
    assert all(len(st) == 6 and st[0] == pytest.approx(0, abs=0.05) for st in starts)
    assert starts[0] != starts[1]  # each repetition its own arrivals
    assert all(s.predicted_n == 6 * 16 and s.cache_n == 0 for s in got)


def test_a_shared_prompt_uses_the_cache_only_when_asked(server: LocalServer) -> None:
    got = samples(server, level_workload(prompt=32, concurrency=2, requests=6, share_prompt=True))
    assert sum(s.cache_n for s in got) > 0  # later requests reused the shared prompt
    assert all(s.prompt_n + s.cache_n == 6 * 32 for s in got)


def test_more_streams_than_slots_is_one_error_before_sending(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[object] = []
    real = AsyncStreams.completion

    async def spy(self: AsyncStreams, path: str, payload: Any) -> Any:  # counts, then the real request
        sent.append(payload)
        return await real(self, path, payload)

    monkeypatch.setattr(AsyncStreams, "completion", spy)
    with pytest.raises(ConfigError) as info:
        run_workload(server, level_workload(concurrency=8))
    message = str(info.value)
    assert message.startswith("np4/load-c8: 8 concurrent streams, but the server has 4 slot(s) (parallel = 4 in ")
    assert "set parallel >= 8 in that config" in message and not sent


def test_too_little_context_per_slot_is_one_error(server: LocalServer) -> None:
    # ctx 1024 over 4 slots: 256 tokens each; a request of 200 + 100 does not fit
    with pytest.raises(ConfigError, match=r"np4/load-c2: a request needs 300 tokens of context .* but the server has "
                                          r"256 per slot .*set ctx >= 600 in"):  # fmt: skip
        run_workload(server, level_workload(prompt=200, n=100, concurrency=2))


def test_a_stream_short_of_its_tokens_is_invalid(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # a request that asks the real server for fewer tokens than the workload: the check must see it
    real = AsyncStreams.completion

    async def fewer(self: AsyncStreams, path: str, payload: Any) -> Any:
        return await real(self, path, {**payload, "n_predict": 4, "max_tokens": 4})

    monkeypatch.setattr(AsyncStreams, "completion", fewer)
    with pytest.raises(MeasurementInvalid, match=r"request 1 of 8 generated 4 tokens, asked for 16"):
        run_workload(server, level_workload(concurrency=2))


# -- through the plugin -----------------------------------------------------------------

LOAD_WORKLOADS = """
[workloads.load]
prompt_tokens = 16
n_predict = 8
concurrency = [1, 2, 4]
rate = [8]
requests = 4
slo = { ttft_ms = 600000 }
repetitions = 1
warmup = 0
"""


def test_plugin_table_report_and_errors(pytester: pytest.Pytester, write_matrix: Callable[..., Path],
                                        bench_args: Callable[[Path], list[str]], tmp_path: Path) -> None:  # fmt: skip
    jsonschema = pytest.importorskip("jsonschema")
    matrix = write_matrix("""
[configs.np2]
parallel = 2
thresholds = { load-r8 = { min_agg_tok_s = 1000000 } }
""", workloads=LOAD_WORKLOADS)  # fmt: skip
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "*config: np2/load-c4: 4 concurrent streams, but the server has 2 slot(s) (parallel = 2 in *matrix.toml:configs.np2)*",
        "*threshold: np2/load-r8: threshold not met: agg_tok_s median * tok/s, required min_agg_tok_s = 1e+06*",
        "*llamabench load: throughput vs latency*",
        "np2 / load: prompt 16 + 8 tokens, distinct prompts, SLO ttft_ms <= 600000",
        "Level*req/s*out tok/s*TTFT p50*TTFT p99*ITL p50*ITL p99*E2E p99*goodput*busy slots*status*",
        "c1 *passed",
        "c2 *passed",
        "c4 *failed",
        "r8 *failed",
    ])  # fmt: skip
    result.stdout.no_fnmatch_line("Config*Load-C1*")  # levels are not columns of the generation table
    data = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(data, json.loads((REPO / "pytest_llamabench/schema/report.schema.json").read_text()))
    (curve,) = data["load"]
    assert curve["config"] == "np2" and curve["workload"] == "load"
    assert [p["level"] for p in curve["points"]] == ["c1", "c2", "c4", "r8"]
    c2 = next(r for r in data["results"] if r["workload"] == "load-c2")
    assert c2["workload_spec"]["load"]["concurrency"] == 2
    assert c2["metrics"]["agg_tok_s"]["median"] > 0 and c2["metrics"]["goodput_pct"]["median"] == 100
    assert "| c2 | " in (tmp_path / "report.md").read_text()


def test_the_shipped_cpu_matrix_collects(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        str(REPO / "benchmarks/test_matrix.py"), f"--llamabench-matrix={REPO / 'configs/concurrency.toml'}",
        "--collect-only", "-q", "-p", "no:randomly", "--llamabench-workload=load")  # fmt: skip
    result.stdout.fnmatch_lines(["*test_workload[[]np8-load-c1[]]*", "*test_workload[[]np8-fa-load-c8[]]*"])
    assert "poisson" not in result.stdout.str()

