"""How far each metric may move before the gate calls it a change: ``[CONFIG/[WORKLOAD/]]METRIC:±N[%]``.

Defaults come from ``metrics.DEFAULT_TOLERANCES``; a metric's bad direction from
``metrics.higher_is_better``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.metrics import DEFAULT_TOLERANCES, GEN_TOK_S, TTFT_MS, higher_is_better

TOLERANCE_FLAG = "--llamabench-tolerance"
TOLERANCE_HELP = (
    "write [CONFIG/[WORKLOAD/]]METRIC:±N% (relative) or METRIC:±N (absolute, in the metric's "
    f"units), e.g. {GEN_TOK_S}:-5%, C7/{TTFT_MS}:+10% or C7/short/{GEN_TOK_S}:-2%"
)
_TOLERANCE_RE = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)(%?)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.*-][A-Za-z0-9_.:*+-]*$")
METRIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ToleranceError(ConfigError, argparse.ArgumentTypeError):
    """A tolerance spec is malformed; argparse shows the message as-is when used as ``type=``."""


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


def parse_tolerance(text: str, *, where: str = TOLERANCE_FLAG) -> ToleranceRule:
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
    if not METRIC_RE.match(metric) or not all(_NAME_RE.match(s) for s in scope):
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
    raise ToleranceError(f"{_prefix(where)}{text!r} is not a tolerance ({why}); {TOLERANCE_HELP}")


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


class Tolerances:
    """Tolerance per metric: defaults, overridden per config, then per config×workload."""

    def __init__(self, rules: Iterable[ToleranceRule | str] = (), *, defaults: bool = True) -> None:
        self._rules: dict[tuple[str | None, str | None, str], ToleranceRule] = {}
        for spec in DEFAULT_TOLERANCES if defaults else ():
            self.add(spec)
        for rule in rules:
            self.add(rule)

    def add(self, rule: ToleranceRule | str, *, where: str = TOLERANCE_FLAG) -> None:
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
                        f"{here}: tables nest at most two levels (config, then workload); {TOLERANCE_HELP}"
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


__all__ = ["Tolerance", "ToleranceError", "ToleranceRule", "Tolerances", "parse_tolerance"]
