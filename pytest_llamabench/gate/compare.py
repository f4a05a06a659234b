"""Noise-aware regression gate over two benchmark reports.

``python -m pytest_llamabench compare BASE.json NEW.json`` reads two reports (ours, or
pytest-benchmark's ``--benchmark-json``), and for every (config, workload, metric)
compares the raw samples of both sides:

* a two-sided Mann-Whitney U test (exact for small samples without ties, normal
  approximation with tie correction otherwise) says whether the change is real;
* a tolerance on the ratio of medians (``gen_tok_s:-5%``) says whether it matters;
* a bootstrap confidence interval of that ratio can confirm "no change".

Verdicts: ``regressed`` (past tolerance in the bad direction and significant),
``improved`` (past tolerance in the good direction and significant), ``no change``
(within tolerance, or the CI lies within it), ``inconclusive`` (past tolerance but not
significant, or too few samples), ``new`` (no baseline to compare with). A result that
passed in the base and now fails, errors, xfails, is skipped or is missing is a
``regressed`` row of metric ``outcome``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.measure.stats import higher_is_better, percentile

REGRESSED = "regressed"
IMPROVED = "improved"
NO_CHANGE = "no change"
INCONCLUSIVE = "inconclusive"
NEW = "new"
#: Verdicts in the order the summary line lists them.
VERDICTS = (REGRESSED, IMPROVED, INCONCLUSIVE, NEW, NO_CHANGE)

OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped", "error")
_OK = frozenset({"passed", "xpassed"})
_FAILING = frozenset({"failed", "error"})

FINGERPRINT_POLICIES = ("refuse", "warn")
#: Global tolerances used unless overridden (``time_s`` covers plain pytest-benchmark entries).
DEFAULT_TOLERANCES = (
    "gen_tok_s:-5%",
    "prompt_tok_s:-10%",
    "ttft_ms:+15%",
    "vram_peak_mib:+2%",
    "rss_peak_mib:+5%",
    "time_s:+10%",
)
SCHEMA_VERSION = 1
#: Below this many samples on either side no test or interval is computed.
MIN_SAMPLES = 3
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Largest per-side sample size for the exact Mann-Whitney distribution.
_EXACT_MAX = 50

_TOLERANCE_FLAG = "--llamabench-tolerance"
_TOLERANCE_HELP = (
    "write [CONFIG/[WORKLOAD/]]METRIC:±N% (relative) or METRIC:±N (absolute, in the metric's "
    "units), e.g. gen_tok_s:-5%, C7/ttft_ms:+10% or C7/short/gen_tok_s:-2%"
)
_DEFAULTS_HELP = " ".join(DEFAULT_TOLERANCES).replace("%", "%%")
_TOLERANCE_RE = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)(%?)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.*-][A-Za-z0-9_.:*+-]*$")
_METRIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class FingerprintMismatch(ConfigError):
    """The two reports were measured on different hardware, builds, models or threads."""

    kind = "fingerprint"


class ToleranceError(ConfigError, argparse.ArgumentTypeError):
    """A tolerance spec is malformed; argparse shows the message as-is when used as ``type=``."""


# -- statistics -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MannWhitney:
    """``u`` is the statistic of the first sample (as scipy reports it)."""

    u: float
    p_value: float
    method: str  # "exact" | "asymptotic"


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> MannWhitney:
    """Two-sided Mann-Whitney U test of ``a`` against ``b``.

    Exact when there are no ties and each side has at most 50 values; otherwise the
    normal approximation with tie correction and continuity correction (scipy's
    ``method="asymptotic"``).
    """
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("Mann-Whitney U needs at least one value on each side")
    ranks, tie_sizes = _midranks([*a, *b])
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    u_big = max(u1, n1 * n2 - u1)
    if not tie_sizes and max(n1, n2) <= _EXACT_MAX:
        counts = _u_counts(n1, n2)
        tail = sum(counts[round(u_big) :]) / math.comb(n1 + n2, n1)
        return MannWhitney(u1, min(1.0, 2 * tail), "exact")
    n = n1 + n2
    tie_term = sum(t**3 - t for t in tie_sizes)
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return MannWhitney(u1, 1.0, "asymptotic")
    z = (u_big - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return MannWhitney(u1, min(1.0, math.erfc(z / math.sqrt(2))), "asymptotic")


def _midranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """1-based ranks with ties sharing their mean rank, and the sizes of tie groups (>1)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    ties: list[int] = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        if end > start:
            ties.append(end - start + 1)
        start = end + 1
    return ranks, ties


