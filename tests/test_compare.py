"""Unit tests of the regression gate: statistics, tolerances, outcomes, fingerprints, CLI.

Reports are built from small dicts: these test the comparison logic, not a server.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.__main__ import main
from pytest_llamabench.errors import ConfigError
from pytest_llamabench.gate import (
    IMPROVED,
    INCONCLUSIVE,
    NEW,
    NO_CHANGE,
    REGRESSED,
    Comparison,
    FingerprintMismatch,
    Tolerance,
    Tolerances,
    bootstrap_ratio_ci,
    compare,
    compare_samples,
    load_report,
    mann_whitney_u,
    min_exact_p,
    min_repetitions,
    parse_tolerance,
    render,
)
from pytest_llamabench.gate.fingerprint import Fingerprint
from pytest_llamabench.gate.statistics import _u_counts
from pytest_llamabench.results import RunReport

FAST = [66.0, 66.5, 65.8, 66.1, 66.3]
SLOW = [60.0, 60.5, 59.8, 60.1, 60.3]  # -9% against FAST, no overlap
TTFT = [20.0, 21.0, 20.5, 19.9, 20.2]


def result(
    config: str = "base",
    workload: str = "short",
    *,
    outcome: str = "passed",
    failure: dict[str, str] | None = None,
    threads: int = 2,
    **metrics: list[float],
) -> dict[str, Any]:
    return {
        "config": config,
        "workload": workload,
        "test": f"benchmarks/test_matrix.py::test_workload[{config}-{workload}]",
        "outcome": outcome,
        "failure": failure,
        "server": {"args": ["--threads", str(threads)], "build_info": "b1-0c1e570", "threads": threads},
        "model": {"file": "x.gguf", "size": 1, "sha256": "aa"},
        "metrics": {name: {"median": sorted(s)[len(s) // 2], "n": len(s), "samples": s} for name, s in metrics.items()},
    }


def starts(config: str = "base", workload: str = "short", **metrics: list[float]) -> list[dict[str, Any]]:
    """One result per fresh server start, each with one sample per metric (its start's median)."""
    n = len(next(iter(metrics.values())))
    return [{**result(config, workload, **{m: [v[i]] for m, v in metrics.items()}), "start": i + 1,
             "test": f"benchmarks/test_matrix.py::test_workload[{config}@{i + 1}-{workload}]"} for i in range(n)]  # fmt: skip


def report(*results: dict[str, Any], gpu: str = "NVIDIA H100 80GB HBM3", build: str = "b1-0c1e570",
           sha: str = "aa", cpu: str = "EPYC") -> dict[str, Any]:  # fmt: skip
    return {
        "schema_version": 1,
        "plugin_version": "0.1.0",
        "started_at": "2025-01-01T00:00:00Z",
        "finished": True,
        "fingerprint": {
            "host": {"cpu": cpu, "cores": 2, "memory_mib": 24000},
            "gpus": [{"name": gpu, "driver": "580.1", "cuda": "13.0"}],
            "llama_cpp_builds": [build],
            "models": {"smollm2": {"file": "x.gguf", "size": 1, "sha256": sha}},
        },
        "results": list(results),
    }


def run_compare(base: dict[str, Any], new: dict[str, Any], **kwargs: Any) -> Comparison:
    return compare(RunReport.from_dict(base, source="base.json"), RunReport.from_dict(new, source="new.json"), **kwargs)


def only(comparison: Comparison, metric: str, config: str = "base") -> Any:
    [row] = [r for r in comparison.rows if r.metric == metric and r.config == config]
    return row


# -- Mann-Whitney U ---------------------------------------------------------------

# Expected (U, p) computed once with scipy 1.17.1:
#   scipy.stats.mannwhitneyu(a, b, alternative="two-sided", method=METHOD)
# and pasted here; scipy is not a dependency.
SCIPY_EXACT = [
    (FAST, SLOW, 25.0, 0.007936507936507936),
    ([10.1, 10.4, 9.8, 10.0, 10.3], [10.2, 10.6, 10.5, 9.9, 10.7], 6.0, 0.2222222222222222),
    ([1.0, 2.0, 3.5, 4.2], [2.5, 3.0, 5.0, 6.0, 7.5, 8.0], 4.0, 0.11428571428571428),
    ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], 0.0, 0.1),
    ([3.1, 2.7, 4.4, 5.0, 3.9, 2.2, 4.8, 3.3], [4.1, 5.5, 6.2, 4.9, 5.8, 3.6, 6.6], 8.0, 0.020512820512820513),
    (
        [round(10 + ((i * 7919) % 101) / 50, 3) for i in range(30)],
        [round(10.4 + ((i * 104729) % 97) / 50 + 0.0001, 4) for i in range(25)],
        251.0,
        0.03610073291656546,
    ),
]
SCIPY_ASYMPTOTIC = [  # ties (tie-corrected normal approximation with continuity correction)
    ([66, 66, 65, 66, 67], [60, 66, 59, 60, 61], 22.5, 0.039962393696458),
    ([1, 2, 2, 3, 3, 3], [2, 3, 4, 4], 5.5, 0.17971249487899976),
    ([5, 5, 5], [5, 5, 5], 4.5, 1.0),
    (  # no ties, but more than 50 per side
        [round(10 + ((i * 7919) % 211) / 50, 3) for i in range(60)],
        [round(10.2 + ((i * 104729) % 197) / 50 + 0.0001, 4) for i in range(55)],
        1559.0,
        0.6123634200895356,
    ),
]


