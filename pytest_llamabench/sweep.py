"""Sweeps and searches in the matrix: one config table becomes many named configs, or a search.

A sweep expands, while the matrix is loaded, into ordinary configs that behave exactly like
hand-written ones (stable ids, ``extends``, thresholds, expected OOM per point)::

    [configs.C2]
    model = "q8_0"
    sweep = { n_cpu_moe = [16, 24, 32, 36] }   # -> C2-ncm16, C2-ncm24, C2-ncm32, C2-ncm36
    expect_oom = [16]                          # per point: a value of a one-key sweep, or a point id

Several keys give their cartesian product, named in the keys' order (``base-ctx4096-ub64``).
``cache_type`` sets K and V together. A search (``search = { n_cpu_moe = "fastest-that-fits" }``)
stays one config; ``pytest_llamabench.search`` runs it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_llamabench.errors import ConfigError

#: Sweepable key -> short name in point ids (``C2-ncm16``).
SWEEP_KEYS: dict[str, str] = {
    "n_cpu_moe": "ncm", "n_gpu_layers": "ngl", "ctx": "ctx", "ubatch": "ub", "batch": "b",
    "cache_type": "kv", "cache_type_k": "ctk", "cache_type_v": "ctv", "threads": "t",
    "threads_batch": "tb", "parallel": "np", "flash_attn": "fa",
}  # fmt: skip
#: Keys a config table may use for sweeps and searches; never inherited through ``extends``.
SWEEP_CONFIG_KEYS = ("sweep", "expect_oom", "search")

#: Search goals: what the search maximizes under "it loads and runs the workload".
GOALS = ("fastest-that-fits", "largest-that-fits")
#: Searchable key -> (goals allowed, direction in which memory grows, needs a GPU).
SEARCH_KEYS: dict[str, tuple[tuple[str, ...], int, bool]] = {
    "n_cpu_moe": (("fastest-that-fits",), -1, True),  # more expert layers on the CPU: less VRAM
    "n_gpu_layers": (("fastest-that-fits",), +1, True),
    "ctx": (("largest-that-fits",), +1, False),
    "ubatch": (("largest-that-fits", "fastest-that-fits"), +1, False),
}


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """Which sweep a config came from and its swept values."""

    sweep: str  # the config table that declared the sweep, e.g. "C2"
    values: Mapping[str, Any]  # swept key -> value of this point

    def as_dict(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "values": dict(self.values)}


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """``search = { KEY = GOAL, min = .., max = .., step = .., neighbours = .., compare_fit = .. }``."""

    key: str
    goal: str
    low: int | None = None  # None: from the model (0 for n_cpu_moe/n_gpu_layers)
    high: int | None = None  # None: from the model (its layer count)
    step: int = 1
    neighbours: int = 2  # fitting points measured beyond the edge (fastest-that-fits)
    compare_fit: bool = True  # also launch --fit on, on a GPU search
    source: str = ""

    @property
    def memory_direction(self) -> int:
        return SEARCH_KEYS[self.key][1]

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


def point_suffix(key: str, value: object) -> str:
    text = str(value).lower() if not isinstance(value, bool) else ("on" if value else "off")
    return f"{SWEEP_KEYS[key]}{text}"


def expand(name: str, values: Mapping[str, Any], where: str, own: Sequence[str] = ()
           ) -> list[tuple[str, dict[str, Any], SweepPoint | None]]:  # fmt: skip
    """``(name, values, point)`` for each config a table declares: itself, or its sweep points.

    ``values`` are the table's keys after defaults and ``extends``; ``own`` the keys the table
    itself sets (a swept key set there too is an error; one from defaults is replaced);
    ``where`` locates the table.
    """
    sweep = values.get("sweep")
    expect_oom = values.get("expect_oom")
    if sweep is None:
        if expect_oom is not None:
            raise ConfigError(f"{where}.expect_oom: only a config with a sweep has points; use expect = \"oom\"")
        return [(name, dict(values), None)]
    if "search" in values:
        raise ConfigError(f"{where}: a config has a sweep or a search, not both; split it into two configs")
    if not isinstance(sweep, Mapping) or not sweep:
        raise ConfigError(f"{where}.sweep: expected a table of key = [values], e.g. sweep = {{ n_cpu_moe = [16, 24] }}")
    axes: list[tuple[str, list[Any]]] = []
    for key, points in sweep.items():
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{where}.sweep.{key}: cannot sweep {key!r}; sweepable keys: {', '.join(SWEEP_KEYS)}")
        if not isinstance(points, list) or not points:
            raise ConfigError(f"{where}.sweep.{key}: expected a non-empty list of values, e.g. [16, 24, 32]")
        suffixes = [point_suffix(key, p) for p in points]
        if len(set(suffixes)) != len(suffixes):
            raise ConfigError(f"{where}.sweep.{key}: a value is listed twice ({points}); list each once")
        if key in own:
            raise ConfigError(f"{where}.{key}: also swept in {where}.sweep; set it in one place")
        axes.append((key, points))
    ids = {_point_id(combo): combo for combo in itertools.product(*[[(k, p) for p in ps] for k, ps in axes])}
    expected = _expected_points(expect_oom, ids, axes, where)
    base = {k: v for k, v in values.items() if k not in SWEEP_CONFIG_KEYS}
    out: list[tuple[str, dict[str, Any], SweepPoint | None]] = []
    for point_id, combo in ids.items():
        point_values = dict(base)
        for key, value in combo:
            if key == "cache_type":
                point_values["cache_type_k"] = point_values["cache_type_v"] = value
            else:
                point_values[key] = value
        if point_id in expected:
            point_values["expect"] = "oom"
        out.append((f"{name}-{point_id}", point_values, SweepPoint(name, dict(combo))))
    return out


def _point_id(combo: Sequence[tuple[str, Any]]) -> str:
    return "-".join(point_suffix(k, v) for k, v in combo)


def _expected_points(expect_oom: object, ids: Mapping[str, Any], axes: Sequence[tuple[str, list[Any]]],
                     where: str) -> set[str]:  # fmt: skip
    if expect_oom is None:
        return set()
    if not isinstance(expect_oom, list):
        raise ConfigError(f"{where}.expect_oom: expected a list of points, e.g. expect_oom = [16] or [\"ncm16\"]")
    out = set()
    for item in expect_oom:
        if isinstance(item, str) and item in ids:
            out.add(item)
        elif len(axes) == 1 and item in axes[0][1]:
            out.add(point_suffix(axes[0][0], item))
        else:
            raise ConfigError(f"{where}.expect_oom: {item!r} is not a point of the sweep; points: {', '.join(ids)}")
    return out


def search_spec(values: Mapping[str, Any], where: str, *, gpu: bool, memory_limit: bool = False) -> SearchSpec | None:
    """The validated ``search`` table of a config, or None."""
    table = values.get("search")
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}.search: expected a table, e.g. search = {{ n_cpu_moe = \"fastest-that-fits\" }}")
    options = {"min", "max", "step", "neighbours", "compare_fit"}
    keys = [k for k in table if k not in options]
    if len(keys) != 1:
        raise ConfigError(f"{where}.search: name exactly one key to search, e.g. n_cpu_moe = \"fastest-that-fits\"; "
                          f"got {keys or 'none'}; searchable: {', '.join(SEARCH_KEYS)}")  # fmt: skip
    key = keys[0]
    if key not in SEARCH_KEYS:
        raise ConfigError(f"{where}.search.{key}: cannot search {key!r}; searchable keys: {', '.join(SEARCH_KEYS)}")
    goals, _, needs_gpu = SEARCH_KEYS[key]
    goal = table[key]
    if goal not in goals:
        raise ConfigError(f"{where}.search.{key}: {goal!r} is not a goal for {key}; use {' or '.join(map(repr, goals))}")
    if needs_gpu and not gpu:
        raise ConfigError(f"{where}.search.{key}: searching {key} needs gpu = true (without a GPU every layer is on "
                          f"the CPU already); set gpu = true, or search ctx/ubatch, which fit in host memory")  # fmt: skip
    ints = {}
    for option, minimum in (("min", 0), ("max", 0), ("step", 1), ("neighbours", 0)):
        value = table.get(option)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ConfigError(f"{where}.search.{option}: must be an integer >= {minimum}, got {value!r}")
        ints[option] = value
    if not gpu and not memory_limit:
        raise ConfigError(f"{where}.search: a search without a GPU runs servers up to the memory limit, and on the bare "
                          "host the kernel's OOM killer would pick any process; run it in a container with a limit: "
                          "set image and memory_limit (e.g. memory_limit = \"1GiB\"), or gpu = true")  # fmt: skip
    if key in ("ctx", "ubatch") and (ints["min"] is None or ints["max"] is None):
        raise ConfigError(f"{where}.search: searching {key} needs min and max, e.g. min = 4096, max = 1048576")
    if ints["min"] is not None and ints["max"] is not None and ints["min"] >= ints["max"]:
        raise ConfigError(f"{where}.search: min ({ints['min']}) must be below max ({ints['max']})")
    compare_fit = table.get("compare_fit", True)
    if not isinstance(compare_fit, bool):
        raise ConfigError(f"{where}.search.compare_fit: expected true or false")
    return SearchSpec(key, goal, ints["min"], ints["max"], ints["step"] or 1,
                      2 if ints["neighbours"] is None else ints["neighbours"], compare_fit and needs_gpu, where)  # fmt: skip


__all__ = ["GOALS", "SEARCH_KEYS", "SWEEP_KEYS", "SearchSpec", "SweepPoint", "expand", "search_spec"]