@functools.lru_cache(maxsize=256)
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """How many orderings of m + n distinct values give each U in 0..m*n.

    These are the coefficients of the Gaussian binomial (m+n choose m)_q, built as
    prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i); terms above degree m*n never feed back.
    """
    top = m * n
    coeffs = [1] + [0] * top
    for i in range(1, m + 1):
        for j in range(top, n + i - 1, -1):  # times (1 - q^(n+i))
            coeffs[j] -= coeffs[j - n - i]
        for j in range(i, top + 1):  # divided by (1 - q^i)
            coeffs[j] += coeffs[j - i]
    return tuple(coeffs)


def min_exact_p(n1: int, n2: int) -> float:
    """The smallest two-sided p-value the exact test can give for these sample sizes."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def min_repetitions(alpha: float = 0.05) -> int:
    """The fewest samples per side at which the exact two-sided MWU test can reach ``alpha``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    n = 1
    while min_exact_p(n, n) > alpha:
        n += 1
    return n


def bootstrap_ratio_ci(
    base: Sequence[float],
    new: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of median(new) / median(base); None if undefined."""
    rng = random.Random(seed)
    ratios: list[float] = []
    for _ in range(resamples):
        base_median = _median(rng.choices(base, k=len(base)))
        new_median = _median(rng.choices(new, k=len(new)))
        if base_median != 0:
            ratios.append(new_median / base_median)
    if not ratios:
        return None
    tail = (1 - confidence) / 2 * 100
    return percentile(ratios, tail), percentile(ratios, 100 - tail)


def _median(values: list[float]) -> float:
    """statistics.median without its overhead (the bootstrap calls this 4000 times a row)."""
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# -- tolerances -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a metric may move in its bad direction before the move counts.

    ``amount`` is a fraction (0.05 for 5%) when ``relative``, else in metric units.
    The same amount in the good direction is what counts as an improvement.
    """

    amount: float
    relative: bool
    higher_is_better: bool

    def band(self, base_median: float) -> tuple[float, float] | None:
        """The ratio (new / base median) range that counts as no change."""
        if self.relative:
            return 1 - self.amount, 1 + self.amount
        if base_median == 0:
            return None
        step = self.amount / abs(base_median)
        return 1 - step, 1 + step

    def __str__(self) -> str:
        sign = "-" if self.higher_is_better else "+"
        return f"{sign}{self.amount * 100:g}%" if self.relative else f"{sign}{self.amount:g}"


@dataclasses.dataclass(frozen=True)
class ToleranceRule:
    """A tolerance for one metric, globally (config None), per config or per config×workload."""

    metric: str
    tolerance: Tolerance
    config: str | None = None
    workload: str | None = None

    def __str__(self) -> str:
        scope = "".join(f"{s}/" for s in (self.config, self.workload) if s is not None)
        return f"{scope}{self.metric}:{self.tolerance}"


def parse_tolerance(text: str, *, where: str = _TOLERANCE_FLAG) -> ToleranceRule:
    """Parse ``[CONFIG/[WORKLOAD/]]METRIC:±N[%]``; usable directly as argparse ``type=``.

    The sign is the direction of allowed change and must be the metric's bad direction
    (``gen_tok_s:-5%``, ``ttft_ms:+10%``); without a sign it is implied.
    """
    head, sep, amount_text = str(text).strip().rpartition(":")
    match = _TOLERANCE_RE.match(amount_text.strip())
    if not sep or not match:
        _tolerance_error(where, text, "expected METRIC:±N% after the last ':'")
    parts = [p.strip() for p in head.split("/")]
    if len(parts) > 3 or not all(parts):
        _tolerance_error(where, text, "expected at most CONFIG/WORKLOAD/ before the metric")
    *scope, metric = parts
    if not _METRIC_RE.match(metric) or not all(_NAME_RE.match(s) for s in scope):
        _tolerance_error(where, text, f"{metric!r} is not a metric name")
    sign, number, percent = match.groups()
    hib = higher_is_better(metric)
    bad_sign = "-" if hib else "+"
    if sign and sign != bad_sign:
        word = "higher" if hib else "lower"
        raise ToleranceError(
            f"{_prefix(where)}{text!r}: {metric} is {word}-is-better, so its tolerance is the allowed "
            f"{'drop' if hib else 'rise'}: write {head}:{bad_sign}{number}{percent}"
        )
    amount = float(number) / (100 if percent else 1)
    return ToleranceRule(
        metric=metric,
        tolerance=Tolerance(amount=amount, relative=bool(percent), higher_is_better=hib),
        config=scope[0] if scope else None,
        workload=scope[1] if len(scope) > 1 else None,
    )


def _tolerance_error(where: str, text: object, why: str) -> NoReturn:
    raise ToleranceError(f"{_prefix(where)}{text!r} is not a tolerance ({why}); {_TOLERANCE_HELP}")


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _cli_tolerance(text: str) -> ToleranceRule:
    """``compare --tolerance``: argparse already names the flag."""
    return parse_tolerance(text, where="")


class Tolerances:
    """Tolerance per metric: defaults, overridden per config, then per config×workload."""

    def __init__(self, rules: Iterable[ToleranceRule | str] = (), *, defaults: bool = True) -> None:
        self._rules: dict[tuple[str | None, str | None, str], ToleranceRule] = {}
        for spec in DEFAULT_TOLERANCES if defaults else ():
            self.add(spec)
        for rule in rules:
            self.add(rule)

    def add(self, rule: ToleranceRule | str, *, where: str = _TOLERANCE_FLAG) -> None:
        """Add a rule (or a spec string); a later rule for the same scope replaces the earlier."""
        if isinstance(rule, str):
            rule = parse_tolerance(rule, where=where)
        self._rules[(rule.config, rule.workload, rule.metric)] = rule

    def update(self, mapping: Mapping[str, Any], *, where: str = "tolerances") -> None:
        """Add rules from a mapping such as a TOML table.

        ``{"gen_tok_s": "-5%", "C7": {"ttft_ms": "+10%", "short": {"gen_tok_s": "-2%"}}}``:
        scalar values are tolerances (a number is absolute), tables scope them to a config
        and then a workload; keys may also be written ``"C7/short/gen_tok_s"``.
        """
        self._update(mapping, (), where)

    def _update(self, mapping: Mapping[str, Any], scope: tuple[str, ...], where: str) -> None:
        for key, value in mapping.items():
            here = f"{where}.{key}"
            if isinstance(value, Mapping):
                if len(scope) >= 2:
                    raise ToleranceError(
                        f"{here}: tables nest at most two levels (config, then workload); "
                        f"{_TOLERANCE_HELP}"
                    )
                self._update(value, (*scope, str(key)), here)
            elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                self.add("/".join((*scope, str(key))) + f":{value}", where=here)
            else:
                _tolerance_error(here, value, "expected a string like '-5%' or a number")

    def get(self, config: str, workload: str, metric: str) -> Tolerance | None:
        for key in ((config, workload, metric), (config, None, metric), (None, None, metric)):
            if key in self._rules:
                return self._rules[key].tolerance
        return None

    def metrics(self) -> frozenset[str]:
        """Every metric some rule mentions: what ``compare`` looks at by default."""
        return frozenset(metric for _, _, metric in self._rules)

    def rules(self) -> list[ToleranceRule]:
        return list(self._rules.values())


# -- reports ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    """One (config, workload) of a report: its outcome and raw samples per metric."""

    config: str
    workload: str
    outcome: str = "passed"
    failure_kind: str | None = None
    failure_message: str | None = None
    threads: int | None = None
    build: str | None = None
    samples: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

    @property
    def outcome_text(self) -> str:
        return f"{self.outcome} ({self.failure_kind})" if self.failure_kind else self.outcome


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What must match for two reports to be comparable; None means unknown."""

    host_cpu: str | None = None
    gpus: tuple[str, ...] | None = None
    builds: tuple[str, ...] | None = None
    models: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> sha256


@dataclasses.dataclass(frozen=True)
class Report:
    """A loaded report. ``kind`` is ``"llamabench"`` or ``"pytest-benchmark"``."""

    source: str
    kind: str
    fingerprint: Fingerprint
    results: Mapping[tuple[str, str], Result]
    finished: bool = True


def load_report(path: str | os.PathLike[str]) -> Report:
    """Read our JSON report or a pytest-benchmark JSON file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: no such report; pass a JSON report written by pytest-llamabench "
            f"or by pytest-benchmark's --benchmark-json"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read the report ({exc}); check the path and permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{file}: not valid JSON ({exc}); was the run interrupted while writing it?"
        ) from None
    return parse_report(data, source=str(file))


