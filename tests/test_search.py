"""The search algorithm (plain unit tests of ``search.Search``: the launches are stand-ins that
raise the real OOM exception past a memory limit; the end-to-end search with real servers is in
tests/test_search_e2e.py, the GPU one in scripts/gpu-session.sh)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.config import load_matrix
from pytest_llamabench.errors import ServerExited, ServerOutOfMemory
from pytest_llamabench.results import ResultEntry
from pytest_llamabench.search import NothingFits, Search, SearchFailed
from pytest_llamabench.stats import Summary

HEAD = '[models.m]\npath = "m.gguf"\n[defaults]\nmodel = "m"\nctx = 512\n'


def config(tmp_path: Path, search: str, gpu: bool = True) -> Any:
    path = tmp_path / "m.toml"
    limit = "" if gpu else 'memory_limit = "1GiB"\n'
    path.write_text(HEAD + f"[configs.S]\ngpu = {str(gpu).lower()}\n{limit}n_gpu_layers = 99\nsearch = {search}\n")
    return load_matrix([path]).configs["S"]


@dataclasses.dataclass
class Machine:
    """Stands in for launches: a probe needs ``memory(value)`` and fails past ``limit``."""

    key: str
    limit: float
    memory: Any
    speed: Any
    launched: list[Any] = dataclasses.field(default_factory=list)
    live: int = 0

    @contextlib.contextmanager
    def launch(self, probe: Any) -> Iterator[Any]:
        self.launched.append(probe.server.get(self.key, probe.server.get("fit")))
        if probe.server.get("fit") == "on":
            value = None
        else:
            value = probe.server[self.key]
            if self.memory(value) > self.limit:
                raise ServerOutOfMemory("out of memory", device="gpu", requested_mib=self.memory(value), buffer="model")
        self.live += 1
        try:
            yield value
        finally:
            self.live -= 1

    def measure(self, value: int | None) -> ResultEntry:
        speed = self.speed(value) if value is not None else 50.0
        return ResultEntry("t", "S", "short", metrics={"gen_tok_s": Summary.of([speed * f for f in (0.99, 1.0, 1.01)]),
                                                        "vram_peak_mib": Summary.of([self.memory(value or 0)])})  # fmt: skip


def test_fastest_that_fits_finds_the_edge_and_picks_the_fastest_neighbour_beyond_noise(tmp_path: Path) -> None:
    cfg = config(tmp_path, '{ n_cpu_moe = "fastest-that-fits" }')
    machine = Machine("n_cpu_moe", limit=16000, memory=lambda n: 2000 + (40 - n) * 500, speed=lambda n: 100 - n)
    result = Search(cfg, launch=machine.launch, measure=machine.measure, n_layer=40, log=lambda _: None).run()
    assert result.edge == 12  # 2000 + 28 * 500 = 16000 fits, 11 does not
    assert result.chosen == 12 and result.verdict is not None and "tie within noise" in result.verdict["line"]
    assert [p.value for p in result.probes][-1] == "fit" and result.fit_probe is not None
    assert {p.value: p.outcome for p in result.probes}[11] == "oom" and machine.live == 0
    oom = next(p for p in result.probes if p.outcome == "oom")
    assert oom.failure is not None and oom.failure["buffer"] == "model" and oom.failure["requested_mib"] > 16000
    curve = result.as_dict()["curve"]
    assert [c["value"] for c in curve] == sorted(c["value"] for c in curve) and "fit" not in [c["value"] for c in curve]


def test_a_good_plan_makes_the_search_cheap(tmp_path: Path) -> None:
    cfg = config(tmp_path, '{ n_cpu_moe = "fastest-that-fits", neighbours = 0, compare_fit = false }')
    machine = Machine("n_cpu_moe", limit=16000, memory=lambda n: 2000 + (40 - n) * 500, speed=lambda n: 100 - n)

    @dataclasses.dataclass
    class Plan:  # model.plan.MemoryPlan's fields the search reads
        fits: bool
        gpu_total: int = 0
        host_total: int = 0

    planner = lambda probe: Plan(2000 + (40 - probe.server["n_cpu_moe"]) * 500 <= 16000)  # noqa: E731
    result = Search(cfg, launch=machine.launch, measure=machine.measure, planner=planner, n_layer=40,
                    log=lambda _: None).run()  # fmt: skip
    assert result.edge == 12 and machine.launched == [12, 11]  # the predicted edge and one beyond it
    wrong = lambda probe: Plan(probe.server["n_cpu_moe"] >= 30)  # noqa: E731  a pessimistic plan: more probes
    machine.launched.clear()
    again = Search(cfg, launch=machine.launch, measure=machine.measure, planner=wrong, n_layer=40, log=lambda _: None).run()
    assert again.edge == 12 and machine.launched[0] == 30 and len(machine.launched) <= 12  # 2 log2(41)


def test_largest_that_fits_over_ctx_takes_the_edge(tmp_path: Path) -> None:
    cfg = config(tmp_path, '{ ctx = "largest-that-fits", min = 1024, max = 65536, step = 1024 }', gpu=False)
    machine = Machine("ctx", limit=3000, memory=lambda c: 100 + c * 0.07, speed=lambda c: 80.0)
    result = Search(cfg, launch=machine.launch, measure=machine.measure, log=lambda _: None).run()
    assert result.edge == result.chosen == 40960 and result.fit_probe is None  # 100 + 41984 * .07 > 3000
    assert len(result.probes) <= 8


def test_every_probe_oom_is_one_clear_error_with_the_probes_kept(tmp_path: Path) -> None:
    cfg = config(tmp_path, '{ n_cpu_moe = "fastest-that-fits" }')
    machine = Machine("n_cpu_moe", limit=1000, memory=lambda n: 2000 + (40 - n) * 500, speed=lambda n: 1.0)
    with pytest.raises(NothingFits) as info:
        Search(cfg, launch=machine.launch, measure=machine.measure, n_layer=40, budget="VRAM budget 1 GiB",
               log=lambda _: None).run()  # fmt: skip
    assert "S: nothing fits: even n_cpu_moe = 40 (the least memory in the range) ran out of memory" in str(info.value)
    assert "VRAM budget 1 GiB" in str(info.value)
    kept: Any = info.value.context["search"]
    assert all(p.outcome == "oom" for p in kept.probes) and 40 in [p.value for p in kept.probes]


def test_a_probe_that_fails_for_another_reason_stops_the_search(tmp_path: Path) -> None:
    cfg = config(tmp_path, '{ n_cpu_moe = "fastest-that-fits" }')

    @contextlib.contextmanager
    def broken(probe: Any) -> Iterator[Any]:
        raise ServerExited("llama-server exited (exit status 1): bad flag")
        yield

    with pytest.raises(SearchFailed, match="only running out of memory marks an edge"):
        Search(cfg, launch=broken, measure=lambda r: r, n_layer=40, log=lambda _: None).run()
