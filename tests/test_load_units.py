"""Concurrent load without a server: matrix keys and their errors, the numbers of a repetition,
Poisson arrivals, distinct prompts, the knee and the throughput-vs-latency table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.config import Matrix, ServerConfig, Thresholds, Workload, load_matrix
from pytest_llamabench.config_load import LoadLevel, Slo
from pytest_llamabench.errors import ConfigError
from pytest_llamabench.measure.load import arrivals, distinct_prompts, overlap_max, summarize
from pytest_llamabench.measure.sample import Prompts
from pytest_llamabench.metrics import LOAD_METRICS, THRESHOLDS
from pytest_llamabench.outputs import load_table
from pytest_llamabench.results import ResultEntry
from pytest_llamabench.server.client import StreamResult
from pytest_llamabench.stats import Summary

from tests.matrices import config_error, load_text

REPO = Path(__file__).resolve().parent.parent
HEAD = '[models.m]\npath = "m.gguf"\n[defaults]\nmodel = "m"\nctx = 4096\n[configs.a]\n'


def load(tmp_path: Path, text: str) -> Matrix:
    return load_text(tmp_path, text, HEAD)  # type: ignore[no-any-return]


def error(tmp_path: Path, text: str) -> str:
    return config_error(tmp_path, text, HEAD)


# -- the matrix ---------------------------------------------------------------------


def test_levels_become_workloads_in_order_of_load(tmp_path: Path) -> None:
    matrix = load(tmp_path, """