def parse_report(data: object, *, source: str = "<report>") -> Report:
    """Build a Report from already-decoded JSON (the plugin can pass its in-memory report)."""
    if isinstance(data, Mapping) and "results" in data and "schema_version" in data:
        return _parse_llamabench(data, source)
    if isinstance(data, Mapping) and "benchmarks" in data and "machine_info" in data:
        return _parse_pytest_benchmark(data, source)
    raise ConfigError(
        f"{source}: not a pytest-llamabench report nor a pytest-benchmark JSON (expected top-level "
        f"keys 'schema_version' and 'results', or 'machine_info' and 'benchmarks'); pass the file "
        f"written by the plugin's JSON report or by --benchmark-json"
    )


def _parse_llamabench(data: Mapping[str, Any], source: str) -> Report:
    version = data["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version {version!r} is not supported (this pytest-llamabench reads "
            f"up to {SCHEMA_VERSION}); upgrade pytest-llamabench to compare it"
        )
    entries = data["results"]
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: results: expected a list of result objects")
    results = [_parse_result(e, f"{source}: results[{i}]") for i, e in enumerate(entries)]
    fingerprint = _parse_fingerprint(data.get("fingerprint"), f"{source}: fingerprint", results)
    return Report(source, "llamabench", fingerprint, _index(results, source), data.get("finished") is not False)


