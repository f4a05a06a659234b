"""The typed result record, the metric registry, the winner rule and option precedence: fast, no server."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_llamabench import metrics
from pytest_llamabench.config import Thresholds
from pytest_llamabench.errors import ConfigError, ServerOutOfMemory, ThresholdNotMet
from pytest_llamabench.hardware.host import CpuContention
from pytest_llamabench.measure.sample import Sample
from pytest_llamabench.measure.thresholds import check_thresholds
from pytest_llamabench.outputs.table import build_rows, build_table, render
from pytest_llamabench.results import Failure, ResultEntry, RunReport
from pytest_llamabench.stats import Summary


def entry(config: str, workload: str, gen: list[float] | None = None, outcome: str | None = "passed",
          vram: float | None = None, **kw: object) -> ResultEntry:  # fmt: skip
    values = {"gen_tok_s": Summary.of(gen or [])} if gen else {}
    if vram is not None:
        values["vram_peak_mib"] = Summary.of([vram])
    return ResultEntry(f"t[{config}-{workload}]", config, workload, outcome, metrics=values, **kw)  # type: ignore[arg-type]


# -- the metric registry ---------------------------------------------------------------


def test_every_metric_is_declared_once_with_a_consistent_direction() -> None:
    assert len(metrics.METRICS) == len({m.name for m in metrics.METRICS.values()})
    for metric in metrics.METRICS.values():
        if metric.threshold:
            assert metric.threshold.startswith("min_" if metric.higher_is_better else "max_"), metric
        if metric.tolerance:
            assert metric.tolerance.startswith("-" if metric.higher_is_better else "+"), metric
    assert metrics.higher_is_better("gen_tok_s") and not metrics.higher_is_better("ttft_ms")
    assert metrics.higher_is_better("my_own_tok_s") and not metrics.higher_is_better("my_own_ms")


def test_per_repetition_metrics_are_exactly_the_sample_fields() -> None:
    fields = {f.name for f in dataclasses.fields(Sample)} - {"predicted_n", "prompt_n", "cache_n"}
    assert {m.name for m in metrics.SAMPLE_METRICS} == fields


def test_a_threshold_missed_on_a_busy_host_says_so() -> None:
    result = entry("a", "short", [0.6], host_load={"busy": True, "other_cores": 0.97, "cores": 2})
    with pytest.raises(ThresholdNotMet, match="host was busy \\(other processes used 0.97 of 2 cores\\)") as info:
        check_thresholds(result, Thresholds.of("here", min_gen_tok_s=5))
    assert "fix the regression" not in str(info.value) and "--llamabench-retry-busy" in str(info.value)


def test_thresholds_check_each_metric_in_its_direction() -> None:
    result = entry("a", "short", [50.0, 60.0, 70.0], vram=900.0)
    check_thresholds(result, Thresholds.of("here", min_gen_tok_s=60, max_vram_mib=1000))
    with pytest.raises(ThresholdNotMet, match=r"gen_tok_s median 60.0 tok/s, required min_gen_tok_s = 61.*set in here"):
        check_thresholds(result, Thresholds.of("here", min_gen_tok_s=61))
    with pytest.raises(ThresholdNotMet, match=r"vram_peak_mib peak 900.0 MiB, required max_vram_mib = 800"):
        check_thresholds(result, Thresholds.of("here", max_vram_mib=800))
    with pytest.raises(ThresholdNotMet, match="ttft_ms was not measured"):
        check_thresholds(result, Thresholds.of("here", max_ttft_ms=800))
    with pytest.raises(ConfigError, match="marker: unknown threshold min_tok_s"):
        Thresholds.of("marker", min_tok_s=3)


# -- the record and its JSON -----------------------------------------------------------


def test_entry_json_round_trip_keeps_everything() -> None:
    original = entry("C7", "short", [1.0, 2.0, 4.0], vram=5.0, reason=None, endpoint="/completion",
                     failure=Failure("oom", "no room", {"device": "gpu"}), server={"threads": 2, "build_info": "b1"})  # fmt: skip
    data = original.as_dict()
    assert data["metrics"]["gen_tok_s"] == {"median": 2.0, "mean": 7 / 3, "stddev": pytest.approx(1.5275, abs=1e-4),
                                            "iqr": 1.5, "min": 1.0, "max": 4.0, "n": 3, "samples": [1.0, 2.0, 4.0]}  # fmt: skip
    data["future_field"] = {"kept": True}
    again = ResultEntry.from_dict(json.loads(json.dumps(data)))
    assert again.as_dict() == data
    assert (again.threads, again.build, again.peak("vram_peak_mib")) == (2, "b1", 5.0)


def test_report_merges_phases_and_the_worst_outcome_wins(tmp_path: Path) -> None:
    report = RunReport(fingerprint={"host": {"cpu": "x", "cores": 2}})
    assert report.record(ResultEntry("t1", "a", "w", server={"build_info": "b1"})) is None  # setup passed: no outcome
    assert report.results == []
    report.record(entry("a", "w", [3.0], outcome="passed"))  # another test id: enters on its own
    first = report.record(ResultEntry("t1", outcome="passed"))
    assert first is not None and first.config == "a" and first.server == {"build_info": "b1"}
    report.record(ResultEntry("t1", outcome="error", reason="teardown broke"))
    report.record(ResultEntry("t1", outcome="passed"))  # a better outcome never replaces a worse one
    assert [r.outcome for r in report.results] == ["passed", "error"]
    assert report.fingerprint["llama_cpp_builds"] == ["b1"]
    path = tmp_path / "r.json"
    report.write(path, finished=True)
    loaded = RunReport.load(path)
    assert loaded.finished and [r.as_dict() for r in loaded.results] == [r.as_dict() for r in report.results]


def test_pytest_benchmark_json_is_read_into_the_same_record() -> None:
    ours = entry("C7", "short", [10.0, 11.0]).as_dict()
    data = {"machine_info": {"cpu": {"brand_raw": "AMD EPYC"}}, "benchmarks": [
        {"name": "test_workload[C7-short]", "stats": {"median": 0.5}, "extra_info": {"llamabench": ours}},
        {"name": "test_other[x]", "stats": {"data": [0.1, 0.2, 0.3], "median": 0.2}, "extra_info": {}},
    ]}  # fmt: skip
    report = RunReport.from_dict(data, source="bench.json")
    assert report.kind == "pytest-benchmark" and report.fingerprint["host"]["cpu"] == "AMD EPYC"
    index = report.index()
    assert index[("C7", "short")].samples("gen_tok_s") == (10.0, 11.0)
    assert index[("test_other", "x")].samples("time_s") == (0.1, 0.2, 0.3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": 1}, "not a pytest-llamabench report nor a pytest-benchmark JSON"),
        ({"schema_version": 9, "results": []}, "schema_version 9 is not supported"),
        ({"schema_version": 1, "results": [{"config": "a", "workload": "w", "outcome": "won"}]}, "'won' is not one of"),
        ({"schema_version": 1, "results": [{"config": "a", "workload": "w", "metrics": {"m": ["x"]}}]},
         "results\\[0\\].metrics.m: expected a list of finite numbers"),
    ],
)  # fmt: skip
def test_bad_reports_get_one_clear_error(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunReport.from_dict(data, source="r.json")


def test_oom_failure_keeps_its_detail() -> None:
    failure = Failure.from_exception(ServerOutOfMemory("no room", device="gpu", requested_mib=20866.0, buffer="model"))
    assert failure.as_dict() == {"kind": "oom", "message": "no room",
                                 "detail": {"device": "gpu", "requested_mib": 20866.0, "buffer": "model"}}  # fmt: skip


# -- the winner rule ------------------------------------------------------------------------


def test_winner_is_the_best_mean_among_configs_that_passed_everything() -> None:
    results = [
        entry("slow", "a", [10.0]), entry("slow", "b", [10.0]),
        entry("fast", "a", [30.0]), entry("fast", "b", [10.0]),  # mean 20
        entry("faster-but-failed", "a", [90.0]), entry("faster-but-failed", "b", [90.0], outcome="failed"),
        entry("oom", "a", outcome="xfailed", failure=Failure("oom", "x", {"device": "gpu", "requested_mib": 21000.0})),
    ]  # fmt: skip
    rows, workloads = build_rows(results)
    assert workloads == ["a", "b"]
    assert [r.config for r in rows if r.winner] == ["fast"]
    status = {r.config: r.status for r in rows}
    assert status["oom"] == "expected OOM (gpu 21000 MiB)" and status["faster-but-failed"] == "failed"
    text = render(rows, workloads)
    assert "WINNER" in text and "—" in text


def test_equal_speed_is_a_tie_listing_the_config_with_less_vram_first() -> None:
    rows, _, verdict = build_table([entry("big", "a", [20.0], vram=9000.0), entry("small", "a", [20.0], vram=5000.0)])
    assert verdict.winner is None and (verdict.best, verdict.runner_up) == ("small", "big")
    assert [r.status for r in rows] == ["tie (within noise)"] * 2
    assert verdict.line().startswith("tie within noise: small ≈ big (ratio 1.00")


def test_one_start_needs_the_noise_floor_margin() -> None:
    from pytest_llamabench.outputs.winner import NOISE_FLOOR

    assert NOISE_FLOOR >= 0.18  # the largest ratio of two starts of one config on the H200 (docs/noise/gpu)
    close = [entry("a", "w", [100.0 * (1 + NOISE_FLOOR * 0.9)]), entry("b", "w", [100.0])]  # within unmeasured noise
    assert build_table(close)[2].winner is None
    clear = [entry("a", "w", [100.0 * (1 + NOISE_FLOOR * 1.1)]), entry("b", "w", [100.0])]
    assert build_table(clear)[2].winner == "a"


def test_with_several_starts_the_interval_over_starts_decides() -> None:
    def starts(config: str, medians: list[float]) -> list[ResultEntry]:
        return [dataclasses.replace(entry(config, "w", [m]), test=f"{config}@{i}", start=i) for i, m in enumerate(medians, 1)]

    report = RunReport(results=[*starts("a", [104.0, 106.0, 105.0, 107.0]), *starts("b", [100.0, 101.0, 99.0, 100.0])])
    verdict = build_table(report.per_unit())[2]
    assert verdict.winner == "a" and verdict.starts == 4 and verdict.ci is not None and verdict.ci[0] > 1
    noisy = RunReport(results=[*starts("a", [90.0, 125.0, 100.0, 110.0]), *starts("b", [100.0, 101.0, 99.0, 100.0])])
    verdict = build_table(noisy.per_unit())[2]
    assert verdict.winner is None and verdict.ci is not None and verdict.ci[0] < 1 < verdict.ci[1]


def test_configs_measured_on_other_workloads_are_not_rivals() -> None:
    """A vision-only config's tok/s is of other work: it is neither winner nor runner-up."""
    results = [entry("a", "short", [130.0]), entry("a", "long", [110.0]),
               entry("b", "short", [100.0]), entry("b", "long", [90.0]),
               entry("vlm", "vision", [500.0])]  # fmt: skip
    rows, _, verdict = build_table(results)
    assert (verdict.best, verdict.runner_up, verdict.not_compared) == ("a", "b", ("vlm",))
    assert verdict.winner == "a" and "not compared, other workloads: vlm" in verdict.line()
    assert {r.config: r.status for r in rows}["vlm"] == "Done"


