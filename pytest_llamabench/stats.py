"""Summaries of samples: the statistics every metric of a result carries."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pytest_llamabench.errors import ConfigError


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), like numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclasses.dataclass(frozen=True)
class Summary:
    """One metric over the repetitions of a result: the raw samples and their statistics."""

    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Iterable[float]) -> Summary:
        return cls(tuple(float(v) for v in samples))

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def max(self) -> float | None:
        return max(self.samples) if self.samples else None

    def as_dict(self) -> dict[str, Any]:
        values = list(self.samples)
        if not values:
            return {"n": 0, "samples": []}
        return {
            "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "stddev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "iqr": percentile(values, 75) - percentile(values, 25),
            "min": min(values),
            "max": max(values),
            "n": len(values),
            "samples": values,
        }

    @classmethod
    def from_json(cls, value: object, where: str) -> Summary:
        """A summary object (its samples, else its median), a list of numbers, or one number."""
        if isinstance(value, Mapping):
            value = value.get("samples") or ([value["median"]] if value.get("median") is not None else [])
        if is_number(value):
            value = [value]
        if value is None:
            return cls(())
        if not isinstance(value, list) or not all(is_number(v) and math.isfinite(v) for v in value):
            raise ConfigError(f"{where}: expected a list of finite numbers, got {value!r:.80}")
        return cls.of(value)