def _parse_pytest_benchmark(data: Mapping[str, Any], source: str) -> Report:
    benchmarks = data["benchmarks"]
    if not isinstance(benchmarks, list):
        raise ConfigError(f"{source}: benchmarks: expected a list of benchmark objects")
    results = [_parse_benchmark(b, f"{source}: benchmarks[{i}]") for i, b in enumerate(benchmarks)]
    machine = _mapping(data["machine_info"])
    fingerprint = _parse_fingerprint(machine.get("llamabench"), f"{source}: machine_info.llamabench", results)
    if fingerprint.host_cpu is None:
        cpu = machine.get("cpu")
        brand = cpu.get("brand_raw") if isinstance(cpu, Mapping) else None
        fingerprint = dataclasses.replace(fingerprint, host_cpu=brand if isinstance(brand, str) else None)
    return Report(source, "pytest-benchmark", fingerprint, _index(results, source))


def _parse_benchmark(bench: object, where: str) -> Result:
    if not isinstance(bench, Mapping):
        raise ConfigError(f"{where}: expected an object with name, stats and extra_info")
    extra = bench.get("extra_info") or {}
    if isinstance(extra, Mapping) and isinstance(extra.get("llamabench"), Mapping):
        return _parse_result(extra["llamabench"], f"{where}.extra_info.llamabench")
    if isinstance(extra, Mapping) and "config" in extra and "workload" in extra:
        return _parse_result(_flat_entry(extra), f"{where}.extra_info")
    name = bench.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: expected the benchmark's test name")
    test, _, params = name.partition("[")
    stats = bench.get("stats")
    if not isinstance(stats, Mapping):
        raise ConfigError(f"{where}.stats: missing; is this a --benchmark-json file?")
    raw = stats.get("data") if stats.get("data") else [stats.get("median")]
    samples = _parse_samples(raw, f"{where}.stats")
    return Result(test, params.rstrip("]") or "-", samples={"time_s": samples})


def _flat_entry(extra: Mapping[str, Any]) -> dict[str, Any]:
    """extra_info with config/workload/outcome and metrics at the top level -> a result entry."""
    reserved = {"config", "workload", "outcome", "failure", "server", "model", "metrics", "test"}
    metrics = dict(extra["metrics"]) if isinstance(extra.get("metrics"), Mapping) else {}
    metrics.update({k: v for k, v in extra.items() if k not in reserved and _looks_like_metric(v)})
    return {**{k: extra[k] for k in reserved & extra.keys()}, "metrics": metrics}


def _looks_like_metric(value: object) -> bool:
    if isinstance(value, Mapping):
        return "samples" in value or "median" in value
    return isinstance(value, list) and all(_is_number(v) for v in value)


def _parse_result(entry: object, where: str) -> Result:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected an object with config, workload, outcome and metrics")
    config, workload = entry.get("config"), entry.get("workload")
    if not isinstance(config, str) or not config or not isinstance(workload, str) or not workload:
        raise ConfigError(f"{where}: 'config' and 'workload' must be non-empty strings")
    outcome = entry.get("outcome", "passed")
    if outcome not in OUTCOMES:
        raise ConfigError(f"{where}.outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
    failure, server = _mapping(entry.get("failure")), _mapping(entry.get("server"))
    metrics = entry.get("metrics") or {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"{where}.metrics: expected an object of metric name -> summary")
    threads = server.get("threads")
    return Result(
        config=config,
        workload=workload,
        outcome=outcome,
        failure_kind=_opt_str(failure.get("kind")),
        failure_message=_opt_str(failure.get("message")),
        threads=threads if isinstance(threads, int) and not isinstance(threads, bool) else None,
        build=_opt_str(server.get("build_info")),
        samples={str(k): _parse_samples(v, f"{where}.metrics.{k}") for k, v in metrics.items()},
    )


def _parse_samples(value: object, where: str) -> tuple[float, ...]:
    """A summary dict (its ``samples``, else its median), a list of numbers, or one number."""
    if isinstance(value, Mapping):
        value = value.get("samples") or ([value["median"]] if value.get("median") is not None else [])
    if _is_number(value):
        value = [value]
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_number(v) and math.isfinite(v) for v in value):
        raise ConfigError(f"{where}: expected a list of finite numbers, got {value!r:.80}")
    return tuple(float(v) for v in value)