@pytest.mark.parametrize(("a", "b", "u", "p"), SCIPY_EXACT)
def test_mwu_exact_matches_scipy(a: list[float], b: list[float], u: float, p: float) -> None:
    got = mann_whitney_u(a, b)
    assert got.method == "exact"
    assert got.u == u
    assert got.p_value == pytest.approx(p, rel=1e-12)
    assert mann_whitney_u(b, a).p_value == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


@pytest.mark.parametrize(("a", "b", "u", "p"), SCIPY_ASYMPTOTIC)
def test_mwu_asymptotic_matches_scipy(a: list[float], b: list[float], u: float, p: float) -> None:
    got = mann_whitney_u(a, b)
    assert got.method == "asymptotic"
    assert got.u == u
    assert got.p_value == pytest.approx(p, rel=1e-9)


def test_exact_distribution_is_symmetric_and_complete() -> None:
    for m, n in [(1, 1), (3, 4), (5, 5), (8, 2)]:
        counts = _u_counts(m, n)
        assert sum(counts) == math.comb(m + n, m)
        assert counts == counts[::-1]
        assert all(c >= 0 for c in counts)


def test_minimum_repetitions() -> None:
    assert min_exact_p(3, 3) == pytest.approx(0.1)  # 2 / C(6, 3)
    assert min_exact_p(4, 4) == pytest.approx(2 / 70)
    assert min_repetitions(0.05) == 4
    assert min_repetitions(0.01) == 5  # 2 / C(10, 5) = 0.0079
    assert min_repetitions(0.1) == 3
    with pytest.raises(ValueError):
        min_repetitions(0)


