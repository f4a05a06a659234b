"""Auto-fit search: real launches find where a config stops fitting, then the fastest point.

``search = { n_cpu_moe = "fastest-that-fits" }`` (``sweep.SearchSpec``) searches one integer
server key whose memory grows in one direction (fewer expert layers on the CPU, more GPU
layers, a bigger ctx or ubatch). The memory plan (``model.plan``) predicts the edge; real
launches under the VRAM budget (or the container's memory limit, or the host's memory) check
it: the first probe is the predicted edge, then the search gallops and bisects toward the real
one. Every probe is a fresh server, torn down before the next (``with launch(...)``), and
every probe's outcome is kept: OOM with the classified buffer and size, or fit with VRAM, RSS
and tok/s. ``fastest-that-fits`` then measures up to ``neighbours`` fitting points beyond the
edge and names the fastest with the noise model of ``outputs.winner`` (a winner only beyond
noise); ``largest-that-fits`` takes the edge. A GPU search also launches ``--fit on`` once,
in the same run, for comparison.

Plain and pytest-free: ``Search(config, launch=bench.launch, measure=…, planner=…).run()``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, ContextManager

from pytest_llamabench.errors import LlamabenchError, ServerDied, ServerOutOfMemory
from pytest_llamabench.metrics import GEN_TOK_S, RSS_PEAK_MIB, VRAM_PEAK_MIB
from pytest_llamabench.outputs.winner import Candidate, decide
from pytest_llamabench.sweep import SearchSpec, point_suffix


class NothingFits(LlamabenchError):
    """Every probe of a search ran out of memory, the least demanding one too."""

    kind = "search-nothing-fits"


class SearchFailed(LlamabenchError):
    """A probe failed for another reason than memory: the search cannot go on."""

    kind = "search-failed"


@dataclasses.dataclass
class Probe:
    """One launch of the search: its value and what happened."""

    value: int | str  # the searched key's value, or "fit" for the --fit on comparison
    config: str
    outcome: str = "pending"  # fits | oom | error
    predicted_gpu_mib: int | None = None
    predicted_host_mib: int | None = None
    predicted_fits: bool | None = None
    gen_tok_s: float | None = None
    gen_samples: tuple[float, ...] = ()
    vram_mib: float | None = None
    rss_mib: float | None = None
    failure: dict[str, Any] | None = None
    wall_s: float = 0.0
    result: dict[str, Any] | None = None  # the measurement's full result entry

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SearchResult:
    config: str
    spec: SearchSpec
    budget: str
    probes: list[Probe] = dataclasses.field(default_factory=list)
    edge: int | None = None
    chosen: int | None = None
    verdict: dict[str, Any] | None = None
    wall_s: float = 0.0
    note: str = ""

    @property
    def launches(self) -> int:
        return len(self.probes)

    @property
    def fit_probe(self) -> Probe | None:
        return next((p for p in self.probes if p.value == "fit"), None)

    def curve(self) -> list[dict[str, Any]]:
        """tok/s, VRAM and the prediction against the searched value, one point per probed value."""
        points = [p for p in self.probes if p.value != "fit"]
        return [{"value": p.value, "outcome": p.outcome, "gen_tok_s": p.gen_tok_s, "vram_mib": p.vram_mib,
                 "rss_mib": p.rss_mib, "predicted_gpu_mib": p.predicted_gpu_mib,
                 "predicted_host_mib": p.predicted_host_mib} for p in sorted(points, key=lambda p: int(p.value))]  # fmt: skip

    def line(self) -> str:
        key, probes = self.spec.key, [p for p in self.probes if p.value != "fit"]
        head = f"{self.config}: {self.spec.goal} over {key}: {len(probes)} probe(s)"
        if self.chosen is None:
            return f"{head}, nothing chosen{': ' + self.note if self.note else ''}"
        best = next(p for p in probes if p.value == self.chosen)
        speed = f", {best.gen_tok_s:.1f} tok/s" if best.gen_tok_s else ""
        vram = f", VRAM {best.vram_mib:.0f} MiB" if best.vram_mib else ""
        edge = f"edge {key} = {self.edge}; " if self.edge is not None else ""
        text = f"{head}, {edge}chose {key} = {self.chosen}{speed}{vram} in {self.wall_s:.0f} s ({self.launches} launches)"
        fit = self.fit_probe
        if fit is not None:
            text += (f"; --fit on: {fit.gen_tok_s:.1f} tok/s, VRAM {fit.vram_mib or 0:.0f} MiB" if fit.outcome == "fits"
                     else f"; --fit on: {fit.outcome} ({(fit.failure or {}).get('kind', '')})")  # fmt: skip
        if self.verdict and self.verdict.get("line"):
            text += f"; {self.verdict['line']}"
        return text + (f"; {self.note}" if self.note else "")

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, **self.spec.as_dict(), "budget": self.budget, "edge": self.edge,
                "chosen": self.chosen, "verdict": self.verdict, "wall_s": round(self.wall_s, 1),
                "launches": self.launches, "line": self.line(), "note": self.note, "curve": self.curve(),
                "probes": [p.as_dict() for p in self.probes]}  # fmt: skip


Launch = Callable[[Any], ContextManager[Any]]  # ServerConfig -> running server (bench.Bench.launch)
Measure = Callable[[Any], Any]  # running server -> ResultEntry (bench.measure on the probe workload)
Planner = Callable[[Any], Any]  # ServerConfig -> model.plan.MemoryPlan | None


class Search:
    """One search over one config (see the module docstring)."""

    def __init__(self, config: Any, *, launch: Launch, measure: Measure, planner: Planner | None = None,
                 n_layer: int | None = None, budget: str = "", log: Callable[[str], None] = print) -> None:  # fmt: skip
        assert config.search is not None, "a search needs a config with search = {...}"
        self.config = config
        self.spec: SearchSpec = config.search
        self.launch, self.measure, self.planner, self.log = launch, measure, planner, log
        self.grid = self._grid(n_layer)
        self.result = SearchResult(config.name, self.spec, budget)
        self._probes: dict[int, Probe] = {}

    def _grid(self, n_layer: int | None) -> list[int]:
        """The values to consider, ordered from the least memory to the most."""
        spec = self.spec
        low = spec.low if spec.low is not None else 0
        high = spec.high if spec.high is not None else (n_layer or 0) + (1 if spec.key == "n_gpu_layers" else 0)
        if high <= low:
            raise SearchFailed(f"{spec.source}.search: nothing to search: {spec.key} from {low} to {high}; set min and max")
        values = list(range(low, high + 1, spec.step))
        if values[-1] != high:
            values.append(high)
        return values if spec.memory_direction > 0 else values[::-1]

    # -- probing ------------------------------------------------------------------------

    def probe_config(self, value: int | str) -> Any:
        server = dict(self.config.server)
        if value == "fit":  # llama.cpp decides: --fit on adjusts only what is left unset
            server.pop("n_cpu_moe", None)
            server.update(fit="on", n_gpu_layers="auto")
            name = f"{self.config.name}-fit"
        else:
            server[self.spec.key] = value
            name = f"{self.config.name}-{point_suffix(self.spec.key, value)}"
        return dataclasses.replace(self.config, name=name, server=server, search=None, expect=None)

    def probe(self, value: int | str) -> Probe:
        if isinstance(value, int) and value in self._probes:
            return self._probes[value]
        config = self.probe_config(value)
        probe = Probe(value, config.name)
        plan = self.planner(config) if self.planner else None
        if plan is not None:
            probe.predicted_gpu_mib = round(plan.gpu_total / 2**20) if plan.gpu_total else None
            probe.predicted_host_mib = round(plan.host_total / 2**20)
            probe.predicted_fits = plan.fits
        started = time.monotonic()
        try:
            with self.launch(config) as running:
                entry = self.measure(running)
            probe.outcome = "fits"
            probe.result = entry.as_dict()
            probe.gen_tok_s = entry.median(GEN_TOK_S.name)
            probe.gen_samples = entry.samples(GEN_TOK_S.name)
            probe.vram_mib, probe.rss_mib = entry.peak(VRAM_PEAK_MIB.name), entry.peak(RSS_PEAK_MIB.name)
        except ServerOutOfMemory as exc:
            probe.outcome = "oom"
            probe.failure = {"kind": exc.kind, "message": exc.message, "device": exc.device,
                             "buffer": exc.buffer, "requested_mib": exc.requested_mib}  # fmt: skip
        except ServerDied as exc:  # died while measuring: out of memory at run time, or a crash
            probe.outcome = "oom" if "out of memory" in exc.message.lower() or "oom" in exc.message.lower() else "error"
            probe.failure = {"kind": exc.kind, "message": exc.message}
        except LlamabenchError as exc:
            probe.outcome = "error"
            probe.failure = {"kind": exc.kind, "message": exc.message}
        probe.wall_s = round(time.monotonic() - started, 1)
        self.result.probes.append(probe)
        if isinstance(value, int):
            self._probes[value] = probe
        detail = (f"{probe.gen_tok_s or 0:.1f} tok/s, VRAM {probe.vram_mib or 0:.0f} MiB, RSS {probe.rss_mib or 0:.0f} MiB"
                  if probe.outcome == "fits" else (probe.failure or {}).get("message", ""))  # fmt: skip
        self.log(f"{self.config.name}: probe {self.spec.key} = {value}: {probe.outcome} ({detail})")
        if probe.outcome == "error" and value != "fit":
            raise SearchFailed(f"{self.config.name}: probe {probe.config} failed ({probe.failure}); the search stops "
                               "(only running out of memory marks an edge): fix that config first")  # fmt: skip
        return probe

    def fits(self, index: int) -> bool:
        return self.probe(self.grid[index]).outcome == "fits"

    # -- the search -----------------------------------------------------------------------

    def predicted_edge(self) -> int:
        """Index of the last grid point the plan says fits (the middle without a plan)."""
        if self.planner is None:
            return len(self.grid) // 2
        verdicts = [getattr(self.planner(self.probe_config(v)), "fits", None) for v in self.grid]
        if all(v is None for v in verdicts):
            return len(self.grid) // 2
        fitting = [i for i, v in enumerate(verdicts) if v]
        return fitting[-1] if fitting else 0

    def find_edge(self) -> int | None:
        """Index of the last grid point that fits (a prefix of the grid fits); None if none does."""
        guess = self.predicted_edge()
        if self.fits(guess):
            low, step = guess, 1  # gallop toward more memory until something fails
            while low + step < len(self.grid) and self.fits(low + step):
                low, step = low + step, step * 2
            high = min(low + step, len(self.grid))  # grid[high] fails (or is past the end)
        else:
            high, step = guess, 1
            while high - step >= 0 and not self.fits(high - step):
                high, step = high - step, step * 2
            if high - step < 0:
                if high == 0 or not self.fits(0):
                    return None
                low = 0
            else:
                low = high - step
        while high - low > 1:  # grid[low] fits, grid[high] does not
            mid = (low + high) // 2
            if self.fits(mid):
                low = mid
            else:
                high = mid
        return low

    def run(self) -> SearchResult:
        started = time.monotonic()
        try:
            edge = self.find_edge()
            if edge is None:
                least = self._probes[self.grid[0]]
                raise NothingFits(
                    f"{self.config.name}: nothing fits: even {self.spec.key} = {self.grid[0]} (the least memory in the "
                    f"range) ran out of memory ({(least.failure or {}).get('message', 'oom')}); budget: "
                    f"{self.result.budget or 'the machine'}; widen the range (search min/max), lower ctx, or raise the budget"
                )  # fmt: skip
            self.result.edge = self.grid[edge]
            if edge == len(self.grid) - 1:
                self.result.note = f"everything in the range fits: the edge lies beyond {self.spec.key} = {self.grid[-1]}"
            self._choose(edge)
            if self.spec.compare_fit:
                self.probe("fit")
        except LlamabenchError as exc:
            exc.context["search"] = self.result  # what was probed before it stopped
            raise
        finally:
            self.result.wall_s = time.monotonic() - started
        return self.result

    def _choose(self, edge: int) -> None:
        if self.spec.goal == "largest-that-fits":
            self.result.chosen = self.grid[edge]
            return
        values = [self.grid[i] for i in range(edge, max(edge - self.spec.neighbours, 0) - 1, -1)]
        candidates = []
        for value in values:
            probe = self.probe(value)
            if probe.outcome == "fits" and probe.gen_samples:
                candidates.append(Candidate(str(value), {"probe": probe.gen_samples}, 1))
        if not candidates:
            self.result.chosen = self.grid[edge]
            return
        verdict = decide(candidates)
        self.result.verdict = verdict.as_dict()
        best = verdict.winner or verdict.best
        self.result.chosen = int(best) if best is not None else self.grid[edge]


__all__ = ["NothingFits", "Probe", "Search", "SearchFailed", "SearchResult"]