def _parse_fingerprint(data: object, where: str, results: Sequence[Result]) -> Fingerprint:
    data = _mapping(data)
    host, models = _mapping(data.get("host")), _mapping(data.get("models"))
    gpus, builds = data.get("gpus"), data.get("llama_cpp_builds")
    result_builds = sorted({r.build for r in results if r.build})
    return Fingerprint(
        host_cpu=_opt_str(host.get("cpu")),
        gpus=tuple(sorted(_gpu_name(g) for g in gpus)) if isinstance(gpus, list) else None,
        # [] means no server started (every config failed to launch): unknown, not another build
        builds=(tuple(sorted(map(str, builds))) if isinstance(builds, list) else ()) or tuple(result_builds) or None,
        models={
            str(name): str(m["sha256"])
            for name, m in models.items()
            if isinstance(m, Mapping) and m.get("sha256")
        },
    )


def _gpu_name(gpu: object) -> str:
    return str(gpu.get("name", "?")) if isinstance(gpu, Mapping) else str(gpu)


def _index(results: Iterable[Result], source: str) -> dict[tuple[str, str], Result]:
    index: dict[tuple[str, str], Result] = {}
    for result in results:
        key = (result.config, result.workload)
        if key in index:
            raise ConfigError(
                f"{source}: two results for config {key[0]!r} × workload {key[1]!r}; "
                f"a report must hold each pair once (was it merged from two runs?)"
            )
        index[key] = result
    return index


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _opt_str(value: object) -> str | None:
    return str(value) if value not in (None, "") else None


# -- fingerprints -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One fingerprint field that differs; ``configs`` None means it affects every row."""

    field: str
    base: str
    new: str
    configs: frozenset[str] | None = None

    def __str__(self) -> str:
        return f"{self.field}: {self.base} → {self.new}"


def fingerprint_mismatches(base: Report, new: Report) -> list[Mismatch]:
    """GPU names, llama.cpp builds, model sha256s, host CPU and server threads that differ."""
    fa, fb = base.fingerprint, new.fingerprint
    found: list[Mismatch] = []
    pairs: list[tuple[str, object, object]] = [
        ("gpus", fa.gpus, fb.gpus),
        ("llama_cpp_builds", fa.builds, fb.builds),
        ("host.cpu", fa.host_cpu, fb.host_cpu),
    ]
    pairs += [(f"models.{m}.sha256", fa.models[m], fb.models[m]) for m in sorted(fa.models.keys() & fb.models.keys())]
    for field, a, b in pairs:
        if a is not None and b is not None and a != b:
            found.append(Mismatch(field, _show(a), _show(b)))
    threads: dict[str, tuple[int, int]] = {}
    for key in sorted(base.results.keys() & new.results.keys()):
        ta, tb = base.results[key].threads, new.results[key].threads
        if ta is not None and tb is not None and ta != tb:
            threads.setdefault(key[0], (ta, tb))
    for config, (ta, tb) in threads.items():
        found.append(Mismatch(f"configs.{config}.threads", str(ta), str(tb), frozenset({config})))
    return found


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) if value else "none"
    return str(value)