def test_a_busy_measurement_is_never_ranked() -> None:
    busy = entry("noop", "w", [300.0], host_load={"busy": True, "other_cores": 0.9})
    rows, _, verdict = build_table([busy, entry("base", "w", [100.0])])
    assert verdict.winner == "base"
    assert [r.status for r in rows] == ["busy host: not ranked", "WINNER"]


# -- option precedence: marker > command line > env > ini ------------------------------------


def test_option_precedence_command_line_env_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nllamabench_alpha = 0.2\nllamabench_workload = from-ini\n")
    pytester.makepyfile(
        """
        from pytest_llamabench.plugin import options

        def test_values(request):
            print("ALPHA", options.value(request.config, "alpha"))
            print("WORKLOAD", options.value(request.config, "workload"))
        """
    )
    monkeypatch.setenv("LLAMABENCH_ALPHA", "0.1")
    result = pytester.runpytest_subprocess("-s", "--llamabench-workload=cli", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "ALPHA (0.1, 'LLAMABENCH_ALPHA')" in out and "WORKLOAD (['cli'], '--llamabench-workload')" in out
    monkeypatch.delenv("LLAMABENCH_ALPHA")
    out = pytester.runpytest_subprocess("-s", "-p", "no:randomly").stdout.str()
    assert "ALPHA (0.2, " in out and "tox.ini:llamabench_alpha')" in out
    assert "WORKLOAD (['from-ini'], " in out and "tox.ini:llamabench_workload')" in out


# -- a busy host is detected -------------------------------------------------------------------


def _spin(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"])


def test_cpu_taken_by_other_processes_is_measured_and_the_servers_own_is_not() -> None:
    spinner = _spin(1.5)
    try:
        with CpuContention(lambda: set(), busy_cores=0.25) as other:  # the spinner is someone else
            time.sleep(1.0)
    finally:
        spinner.wait()
    assert other.busy and other.other_cores is not None and other.other_cores > 0.5, other.as_dict()
    server = _spin(1.5)
    try:
        with CpuContention(lambda: {server.pid}, busy_cores=0.25) as own:  # the spinner is "the server"
            time.sleep(1.0)
    finally:
        server.wait()
    assert own.other_cores is not None and own.other_cores < other.other_cores - 0.4, (own.as_dict(), other.as_dict())


def test_a_zero_generation_time_is_an_invalid_measurement_not_infinite_speed() -> None:
    from pytest_llamabench.errors import MeasurementInvalid
    from pytest_llamabench.measure.sample import aggregate

    timings = {"predicted_n": 16, "predicted_ms": 0.0, "prompt_n": 8, "prompt_ms": 5.0, "cache_n": 0}
    with pytest.raises(MeasurementInvalid, match="predicted_ms = 0 for 15 generated tokens"):
        aggregate([(0.0, [0.1, 0.2], 0.3, timings)])


def test_a_bad_tolerance_in_the_environment_fails_at_start_without_a_baseline(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    monkeypatch.setenv("LLAMABENCH_TOLERANCE", "bogus")
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*LLAMABENCH_TOLERANCE: *'bogus' is not a tolerance*"])
    monkeypatch.delenv("LLAMABENCH_TOLERANCE")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--llamabench-alpha=5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llamabench-alpha*'5' is not a significance level*"])


def test_api_keys_are_redacted_and_a_configs_own_key_is_used_by_the_client() -> None:
    from pytest_llamabench.config import ModelSpec, ServerConfig
    from pytest_llamabench.server.launcher import api_key_of, redacted

    assert redacted(["--threads", "2", "--api-key", "sk-1", "--api-key=sk-2"]) == ["--threads", "2", "--api-key", "***", "--api-key=***"]
    model = ModelSpec("m", path=None, embedded="e")
    assert api_key_of(ServerConfig("a", model, {}, args=("--api-key", "sk-1"))) == "sk-1"
    assert api_key_of(ServerConfig("a", model, {}, env={"LLAMA_API_KEY": "sk-3"})) == "sk-3"
    assert api_key_of(ServerConfig("a", model, {})) is None