def test_bootstrap_ci_is_deterministic_and_brackets_the_ratio() -> None:
    ci = bootstrap_ratio_ci(FAST, SLOW)
    assert ci == bootstrap_ratio_ci(FAST, SLOW)
    assert ci is not None
    assert ci[0] <= 60.1 / 66.1 <= ci[1]
    assert 0.89 < ci[0] < ci[1] < 0.93
    assert bootstrap_ratio_ci([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) is None


# -- tolerances -------------------------------------------------------------------


def test_parse_tolerance_forms() -> None:
    rule = parse_tolerance("gen_tok_s:-5%")
    assert (rule.metric, rule.config, rule.workload) == ("gen_tok_s", None, None)
    assert rule.tolerance == Tolerance(0.05, relative=True, higher_is_better=True)
    assert str(rule) == "gen_tok_s:-5%"
    rule = parse_tolerance("C7/ttft_ms:+10%")
    assert (rule.config, rule.workload, str(rule.tolerance)) == ("C7", None, "+10%")
    rule = parse_tolerance("C7/short/gen_tok_s:-2.5%")
    assert (rule.config, rule.workload, rule.tolerance.amount) == ("C7", "short", 0.025)
    rule = parse_tolerance("rss_peak_mib:200")  # absolute, sign implied (+ for lower-is-better)
    assert (rule.tolerance.relative, rule.tolerance.amount, str(rule)) == (False, 200.0, "rss_peak_mib:+200")
    assert rule.tolerance.band(1000.0) == (0.8, 1.2)


@pytest.mark.parametrize(
    "spec", ["gen_tok_s", "gen_tok_s:", "gen_tok_s:-5%%", "gen_tok_s:five", ":-5%", "a/b/c/gen_tok_s:-5%", "C7//x:-5%"]
)
def test_parse_tolerance_rejects_bad_syntax(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tolerance(spec)
    message = str(info.value)
    assert "--llamabench-tolerance" in message
    assert repr(spec) in message
    assert "gen_tok_s:-5%" in message  # an example of the right form


def test_parse_tolerance_rejects_the_good_direction() -> None:
    with pytest.raises(ConfigError, match=r"higher-is-better.*write gen_tok_s:-5%"):
        parse_tolerance("gen_tok_s:+5%")
    with pytest.raises(ConfigError, match=r"lower-is-better.*write C7/ttft_ms:\+10%"):
        parse_tolerance("C7/ttft_ms:-10%")


def test_parse_tolerance_works_as_argparse_type(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llamabench-tolerance", type=parse_tolerance, action="append")
    args = parser.parse_args(["--llamabench-tolerance", "ttft_ms:+10%"])
    assert args.llamabench_tolerance[0].metric == "ttft_ms"
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--llamabench-tolerance", "ttft_ms=10"])
    assert info.value.code == 2
    assert "is not a tolerance" in capsys.readouterr().err


def test_tolerances_scopes() -> None:
    tolerances = Tolerances(["C7/gen_tok_s:-3%", "C7/short/gen_tok_s:-2%", parse_tolerance("ttft_ms:+20%")])
    assert str(tolerances.get("C1", "short", "gen_tok_s")) == "-5%"  # default
    assert str(tolerances.get("C7", "long", "gen_tok_s")) == "-3%"  # per config
    assert str(tolerances.get("C7", "short", "gen_tok_s")) == "-2%"  # per config x workload
    assert str(tolerances.get("C1", "short", "ttft_ms")) == "+20%"  # global override
    assert str(tolerances.get("C1", "short", "prompt_tok_s")) == "-10%"
    assert tolerances.get("C1", "short", "e2e_ms") is None
    assert Tolerances(defaults=False).metrics() == frozenset()


def test_tolerances_from_mapping() -> None:
    tolerances = Tolerances()
    tolerances.update({"gen_tok_s": "-4%", "C7": {"ttft_ms": "+5%", "short": {"gen_tok_s": "2%"}}, "C8/e2e_ms": 50})
    assert str(tolerances.get("C1", "x", "gen_tok_s")) == "-4%"
    assert str(tolerances.get("C7", "x", "ttft_ms")) == "+5%"
    assert str(tolerances.get("C7", "short", "gen_tok_s")) == "-2%"
    assert str(tolerances.get("C8", "x", "e2e_ms")) == "+50"
    with pytest.raises(ConfigError, match=r"bench.toml:tolerance.C7.gen_tok_s"):
        Tolerances().update({"C7": {"gen_tok_s": "+3%"}}, where="bench.toml:tolerance")
    with pytest.raises(ConfigError, match="nest at most two levels"):
        Tolerances().update({"a": {"b": {"c": {"gen_tok_s": "-1%"}}}})


# -- verdicts from samples --------------------------------------------------------

GEN = Tolerance(0.05, relative=True, higher_is_better=True)
TTFT_TOL = Tolerance(0.15, relative=True, higher_is_better=False)


def test_significant_drop_past_tolerance_is_a_regression() -> None:
    row = compare_samples(FAST, SLOW, GEN, metric="gen_tok_s")
    assert row.verdict == REGRESSED
    assert row.base_median == 66.1 and row.new_median == 60.1
    assert row.ratio == pytest.approx(60.1 / 66.1)
    assert row.p_value == pytest.approx(0.007936507936507936)
    assert row.ci is not None and row.ci[1] < 0.95
    assert "-9.1% is past -5%" in row.reason


def test_significant_rise_past_tolerance_is_an_improvement() -> None:
    assert compare_samples(SLOW, FAST, GEN).verdict == IMPROVED
    slower_ttft = [t * 1.3 for t in TTFT]
    assert compare_samples(TTFT, slower_ttft, TTFT_TOL).verdict == REGRESSED  # lower is better
    assert compare_samples(slower_ttft, TTFT, TTFT_TOL).verdict == IMPROVED


def test_significant_but_within_tolerance_is_no_change() -> None:
    new = [v * 0.97 for v in FAST]  # -3%, p = 0.008 but within -5%
    row = compare_samples(FAST, new, GEN)
    assert row.p_value is not None and row.p_value < 0.05
    assert row.verdict == NO_CHANGE
    assert "within -5%" in row.reason


def test_past_tolerance_but_not_significant_is_inconclusive() -> None:
    base = [100.0, 60.0, 110.0, 95.0, 105.0]
    new = [90.0, 100.0, 50.0, 85.0, 120.0]  # median -10%, heavily overlapping
    row = compare_samples(base, new, GEN)
    assert row.verdict == INCONCLUSIVE
    assert "not significant" in row.reason


def test_three_repetitions_can_never_be_significant() -> None:
    row = compare_samples(FAST[:3], SLOW[:3], GEN)
    assert row.p_value == pytest.approx(0.1)
    assert row.verdict == INCONCLUSIVE
    assert "need ≥4 repetitions" in row.reason


def test_too_few_samples() -> None:
    row = compare_samples(FAST[:2], SLOW[:2], GEN)
    assert (row.verdict, row.p_value, row.ci) == (INCONCLUSIVE, None, None)
    assert "need ≥4 repetitions per side" in row.reason
    # a single measurement (rss_peak_mib) within tolerance is still "no change"
    rss = Tolerance(0.05, relative=True, higher_is_better=False)
    assert compare_samples([1000.0], [1020.0], rss).verdict == NO_CHANGE
    assert compare_samples([1000.0], [1200.0], rss).verdict == INCONCLUSIVE


def test_absolute_tolerance() -> None:
    within = parse_tolerance("gen_tok_s:-7").tolerance  # may drop 7 tok/s; the drop is 6
    assert compare_samples(FAST, SLOW, within).verdict == NO_CHANGE
    past = parse_tolerance("gen_tok_s:-5").tolerance
    assert compare_samples(FAST, SLOW, past).verdict == REGRESSED


def test_alpha_is_used() -> None:
    row = compare_samples(FAST, SLOW, GEN, alpha=0.005)  # p = 0.0079 > 0.005
    assert row.verdict == INCONCLUSIVE


# -- reports: outcomes and metrics ------------------------------------------------


def test_metric_rows_and_summary() -> None:
    base = report(*starts(gen_tok_s=FAST, ttft_ms=TTFT), *starts("C7", gen_tok_s=FAST))
    new = report(*starts(gen_tok_s=SLOW, ttft_ms=TTFT), *starts("C7", gen_tok_s=FAST))
    comparison = run_compare(base, new)
    assert comparison.regressed
    assert {r.units for r in comparison.rows} == {"starts"}
    assert [(r.config, r.metric, r.verdict) for r in comparison.rows] == [
        ("C7", "gen_tok_s", NO_CHANGE),
        ("base", "gen_tok_s", REGRESSED),
        ("base", "ttft_ms", NO_CHANGE),
    ]
    assert comparison.summary() == "1 regressed, 2 no change"


def test_passed_to_xfailed_oom_is_a_regression() -> None:
    base = report(result(gen_tok_s=FAST))
    oom = {"kind": "oom", "message": "cudaMalloc failed: out of memory\nmore"}
    new = report(result(outcome="xfailed", failure=oom))
    row = only(run_compare(base, new), "outcome")
    assert row.verdict == REGRESSED
    assert (row.base_outcome, row.new_outcome) == ("passed", "xfailed (oom)")
    assert row.reason == "passed → xfailed (oom): cudaMalloc failed: out of memory"


@pytest.mark.parametrize("outcome", ["failed", "error", "skipped"])
def test_passed_to_not_passing_is_a_regression(outcome: str) -> None:
    comparison = run_compare(report(result(gen_tok_s=FAST)), report(result(outcome=outcome)))
    assert only(comparison, "outcome").verdict == REGRESSED
    assert comparison.regressed


def test_missing_from_new_report_is_a_regression() -> None:
    base = report(result(gen_tok_s=FAST), result("C7", gen_tok_s=FAST))
    comparison = run_compare(base, report(result(gen_tok_s=FAST)))
    row = only(comparison, "outcome", config="C7")
    assert (row.verdict, row.new_outcome) == (REGRESSED, None)
    assert "missing" in row.reason
    assert "missing" in render(comparison)


def test_outcome_changes_that_are_not_regressions() -> None:
    base = report(
        result("failing", outcome="failed"),
        result("skipped", outcome="skipped"),
        result("xfail", outcome="xfailed", failure={"kind": "oom", "message": "x"}),
    )
    new = report(
        result("failing", gen_tok_s=FAST),
        result("skipped", gen_tok_s=FAST),
        result("xfail", outcome="xfailed", failure={"kind": "oom", "message": "x"}),
        result("added", gen_tok_s=FAST),
    )
    comparison = run_compare(base, new)
    verdicts = {r.config: r.verdict for r in comparison.rows}
    assert verdicts == {"failing": IMPROVED, "skipped": NEW, "xfail": NO_CHANGE, "added": NEW}
    assert not comparison.regressed


def test_newly_failing_after_skip_is_a_regression() -> None:
    comparison = run_compare(report(result(outcome="skipped")), report(result(outcome="failed")))
    assert only(comparison, "outcome").verdict == REGRESSED


def test_metric_selection() -> None:
    base = report(result(gen_tok_s=FAST, ttft_ms=TTFT, e2e_ms=TTFT))
    new = report(result(gen_tok_s=SLOW, ttft_ms=TTFT, e2e_ms=TTFT))
    comparison = run_compare(base, new, metrics=["ttft_ms"])
    assert [r.metric for r in comparison.rows] == ["ttft_ms"]
    assert not comparison.regressed
    with pytest.raises(ConfigError, match=r"'e2e_ms' has no tolerance.*--tolerance e2e_ms:\+10%"):
        run_compare(base, new, metrics=["e2e_ms"])
    with pytest.raises(ConfigError, match="neither report has a metric 'gen_toks'"):
        run_compare(base, new, metrics=["gen_toks"], tolerances=Tolerances(["gen_toks:+1%"]))
    assert [r.metric for r in run_compare(base, new, tolerances=Tolerances(["e2e_ms:+5%"])).rows] == [
        "e2e_ms",
        "gen_tok_s",
        "ttft_ms",
    ]


def test_unfinished_run_is_noted() -> None:
    new = {**report(result(gen_tok_s=FAST)), "finished": False}
    comparison = run_compare(report(result(gen_tok_s=FAST)), new)
    assert comparison.notes == ("new.json is from an unfinished run (finished: false)",)
    assert "WARNING: new.json is from an unfinished run" in render(comparison)


# -- fingerprints -----------------------------------------------------------------


def test_fingerprint_mismatch_refuses_by_default() -> None:
    base = report(result(gen_tok_s=FAST))
    new = report(result(gen_tok_s=FAST), gpu="NVIDIA A100", build="b2-1234567", sha="bb", cpu="Xeon")
    with pytest.raises(FingerprintMismatch) as info:
        run_compare(base, new)
    message = str(info.value)
    for field in ("gpus", "llama_cpp_builds", "models.smollm2.sha256", "host.cpu"):
        assert field in message
    assert "NVIDIA H100 80GB HBM3 → NVIDIA A100" in message
    assert "--llamabench-fingerprint=warn" in message
    assert isinstance(info.value, ConfigError)


def test_fingerprint_warn_flags_rows() -> None:
    base = report(result(gen_tok_s=FAST), result("C7", gen_tok_s=FAST))
    new = report(result(gen_tok_s=FAST, threads=4), result("C7", gen_tok_s=FAST))
    comparison = run_compare(base, new, fingerprint="warn")
    assert [str(m) for m in comparison.mismatches] == ["configs.base.threads: 2 → 4"]
    flags = {r.config: r.fingerprint_differs for r in comparison.rows}
    assert flags == {"base": True, "C7": False}
    text = render(comparison)
    assert text.startswith("WARNING: fingerprints differ")
    assert "no change*" in text
    assert not comparison.regressed


def test_same_fingerprint_has_no_mismatches() -> None:
    comparison = run_compare(report(result(gen_tok_s=FAST)), report(result(gen_tok_s=SLOW)))
    assert comparison.mismatches == ()
    assert "WARNING" not in render(comparison)


# -- loading ----------------------------------------------------------------------


def _benchmark(name: str, extra: dict[str, Any], data: list[float] | None = None) -> dict[str, Any]:
    stats: dict[str, Any] = {"min": 0.9, "max": 1.2, "mean": 1.0, "median": 1.0, "stddev": 0.1, "iqr": 0.1, "rounds": 5}
    if data is not None:
        stats["data"] = data
    return {"group": None, "name": name, "fullname": f"tests/test_b.py::{name}", "params": None,
            "stats": stats, "extra_info": extra}  # fmt: skip


def _pytest_benchmark(*benchmarks: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine_info": {"node": "ci", "cpu": {"brand_raw": "EPYC"}},
        "commit_info": {"id": "abc"},
        "benchmarks": list(benchmarks),
        "datetime": "2025-01-01T00:00:00",
        "version": "5.1.0",
    }


def test_pytest_benchmark_json(tmp_path: Path) -> None:
    nested = _benchmark("test_workload[base-short]", {"llamabench": result(gen_tok_s=FAST)})
    flat_extra = {"config": "C7", "workload": "short", "outcome": "passed", "gen_tok_s": SLOW}
    flat = _benchmark("test_workload[C7-short]", flat_extra)
    plain = _benchmark("test_tokenize[long]", {}, data=[0.010, 0.011, 0.012, 0.010, 0.013])
    summary_only = _benchmark("test_detok", {})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_pytest_benchmark(nested, flat, plain, summary_only)))
    loaded = RunReport.load(path)
    results = loaded.index()
    assert loaded.kind == "pytest-benchmark"
    assert Fingerprint.of(loaded).host_cpu == "EPYC"
    assert results[("base", "short")].samples("gen_tok_s") == tuple(FAST)
    assert results[("base", "short")].threads == 2
    assert results[("C7", "short")].samples("gen_tok_s") == tuple(SLOW)
    assert results[("test_tokenize", "long")].samples("time_s") == (0.010, 0.011, 0.012, 0.010, 0.013)
    assert results[("test_detok", "-")].samples("time_s") == (1.0,)


def test_pytest_benchmark_time_regression() -> None:
    base = RunReport.from_dict(_pytest_benchmark(_benchmark("test_tok", {}, data=[1.0, 1.01, 0.99, 1.02, 1.0])))
    new = RunReport.from_dict(_pytest_benchmark(_benchmark("test_tok", {}, data=[1.2, 1.21, 1.19, 1.22, 1.18])))
    comparison = compare(base, new)
    assert [(r.config, r.metric, r.verdict) for r in comparison.rows] == [("test_tok", "time_s", REGRESSED)]
    base = RunReport.from_dict(_pytest_benchmark(_benchmark("test_tok", {})))
    assert "--benchmark-save-data" in compare(base, base).rows[0].reason


BAD_SAMPLES = {**result(), "metrics": {"gen_tok_s": {"samples": ["fast"]}}}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", "not valid JSON"),
        ("[1, 2]", "not a pytest-llamabench report nor a pytest-benchmark JSON"),
        ('{"schema_version": 9, "results": []}', "schema_version 9 is not supported"),
        ('{"schema_version": 1, "results": [{"config": "a"}]}', r"results\[0\]: 'config' and 'workload'"),
        (json.dumps(report(BAD_SAMPLES)), r"results\[0\]\.metrics\.gen_tok_s: expected a list"),
        (json.dumps(report(result(outcome="weird"))), r"results\[0\]\.outcome: 'weird'"),
    ],
)
def test_load_report_errors(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        RunReport.load(path)
    assert str(path) in str(info.value)


def test_load_report_duplicate_pair(tmp_path: Path) -> None:
    # RunReport reads a report with a (config, workload) twice; the gate refuses to compare it
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report(result(), result())))
    with pytest.raises(ConfigError, match="two results for config 'base'") as info:
        load_report(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="two results for config 'base'"):
        compare(RunReport.load(path), RunReport.load(path))