# -- comparison -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the comparison: a metric of a (config, workload), or its outcome."""

    config: str
    workload: str
    metric: str
    verdict: str
    reason: str = ""
    base_median: float | None = None
    new_median: float | None = None
    ratio: float | None = None
    p_value: float | None = None
    ci: tuple[float, float] | None = None
    n_base: int = 0
    n_new: int = 0
    tolerance: str = ""
    base_outcome: str | None = None
    new_outcome: str | None = None
    fingerprint_differs: bool = False

    def sort_key(self) -> tuple[str, str, int, str]:
        return self.config, self.workload, self.metric != "outcome", self.metric


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The verdict rows of a comparison, the fingerprint mismatches and banner notes."""

    rows: tuple[Row, ...]
    mismatches: tuple[Mismatch, ...] = ()
    notes: tuple[str, ...] = ()
    alpha: float = 0.05
    base_source: str = "base"
    new_source: str = "new"

    @property
    def regressed(self) -> bool:
        return any(row.verdict == REGRESSED for row in self.rows)

    def counts(self) -> dict[str, int]:
        return {v: n for v in VERDICTS if (n := sum(row.verdict == v for row in self.rows))}

    def summary(self) -> str:
        counts = self.counts()
        return ", ".join(f"{n} {v}" for v, n in counts.items()) if counts else "nothing to compare"

    def render(self, fmt: str = "text") -> str:
        if fmt not in ("text", "markdown"):
            raise ValueError(f"render format must be 'text' or 'markdown', got {fmt!r}")
        return _render(self, markdown=fmt == "markdown")


def compare(
    base: Report,
    new: Report,
    *,
    tolerances: Tolerances | None = None,
    alpha: float = 0.05,
    fingerprint: str = "refuse",
    metrics: Iterable[str] | None = None,
) -> Comparison:
    """Compare ``new`` against ``base``; raises FingerprintMismatch under policy "refuse"."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: {alpha} is not between 0 and 1; use e.g. --alpha 0.05")
    if fingerprint not in FINGERPRINT_POLICIES:
        raise ConfigError(
            f"--llamabench-fingerprint: {fingerprint!r} is not one of {', '.join(FINGERPRINT_POLICIES)}"
        )
    tolerances = Tolerances() if tolerances is None else tolerances
    selected = _select_metrics(base, new, tolerances, metrics)
    mismatches = fingerprint_mismatches(base, new)
    if mismatches and fingerprint == "refuse":
        raise FingerprintMismatch(_refusal(base, new, mismatches))
    rows: list[Row] = []
    for key in sorted(base.results.keys() | new.results.keys()):
        pair = base.results.get(key), new.results.get(key)
        rows += _compare_result(*pair, key, selected, tolerances, alpha, base.kind)
    rows = [_flag(row, mismatches) for row in rows]
    notes = [f"{r.source} is from an unfinished run (finished: false)" for r in (base, new) if not r.finished]
    if mismatches:
        notes.insert(0, "fingerprints differ, rows marked * may not be comparable: " + "; ".join(map(str, mismatches)))
    return Comparison(
        rows=tuple(sorted(rows, key=Row.sort_key)),
        mismatches=tuple(mismatches),
        notes=tuple(notes),
        alpha=alpha,
        base_source=base.source,
        new_source=new.source,
    )


def _select_metrics(base: Report, new: Report, tolerances: Tolerances, metrics: Iterable[str] | None) -> list[str]:
    if metrics is None:
        return sorted(tolerances.metrics())
    chosen = list(dict.fromkeys(metrics))
    measured = {m for report in (base, new) for r in report.results.values() for m in r.samples}
    for metric in chosen:
        if metric not in tolerances.metrics():
            raise ConfigError(
                f"--metrics: {metric!r} has no tolerance; add one, e.g. --tolerance "
                f"{metric}:{'-' if higher_is_better(metric) else '+'}10%"
            )
        if metric not in measured:
            raise ConfigError(
                f"--metrics: neither report has a metric {metric!r}; they have: {', '.join(sorted(measured)) or 'none'}"
            )
    return chosen


def _refusal(base: Report, new: Report, mismatches: Sequence[Mismatch]) -> str:
    lines = "\n".join(f"  {m}" for m in mismatches)
    return (
        f"{base.source} and {new.source} were measured on different setups:\n{lines}\n"
        f"Differences in hardware, build, model or threads would show up as regressions. Compare "
        f"reports from the same setup, or pass --llamabench-fingerprint=warn (compare: --fingerprint "
        f"warn) to compare anyway."
    )


def _flag(row: Row, mismatches: Sequence[Mismatch]) -> Row:
    if any(m.configs is None or row.config in m.configs for m in mismatches):
        return dataclasses.replace(row, fingerprint_differs=True)
    return row


def _compare_result(
    base: Result | None,
    new: Result | None,
    key: tuple[str, str],
    metrics: Sequence[str],
    tolerances: Tolerances,
    alpha: float,
    base_kind: str,
) -> list[Row]:
    if base is not None and new is not None and base.outcome in _OK and new.outcome in _OK:
        rows = []
        for metric in metrics:
            tolerance = tolerances.get(key[0], key[1], metric)
            a, b = base.samples.get(metric, ()), new.samples.get(metric, ())
            if tolerance is not None and (a or b):
                row = compare_samples(a, b, tolerance, alpha=alpha, config=key[0], workload=key[1], metric=metric)
                if base_kind == "pytest-benchmark" and metric == "time_s" and row.n_base < MIN_SAMPLES:
                    row = dataclasses.replace(row, reason=row.reason + " (save samples with --benchmark-save-data)")
                rows.append(row)
        return rows
    verdict, reason = _outcome_verdict(base, new)
    return [
        Row(
            config=key[0],
            workload=key[1],
            metric="outcome",
            verdict=verdict,
            reason=reason,
            base_outcome=base.outcome_text if base else None,
            new_outcome=new.outcome_text if new else None,
        )
    ]