[workloads.load]
prompt_tokens = 16
n_predict = 8
concurrency = [4, 1, 2]
rate = [2, 0.5]
slo = { ttft_ms = 500, itl_ms = 50 }
seed = 7
""")  # fmt: skip
    assert list(matrix.workloads) == ["load-c1", "load-c2", "load-c4", "load-r0.5", "load-r2"]
    c4, r05 = matrix.workloads["load-c4"], matrix.workloads["load-r0.5"]
    assert c4.kind == "load" and c4.load == LoadLevel("load", concurrency=4, requests=16, slo=Slo(500, 50), seed=7,
                                                      source=f"{tmp_path / 'm.toml'}:workloads.load.concurrency")  # fmt: skip
    assert r05.load is not None and r05.load.rate == 0.5 and r05.load.requests == 16 and not r05.load.closed_loop
    assert c4.prompt_tokens == 16 and c4.n_predict == 8
    # a request may wait behind every other one in flight: the silence allowed grows with the level
    assert c4.request_timeout_s() > matrix.workloads["load-c1"].request_timeout_s()
    # the workload's name selects all its levels; a level's own name selects that level
    assert [w.name for w in matrix.select_workloads(["load"], "--w")] == list(matrix.workloads)
    assert [w.name for w in matrix.select_workloads(["load-c2"], "--w")] == ["load-c2"]


def test_plain_workloads_are_unchanged(tmp_path: Path) -> None:
    matrix = load(tmp_path, "[workloads.short]\nprompt_tokens = 8\n")
    assert matrix.workloads["short"].load is None and matrix.workloads["short"].kind == "completion"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("concurrency = [0, 2]", r"workloads.load.concurrency\[0\]: 0 streams sends nothing; every level must be > 0"),
        ("concurrency = [1, 1]", r"concurrency\[1\]: level 1 is listed twice"),
        ("concurrency = [1.5]", r"concurrency\[0\]: expected an integer, got 1.5"),
        ("concurrency = []", r"concurrency: empty; give at least one level"),
        ("rate = [-1]", r"rate\[0\]: -1 requests/s sends nothing"),
        ("concurrency = [4]\nrequests = 2", r"requests: 2 requests cannot keep 4 streams busy; set requests >= 4"),
        ("concurrency = [1]\nslo = { ttft = 5 }", r"workloads.load.slo.ttft: unknown key; did you mean 'ttft_ms'\?"),
        ("concurrency = [1]\nslo = { ttft_ms = 0 }", r"slo.ttft_ms: must be > 0 milliseconds"),
        ("slo = { ttft_ms = 5 }", r"workloads.load.slo: only concurrent workloads take slo"),
        ('kind = "load"', r"workloads.load.kind: a load workload needs concurrency"),
        ('kind = "chat"\nconcurrency = [2]', r"workloads.load.kind: concurrent load sends completion requests"),
    ],
)
def test_bad_load_keys_are_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    message = error(tmp_path, f"[workloads.load]\n{text}\n")
    assert "m.toml:" in message
    assert len(message.splitlines()) == 1
    import re

    assert re.search(expected, message), message


def test_a_level_named_like_another_workload_is_an_error(tmp_path: Path) -> None:
    assert "workload 'load-c1' is defined twice" in error(tmp_path, "[workloads.load]\nconcurrency = [1]\n[workloads.load-c1]\n")


def test_group_thresholds_apply_to_every_level_and_a_levels_own_win() -> None:
    config = ServerConfig("a", model=None, server={}, thresholds={  # type: ignore[arg-type]
        "*": Thresholds.of("s", min_gen_tok_s=1), "load": Thresholds.of("g", max_ttft_p99_ms=900),
        "load-c8": Thresholds.of("l", max_ttft_p99_ms=2000, min_agg_tok_s=100)})  # fmt: skip
    assert dict(config.thresholds_for("load-c8", "load").items()) == {
        "min_gen_tok_s": 1, "max_ttft_p99_ms": 2000, "min_agg_tok_s": 100}  # fmt: skip
    assert dict(config.thresholds_for("load-c2", "load").items()) == {"min_gen_tok_s": 1, "max_ttft_p99_ms": 900}
    assert {"min_agg_tok_s", "max_ttft_p99_ms", "max_itl_p99_ms", "min_goodput_pct"} <= set(THRESHOLDS)


def test_shipped_concurrency_matrices_are_valid() -> None:
    cpu = load_matrix([REPO / "configs/concurrency.toml"])
    gpu = load_matrix([REPO / "configs/concurrency-gpu.toml"])
    for matrix in (cpu, gpu):
        for config in matrix.configs.values():
            for w in matrix.workloads.values():
                if w.load and w.load.concurrency:
                    assert config.server["parallel"] >= w.load.concurrency, (config.name, w.name)
                    assert config.server["ctx"] >= config.server["parallel"] * (w.prompt_tokens + w.n_predict)
    assert all(c.gpu for c in gpu.configs.values()) and not any(c.gpu for c in cpu.configs.values())
    assert max(w.load.concurrency or 0 for w in gpu.workloads.values() if w.load) == 16


# -- one repetition's numbers ----------------------------------------------------------


def result(sent: float, first: float, step: float, n: int, *, predicted_ms: float = 100.0, end: float = 0.0) -> StreamResult:
    times = [first + i * step for i in range(n)]
    timings = {"predicted_n": n, "predicted_ms": predicted_ms, "prompt_n": 16, "prompt_ms": 10.0, "cache_n": 0}
    return StreamResult(sent, times, n, end or times[-1], {"timings": timings}, "x" * n)


def test_summarize_aggregates_over_the_wall_time_and_counts_goodput() -> None:
    level = LoadLevel("load", concurrency=2, requests=2, slo=Slo(ttft_ms=150))
    # two requests side by side: 11 tokens each, 10 ms apart, first tokens at 100 ms and 200 ms
    results = [result(0.0, 0.1, 0.01, 11, end=0.2), result(0.0, 0.2, 0.01, 11, end=0.3)]
    sample = summarize(results, level, [2, 2, 1])
    assert sample.agg_tok_s == pytest.approx(22 / 0.3)
    assert sample.req_s == pytest.approx(2 / 0.3)
    assert sample.ttft_ms == pytest.approx(150) and sample.ttft_p99_ms == pytest.approx(199, abs=0.5)
    assert sample.itl_p50_ms == pytest.approx(10) and sample.gen_tok_s == pytest.approx(100)
    assert sample.client_gen_tok_s == pytest.approx(100)
    assert sample.goodput_pct == 50 and sample.goodput_req_s == pytest.approx(1 / 0.3)  # only the first met 150 ms
    assert sample.slots_busy_max == 2 and sample.slots_busy_mean == pytest.approx(5 / 3)
    assert sample.gen_overlap_max == 1  # first 0.1-0.2 s, second 0.2-0.3 s: they only touch
    assert sample.predicted_n == 22 and sample.cache_n == 0
    assert {m.name for m in LOAD_METRICS} <= {f.name for f in dataclasses.fields(sample)}


def test_without_slo_or_slots_those_are_not_measured() -> None:
    sample = summarize([result(0.0, 0.1, 0.01, 3)], LoadLevel("load", concurrency=1, requests=1), [])
    assert sample.goodput_req_s is None and sample.goodput_pct is None and sample.slots_busy_max is None


def test_overlap_counts_requests_generating_at_once() -> None:
    assert overlap_max([(0, 1), (0.5, 2), (0.6, 0.7), (3, 4)]) == 3
    assert overlap_max([(0, 1), (1, 2)]) == 1


def test_poisson_arrivals_are_seeded_and_at_the_rate() -> None:
    level = LoadLevel("load", rate=2.0, requests=2000, seed=3)
    at = arrivals(level, 0)
    assert at == arrivals(level, 0) and at != arrivals(level, 1) and at != arrivals(dataclasses.replace(level, seed=4), 0)
    assert at[0] == 0 and all(b >= a for a, b in zip(at, at[1:]))
    assert len(at) / at[-1] == pytest.approx(2.0, rel=0.1)  # 2000 arrivals: the mean gap is 1/rate


def test_prompts_of_a_repetition_are_all_different() -> None:
    prompts = object.__new__(Prompts)
    prompts.tokens = [1, 2, 3, 4, 5] * 40  # a corpus that repeats every 5 tokens
    out = distinct_prompts(prompts, 0, 12, 8, "here")
    assert len({tuple(p) for p in out}) == 12 and all(len(p) == 8 for p in out)
    with pytest.raises(ConfigError, match="here: cannot make 40 different prompts of 1 token"):
        distinct_prompts(prompts, 0, 40, 1, "here")


# -- the knee and the table --------------------------------------------------------------


def entry(config: str, level: int, agg: float, e2e_p99: float, *, rate: float | None = None, outcome: str = "passed") -> ResultEntry:
    spec: dict[str, Any] = dataclasses.asdict(Workload(
        f"load-c{level}", kind="load", prompt_tokens=16, n_predict=8,
        load=LoadLevel("load", concurrency=None if rate else level, rate=rate, requests=8, slo=Slo(ttft_ms=100))))  # fmt: skip
    metrics = {"agg_tok_s": [agg], "e2e_p99_ms": [e2e_p99], "req_s": [agg / 8], "ttft_ms": [50.0], "ttft_p99_ms": [90.0],
               "itl_p50_ms": [10.0], "itl_p99_ms": [20.0], "goodput_req_s": [1.0], "goodput_pct": [80.0],
               "slots_busy_max": [float(level)]}  # fmt: skip
    return ResultEntry(f"{config}-load-c{level}", config, spec["name"] if not rate else f"load-r{rate:g}", outcome,
                       metrics={k: Summary.of(v) for k, v in metrics.items()}, workload_spec=spec)  # fmt: skip


def test_the_knee_is_where_throughput_stops_paying_for_latency() -> None:
    results = [entry("a", 1, 100, 1000), entry("a", 2, 190, 1100), entry("a", 4, 300, 1400), entry("a", 8, 310, 2800),
               ResultEntry("a-short", "a", "short", "passed")]  # fmt: skip
    (curve,) = load_table.build_curves(results)
    (knee,) = curve.knees()
    assert knee.level == "c4" and "+3% tok/s" in knee.why and "+100% p99" in knee.why
    text = load_table.render([curve])
    assert "c4 (knee)" in text and "closed loop knee: c4" in text
    assert "1.00/s (80%)" in text and "SLO ttft_ms <= 100" in text
    markdown = load_table.render([curve], markdown=True)
    assert "| Level | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p99 | goodput |" in markdown
    assert curve.as_dict()["knees"] == [{"series": "closed loop", "level": "c4", "why": knee.why}]


def test_no_knee_while_throughput_still_scales_and_failed_levels_are_skipped() -> None:
    results = [entry("a", 1, 100, 1000), entry("a", 2, 190, 1500), entry("a", 4, 380, 2500),
               entry("a", 8, 0, 0, outcome="error")]  # fmt: skip
    (curve,) = load_table.build_curves(results)
    (knee,) = curve.knees()
    assert knee.level is None and "not reached up to c4" in knee.why
    assert "error" in load_table.render([curve])


def test_open_loop_levels_are_their_own_series() -> None:
    results = [entry("a", 1, 100, 1000), entry("a", 2, 190, 1100),
               entry("a", 0, 5, 900, rate=0.5), entry("a", 0, 9, 950, rate=1.0)]  # fmt: skip
    (curve,) = load_table.build_curves(results)
    assert [p.label for p in curve.series(False)] == ["r0.5", "r1"]
    assert [k.series for k in curve.knees()] == ["closed loop", "open loop"]


def test_readme_blocks_render_from_committed_reports(tmp_path: Path) -> None:
    import importlib.util

    from pytest_llamabench.results import RunReport

    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "scripts/readme_tables.py")
    assert spec is not None and spec.loader is not None
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    report = RunReport(fingerprint={"host": {"cpu": "Some CPU"}}, results=[entry("a", 1, 100, 1000), entry("a", 2, 150, 1100)])
    report.write(tmp_path / "r.json")
    text = tables.load_curves(str(tmp_path / "r.json"))
    assert text.startswith(f"From `{tmp_path / 'r.json'}` (Some CPU):") and "| c2 | " in text
    overhead = {"concurrent": {"device": "Some CPU", "config": "np8", "streams": 8, "agg_tok_s_median": 150.0,
                               "harness_cores": 0.05, "server_cores": 1.9, "harness_share_of_cpu_pct": 2.5,
                               "client_vs_server_pct_median": 0.4, "client_vs_server_pct_p90": 1.0,
                               "client_vs_server_pct_max": 3.0}}  # fmt: skip
    (tmp_path / "h.json").write_text(json.dumps(overhead))
    assert "| Some CPU | np8 | 8 | 150.0 | 0.050 | 1.90 | 2.5% | 0.40% / 1.00% / 3.00% |" in tables.harness_load(str(tmp_path / "h.json"))


def test_the_gate_judges_a_levels_aggregate_tok_s_and_p99_ttft() -> None:
    from pytest_llamabench.gate import REGRESSED, compare
    from pytest_llamabench.results import RunReport

    def run(agg: list[float], ttft_p99: list[float]) -> RunReport:
        e = entry("a", 8, 0, 0)
        e.metrics = {"agg_tok_s": Summary.of(agg), "ttft_p99_ms": Summary.of(ttft_p99)}
        return RunReport(results=[e])

    base = run([100, 101, 99, 100, 102, 98], [500, 510, 490, 505, 495, 500])
    slower = run([70, 71, 69, 70, 72, 68], [900, 910, 890, 905, 895, 900])
    verdicts = {(r.workload, r.metric): r.verdict for r in compare(base, slower).rows}
    assert verdicts[("load-c8", "agg_tok_s")] == REGRESSED and verdicts[("load-c8", "ttft_p99_ms")] == REGRESSED