def test_load_report_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such report"):
        RunReport.load(tmp_path / "nope.json")


# -- rendering and CLI ------------------------------------------------------------


def test_markdown_render() -> None:
    base = report(*starts(gen_tok_s=FAST), result("C7", gen_tok_s=FAST))
    new = report(*starts(gen_tok_s=SLOW), result("C7", outcome="xfailed", failure={"kind": "oom", "message": "m"}))
    text = render(run_compare(base, new), "markdown")
    lines = text.splitlines()
    assert "| config | workload | metric | base | new | ratio | p | verdict | note |" in lines
    oom_row = "| C7 | short | outcome | passed | xfailed (oom) | — | — | regressed |"
    assert any(line.startswith(oom_row) for line in lines)
    assert any(line.startswith("| base | short | gen_tok_s | 66.10 | 60.10 | 0.909 [") for line in lines)
    assert "**2 regressed**" in lines
    with pytest.raises(ValueError):
        render(run_compare(base, new), "html")


def _write(tmp_path: Path, name: str, data: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    base = _write(tmp_path, "base.json", report(*starts(gen_tok_s=FAST, ttft_ms=TTFT)))
    same = _write(tmp_path, "same.json", report(*starts(gen_tok_s=FAST, ttft_ms=TTFT)))
    slow = _write(tmp_path, "slow.json", report(*starts(gen_tok_s=SLOW, ttft_ms=TTFT)))
    other_gpu = _write(tmp_path, "gpu.json", report(result(gen_tok_s=FAST), gpu="NVIDIA A100"))

    assert main(["compare", base, same]) == 0
    assert "2 no change" in capsys.readouterr().out
    assert main(["compare", base, slow]) == 1
    assert "1 regressed, 1 no change" in capsys.readouterr().out
    assert main(["compare", base, slow, "--tolerance", "gen_tok_s:-10%"]) == 0
    assert main(["compare", base, slow, "--tolerance", "base/short/gen_tok_s:-10%"]) == 0
    assert main(["compare", base, slow, "--metrics", "ttft_ms"]) == 0
    assert main(["compare", base, slow, "--alpha", "0.001"]) == 0  # inconclusive does not fail
    capsys.readouterr()

    assert main(["compare", base, other_gpu]) == 2
    assert "--llamabench-fingerprint=warn" in capsys.readouterr().err
    assert main(["compare", base, other_gpu, "--fingerprint", "warn"]) == 0
    assert main(["compare", base, str(tmp_path / "missing.json")]) == 2
    assert "no such report" in capsys.readouterr().err
    for bad in (["--tolerance", "gen_tok_s=5"], ["--alpha", "2"], ["--fingerprint", "maybe"], ["--metrics", ","]):
        with pytest.raises(SystemExit) as info:
            main(["compare", base, same, *bad])
        assert info.value.code == 2


def test_cli_markdown_and_step_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base = _write(tmp_path, "base.json", report(*starts(gen_tok_s=FAST)))
    slow = _write(tmp_path, "slow.json", report(*starts(gen_tok_s=SLOW)))
    assert main(["compare", base, slow, "--markdown"]) == 1
    out = capsys.readouterr().out
    assert "| base | short | gen_tok_s |" in out
    written = summary.read_text()
    assert written.startswith("earlier step\n### llamabench:")
    assert "**1 regressed**" in written


def test_one_start_per_side_cannot_call_a_change_within_start_noise() -> None:
    # -9 %, no overlap between the repetitions: a regression of repetitions, but two fresh
    # servers of one config differ by that much: with one start per side it is inconclusive
    comparison = run_compare(report(result(gen_tok_s=FAST)), report(result(gen_tok_s=SLOW)))
    row = only(comparison, "gen_tok_s")
    assert (row.verdict, row.units) == (INCONCLUSIVE, "repetitions")
    assert "cannot tell it from start-to-start noise" in row.reason and "--llamabench-restarts" in row.reason
    assert row.mde is not None and row.mde > 0.3  # one start a side: only large changes are visible
    halved = [v / 2 for v in FAST]
    assert only(run_compare(report(result(gen_tok_s=FAST)), report(result(gen_tok_s=halved))), "gen_tok_s").verdict == REGRESSED


def test_starts_are_the_unit_and_the_detectable_change_shrinks_with_them() -> None:
    def mde(n: int) -> float:
        spread = [66.0, 70.0, 63.0, 68.0, 65.0, 69.0, 64.0, 67.0][:n]
        row = only(run_compare(report(*starts(gen_tok_s=spread)), report(*starts(gen_tok_s=spread))), "gen_tok_s")
        assert row.units == "starts" and row.n_base == n and "detects ≥" in row.reason
        assert row.mde is not None
        return row.mde

    assert mde(8) < mde(4) < mde(2)


def test_a_change_measured_on_a_busy_host_is_not_a_regression() -> None:
    busy = [{**r, "host_load": {"busy": True, "other_cores": 0.98}} for r in starts(gen_tok_s=SLOW)]
    row = only(run_compare(report(*starts(gen_tok_s=FAST)), report(*busy)), "gen_tok_s")
    assert row.verdict == INCONCLUSIVE and "new run was measured on a busy host" in row.reason