def _outcome_verdict(base: Result | None, new: Result | None) -> tuple[str, str]:
    """Verdict for a (config, workload) whose outcome is not passed on both sides."""
    if base is None:
        return NEW, "not in the base report"
    was = base.outcome_text
    if new is None:
        if base.outcome in _OK:
            return REGRESSED, f"{was} in base, missing from the new report"
        return NO_CHANGE, f"{was} in base, missing from the new report"
    now = new.outcome_text
    message = f": {new.failure_message.splitlines()[0]}" if new.failure_message else ""
    if base.outcome in _OK:
        return REGRESSED, f"{was} → {now}{message}"
    if new.outcome in _OK:
        if base.outcome == "skipped":
            return NEW, f"skipped in base, {now} now (no baseline measurements)"
        return IMPROVED, f"{was} → {now}"
    if new.outcome in _FAILING and base.outcome not in _FAILING:
        return REGRESSED, f"{was} → {now}{message}"
    return NO_CHANGE, f"{was} → {now}" if was != now else f"{now} in both"


def compare_samples(
    base: Sequence[float],
    new: Sequence[float],
    tolerance: Tolerance,
    *,
    alpha: float = 0.05,
    config: str = "",
    workload: str = "",
    metric: str = "",
) -> Row:
    """The verdict for one metric from the raw samples of both sides."""
    row = Row(config, workload, metric, INCONCLUSIVE, n_base=len(base), n_new=len(new), tolerance=str(tolerance))
    if not base:
        return dataclasses.replace(row, verdict=NEW, reason="not measured in the base report",
                                   new_median=statistics.median(new))  # fmt: skip
    if not new:
        return dataclasses.replace(row, reason="not measured in the new report", base_median=statistics.median(base))
    base_median, new_median = statistics.median(base), statistics.median(new)
    row = dataclasses.replace(row, base_median=base_median, new_median=new_median)
    band = tolerance.band(base_median)
    if base_median == 0 or band is None:
        same = new_median == base_median
        return dataclasses.replace(row, verdict=NO_CHANGE if same else INCONCLUSIVE,
                                   reason="both medians are 0" if same else "base median is 0: no ratio")  # fmt: skip
    ratio = new_median / base_median
    row = dataclasses.replace(row, ratio=ratio)
    direction = _direction(ratio, band, tolerance.higher_is_better)
    change = f"{(ratio - 1) * 100:+.1f}%"
    need = min_repetitions(alpha)
    sizes = f"n={len(base)}/{len(new)}"
    if min(len(base), len(new)) < MIN_SAMPLES:
        if direction is None:
            return dataclasses.replace(row, verdict=NO_CHANGE, reason=f"{change} within {tolerance} ({sizes})")
        reason = f"{change} is past {tolerance} but {sizes}: need ≥{need} repetitions per side"
        return dataclasses.replace(row, reason=reason)
    p_value = mann_whitney_u(base, new).p_value
    ci = bootstrap_ratio_ci(base, new, confidence=1 - alpha)
    row = dataclasses.replace(row, p_value=p_value, ci=ci)
    significant = p_value <= alpha
    if direction is not None and significant:
        verdict = REGRESSED if direction == "bad" else IMPROVED
        return dataclasses.replace(row, verdict=verdict, reason=f"{change} is past {tolerance}, p={p_value:.2g}")
    if direction is None:
        return dataclasses.replace(row, verdict=NO_CHANGE, reason=f"{change} within {tolerance}")
    if ci is not None and band[0] <= ci[0] and ci[1] <= band[1]:
        return dataclasses.replace(row, verdict=NO_CHANGE, reason=f"{change}, but its CI is within {tolerance}")
    reason = f"{change} is past {tolerance} but not significant (p={p_value:.2g} > {alpha:g})"
    if min_exact_p(len(base), len(new)) > alpha:
        reason += f": {sizes} can never reach it, need ≥{need} repetitions per side"
    return dataclasses.replace(row, reason=reason)


def _direction(ratio: float, band: tuple[float, float], higher_better: bool) -> str | None:
    """"bad" or "good" when the ratio is outside the band, None when within."""
    if ratio < band[0]:
        return "bad" if higher_better else "good"
    if ratio > band[1]:
        return "good" if higher_better else "bad"
    return None


# -- rendering --------------------------------------------------------------------

_HEADER = ("config", "workload", "metric", "base", "new", "ratio", "p", "verdict", "note")


def _cells(row: Row) -> tuple[str, ...]:
    if row.metric == "outcome":
        base, new = row.base_outcome or "missing", row.new_outcome or "missing"
    else:
        base, new = _num(row.base_median), _num(row.new_median)
    ratio = "—" if row.ratio is None else f"{row.ratio:.3f}"
    if row.ci is not None:
        ratio += f" [{row.ci[0]:.3f}, {row.ci[1]:.3f}]"
    p_value = "—" if row.p_value is None else f"{row.p_value:.3g}"
    verdict = row.verdict + ("*" if row.fingerprint_differs else "")
    return row.config, row.workload, row.metric, base, new, ratio, p_value, verdict, row.reason


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _render(comparison: Comparison, *, markdown: bool) -> str:
    table = [_HEADER, *(_cells(row) for row in comparison.rows)]
    flagged = any(row.fingerprint_differs for row in comparison.rows)
    footer = [
        f"alpha={comparison.alpha:g}: the two-sided Mann-Whitney U test needs ≥"
        f"{min_repetitions(comparison.alpha)} repetitions per side to reach it",
        comparison.summary(),
    ]
    if markdown:
        lines = [f"### llamabench: {comparison.new_source} vs {comparison.base_source}", ""]
        lines += [f"> **Warning:** {note}" for note in comparison.notes]
        lines += [""] if comparison.notes else []
        lines += [_md_line(table[0]), "|" + "---|" * len(_HEADER)]
        lines += [_md_line(cells) for cells in table[1:]]
        lines += ["", *([r"\* measured on a different setup (see the warning)"] if flagged else [])]
        return "\n".join([*lines, footer[0], "", f"**{footer[1]}**", ""])
    widths = [max(len(cells[i]) for cells in table) for i in range(len(_HEADER))]
    lines = [f"WARNING: {note}" for note in comparison.notes]
    for i, cells in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["* measured on a different setup (see the warning)"] if flagged else []
    return "\n".join([*lines, *footer]) + "\n"


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"


# -- command line -----------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``compare`` subcommand to ``python -m pytest_llamabench``."""
    p = subparsers.add_parser(
        "compare",
        help="compare two JSON reports (regression gate for CI)",
        description="Compare NEW against BASE; exit 1 on any regression, 2 on bad input.",
    )
    p.add_argument("base", type=Path, metavar="BASE.json", help="the baseline report")
    p.add_argument("new", type=Path, metavar="NEW.json", help="the report to judge")
    p.add_argument("--tolerance", action="append", type=_cli_tolerance, default=[],
                   metavar="[CONFIG/[WORKLOAD/]]METRIC:±N[%]",
                   help=f"allowed change (repeatable); defaults: {_DEFAULTS_HELP}")  # fmt: skip
    p.add_argument("--alpha", type=_alpha, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--fingerprint", choices=FINGERPRINT_POLICIES, default="refuse",
                   help="when the reports come from different setups: refuse (default) or warn")  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--metrics", type=_metric_list, help="comma-separated metrics (default: all with a tolerance)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command: print the table, write the step summary, gate on regressions."""
    comparison = compare(
        load_report(args.base),
        load_report(args.new),
        tolerances=Tolerances(args.tolerance),
        alpha=args.alpha,
        fingerprint=args.fingerprint,
        metrics=args.metrics,
    )
    print(comparison.render("markdown" if args.markdown else "text"), end="")
    write_step_summary(comparison)
    return 1 if comparison.regressed else 0


def write_step_summary(comparison: Comparison) -> None:
    """Append the markdown table to $GITHUB_STEP_SUMMARY when that is set."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as summary:
            summary.write(comparison.render("markdown") + "\n")
    except OSError as exc:
        print(f"warning: cannot append to GITHUB_STEP_SUMMARY {path}: {exc}", file=sys.stderr)


def _alpha(text: str) -> float:
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not 0 < alpha < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a significance level; use a number in (0, 1), e.g. 0.05")
    return alpha


def _metric_list(text: str) -> list[str]:
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in metrics if not _METRIC_RE.match(m)]
    if not metrics or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is not a metric list; write e.g. gen_tok_s,ttft_ms")
    return metrics
