"""One pytest run's state: settings read from options, the matrix, the report and the gate.

``RunState.from_pytest`` is the only place that reads pytest's config; the rest takes plain
values. The controller (or the only process) owns the ``RunReport`` and writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.bench import Bench, BenchSettings, MeasureSettings
from pytest_llamabench.config import Matrix, ServerConfig, Workload, expand_starts, load_matrix
from pytest_llamabench.errors import ConfigError, LlamabenchError
from pytest_llamabench.hardware.host import host_fingerprint
from pytest_llamabench.outputs import markdown
from pytest_llamabench.outputs import load_table
from pytest_llamabench.preflight import architecture_problems
from pytest_llamabench.outputs import quality_table
from pytest_llamabench.outputs.table import render, speed_table
from pytest_llamabench.plugin import options
from pytest_llamabench.results import FAILING_OUTCOMES, ResultEntry, RunReport
from pytest_llamabench.server.build import BuildSpec


@dataclasses.dataclass
class GateSettings:
    """``--llamabench-baseline`` and how to judge against it."""

    baseline: RunReport
    path: Path
    tolerances: Any  # gate.Tolerances (imported only when a baseline is given)
    fingerprint: str
    alpha: float


class RunState:
    def __init__(
        self,
        *,
        bench: Bench,
        matrix: Matrix | None,
        config_patterns: list[str],
        restarts: int | None,
        measuring: MeasureSettings,
        workload_patterns: list[str],
        report_path: Path,
        require_gpu: bool,
        is_worker: bool,
        gate: GateSettings | None = None,
        shard: Any = None,  # shards.spec.Shard: this host's share of the configs
    ) -> None:
        self.bench = bench
        self.matrix = matrix
        self.config_patterns = config_patterns
        self.restarts = restarts
        self.measuring = measuring
        self.workload_patterns = workload_patterns
        self.report_path = report_path
        self.require_gpu = require_gpu
        self.is_worker = is_worker
        self.gate = gate
        self.shard = shard
        self.report: RunReport | None = None
        self.gate_result: Any = None  # gate.Comparison, or the LlamabenchError that stopped it
        self.started = time.time()
        self.expected_tests: int | None = None  # matrix tests collected (unknown on an xdist controller)
        self.html_path: Path | None = report_path.with_suffix(".html")  # None: --llamabench-html=off

    @property
    def is_controller(self) -> bool:
        return not self.is_worker

    # -- construction from pytest -------------------------------------------------

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> RunState:
        workerinput = getattr(config, "workerinput", None)
        matrix_paths, matrix_where = options.value(config, "matrix")
        models_dir, _ = options.path_value(config, "models-dir")
        matrix = None
        if matrix_paths:
            base = config.inipath.parent if (config.inipath and matrix_where.endswith("llamabench_matrix")) else Path.cwd()
            matrix = load_matrix([base / p for p in matrix_paths], models_dir=models_dir)
        log_dir, _ = options.path_value(config, "log-dir")
        report_path, _ = options.path_value(config, "json")
        state_dir = config.rootpath / ".llamabench"
        server_bin, bin_where = options.value(config, "server-bin")
        settings = BenchSettings(
            log_dir=log_dir or state_dir / "logs",
            server_bin_candidates=[(server_bin, bin_where)],
            build_spec=BuildSpec(backend=options.value(config, "backend")[0]),
            build_if_missing=not options.value(config, "no-build")[0],
            vram_budget=options.value(config, "vram-budget")[0],
            # the user's usual variable works too; it never reaches argv, logs or reports
            api_key=os.environ.get("LLAMABENCH_API_KEY") or os.environ.get("LLAMA_API_KEY"),
        )
        if workerinput and "llamabench_run_id" in workerinput:
            settings.run_id = workerinput["llamabench_run_id"]
        if workerinput and "llamabench_controller" in workerinput:
            from pytest_llamabench.server.watchdog import watch_controller_too

            watch_controller_too(workerinput["llamabench_controller"])
        gate = None
        tolerances = options.value(config, "tolerance")[0] or []  # parsed (and checked) with or without a baseline
        baseline, _ = options.path_value(config, "baseline")
        if baseline is not None:
            from pytest_llamabench.gate import Tolerances, load_report

            gate = GateSettings(
                baseline=load_report(baseline),
                path=baseline,
                tolerances=Tolerances(tolerances),
                fingerprint=options.value(config, "fingerprint")[0],
                alpha=options.value(config, "alpha")[0],
            )
        state = cls(
            bench=Bench(settings, log=lambda m: _log(config, m)),
            matrix=matrix,
            config_patterns=options.value(config, "config")[0] or [],
            restarts=options.value(config, "restarts")[0],
            measuring=MeasureSettings(
                busy_cores=options.value(config, "busy-cores")[0],
                retry_busy=options.value(config, "retry-busy")[0],
                timeout_s=options.value(config, "request-timeout")[0],
            ),
            workload_patterns=options.value(config, "workload")[0] or [],
            report_path=report_path or state_dir / "report.json",
            require_gpu=bool(options.value(config, "require-gpu")[0]),
            is_worker=workerinput is not None,
            gate=gate,
            shard=options.value(config, "shard")[0],
        )
        if options.value(config, "html")[0] == "off":
            state.html_path = None
        elif options.value(config, "html")[0]:
            state.html_path = options.path_value(config, "html")[0]
        if matrix is not None:
            state.selected_configs()  # unknown names are a usage error now, not at collection
            state.selected_workloads()
            from pytest_llamabench.plugin import workers  # GPUs and cores of this process (xdist: a share)

            if state.is_controller:
                workers.check_controller(config, state.selected_configs())
            settings.placement = workers.placement(config, state.selected_configs())
            # README "Which llama-server": GPU configs and a usable GPU -> a cached CUDA build first
            settings.prefer_cuda = any(c.gpu for c in state.selected_configs()) and state.gpu_status().available
        return state

    # -- selection ---------------------------------------------------------------

    def _matrix(self) -> Matrix:
        if self.matrix is None:
            raise ConfigError(
                "no benchmark matrix is loaded: pass --llamabench-matrix=FILE.toml, set LLAMABENCH_MATRIX, "
                "or set llamabench_matrix in your pytest ini"
            )
        return self.matrix

    def selected_configs(self) -> list[ServerConfig]:
        configs = self._matrix().select_configs(self.config_patterns, "--llamabench-config")
        if self.shard is not None:  # this host's share (--llamabench-shard): stable by config name
            names = self.shard.select([c.name for c in configs])
            configs = [c for c in configs if c.name in names]
        return configs

    def server_starts(self) -> list[ServerConfig]:
        """The selected configs once per fresh server start, interleaved across configs (searches aside)."""
        return expand_starts([c for c in self.selected_configs() if c.search is None], self.restarts)

    def search_configs(self) -> list[ServerConfig]:
        """The selected configs with ``search = {...}``: each runs as one search item (search.py)."""
        return [c for c in self.selected_configs() if c.search is not None]

    def selected_workloads(self) -> list[Workload]:
        return self._matrix().select_workloads(self.workload_patterns, "--llamabench-workload")

    @cache  # noqa: B019 - one probe per run object
    def gpu_status(self) -> Any:
        from pytest_llamabench.hardware.gpu import probe_gpu

        return probe_gpu()

    def log_tail(self, instance: str, lines: int = 40) -> str:
        """The end of this run's server log of a config start; never a log an earlier run left."""
        path = self.bench.settings.log_dir / f"{instance}.log"
        try:
            if path.stat().st_mtime < self.started - 1:
                return ""
            return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def _uses_containers(self) -> bool:
        return self.matrix is not None and any(c.image for c in self.matrix.configs.values())

    # -- the run (controller) -------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"host": host_fingerprint(), "gpus": self._gpus()}
        if self.bench.settings.vram_budget:
            fp["vram_budget_mib"] = round(self.bench.settings.vram_budget / 2**20)
        return fp

    def _gpus(self) -> list[dict[str, Any]]:
        if not self.gpu_status().available:
            return []
        from pytest_llamabench.hardware.gpu import snapshot_gpus

        try:
            return [g.as_dict() for g in snapshot_gpus()]
        except LlamabenchError:  # a lost GPU: the tests will say so
            return []

    def start(self) -> list[str]:
        """Controller only: sweep leftovers, snapshot GPUs, open the report."""
        messages = []
        if self._uses_containers:
            messages += self._sweep_containers()
        files = [str(p) for p in self.matrix.files] if self.matrix else []
        # written with the first result, so runs without benchmarks leave no file behind; an
        # earlier run's report is moved aside at once, so it is never taken for this run's
        if self.report_path.exists():
            previous = self.report_path.with_name(f"{self.report_path.stem}.previous{self.report_path.suffix}")
            os.replace(self.report_path, previous)
            messages.append(f"moved the previous run's report to {previous}")
        self.report = RunReport(fingerprint=self.fingerprint(), matrix_files=files)
        if self.matrix is not None:  # before a long matrix: models the build cannot load, named now
            with contextlib.suppress(LlamabenchError):  # a bad --llamabench-config is reported elsewhere
                messages += architecture_problems(self.selected_configs(), self.bench.existing_binary)
        if self.shard is not None:  # python -m pytest_llamabench merge checks that every shard is there
            self.report.extra["shard"] = self.shard.as_dict([c.name for c in self.selected_configs()])
        return messages

    def _sweep_containers(self) -> list[str]:
        try:
            from pytest_llamabench.server.docker import docker_client, sweep_leftovers

            removed = sweep_leftovers(docker_client(), exclude_run_id=self.bench.settings.run_id)
        except LlamabenchError:
            return []  # no daemon: container configs will fail with the reason
        return [f"removed {len(removed)} container(s) left by an earlier crashed run: {', '.join(removed)}"] if removed else []

    def record(self, phase: ResultEntry) -> None:
        """One report phase of one test; the file is rewritten once the test has an outcome."""
        assert self.report is not None
        if self.report.record(phase) is not None:
            self.report.write(self.report_path)

    def finish(self, interrupted: str | None = None) -> bool:
        """Controller only: final report write, GPU end state, gate. True if the gate failed.

        An interrupted run's report says ``finished: false`` and why, and names no winner."""
        if self._uses_containers:
            try:
                from pytest_llamabench.server.docker import docker_client, remove_run_containers

                remove_run_containers(docker_client(), self.bench.settings.run_id)
            except LlamabenchError:
                pass
        report = self.report
        if report is None or (not report.results and self.gate is None):
            return False
        if report.fingerprint.get("gpus"):
            report.fingerprint["gpus_at_end"] = self._gpus()
        report.binary = self.bench.describe_binary() or None
        report.interrupted = interrupted
        regressed = False
        if self.gate is not None:
            regressed = self._run_gate(report, self.gate)
        table = self._table(markdown=True)  # also puts the winner verdict in the report
        table = "\n\n".join(t for t in (table, self._load_table(markdown=True)) if t)  # and the load curves
        table = "\n\n".join(t for t in (table, self._quality_table(markdown=True)) if t)  # and quant quality
        report.write(self.report_path, finished=interrupted is None)
        images = self._write_pictures(report)
        if table:
            markdown.write(self.report_path.with_suffix(".md"), table, images)
        return regressed

    def _write_pictures(self, report: RunReport) -> list[tuple[str, str]]:
        """The HTML page and the charts beside the markdown (outputs/pictures.py); (title, path) of each chart."""
        if self.html_path is None:
            return []
        from pytest_llamabench.outputs.pictures import write_pictures

        return write_pictures(report, self.html_path, self.report_path.with_suffix(".md"), log=self.bench.log)

    def _run_gate(self, report: RunReport, gate: GateSettings) -> bool:
        from pytest_llamabench.gate import compare

        try:
            self.gate_result = compare(gate.baseline, report, tolerances=gate.tolerances, alpha=gate.alpha,
                                       fingerprint=gate.fingerprint)  # fmt: skip
        except LlamabenchError as exc:
            self.gate_result = exc
            report.gate = {"baseline": str(gate.path), "regressed": True, "summary": str(exc)}
            return True
        report.gate = {"baseline": str(gate.path), "regressed": self.gate_result.regressed,
                       "summary": self.gate_result.summary()}  # fmt: skip
        return bool(self.gate_result.regressed)

    def _table(self, markdown: bool) -> str:
        assert self.report is not None
        descriptions = {n: c.description for n, c in self.matrix.configs.items()} if self.matrix else {}
        partial = None
        if self.report.interrupted:
            done = len(self.report.results)
            partial = f"interrupted ({self.report.interrupted}): {done} of {self.expected_tests or '?'} results"
        rows, workloads, verdict = speed_table(self.report.per_unit(), descriptions, partial=partial)
        self.report.extra["winner"] = verdict.as_dict()
        from pytest_llamabench.outputs.production import winner_footer  # the winner as a production config

        footer = winner_footer(self.report, self.report.extra["winner"], markdown=markdown)
        return (render(rows, workloads, markdown=markdown, verdict=verdict) + footer) if rows else ""

    def _quality_table(self, markdown: bool) -> str:
        """Quant | Size | PPL | vs reference | KLD | same top p | Verdict; its rows go in the report."""
        assert self.report is not None
        rows = quality_table.build_rows(self.report.per_unit())
        if rows:
            self.report.extra["quality"] = quality_table.as_dict(rows)
        return quality_table.render(rows, markdown=markdown) if rows else ""

    def _load_table(self, markdown: bool) -> str:
        """Throughput vs latency per config and concurrent workload; the curves go in the report."""
        assert self.report is not None
        curves = load_table.build_curves(self.report.per_unit())
        if curves:
            self.report.extra["load"] = [c.as_dict() for c in curves]
        return load_table.render(curves, markdown=markdown) if curves else ""

    def summary_sections(self) -> list[tuple[str, str]]:
        if self.is_worker or self.report is None or not self.report.results:
            return []
        sections = []
        table = self._table(markdown=False)
        if table:
            sections.append(("llamabench results", table))
        load = self._load_table(markdown=False)
        quality = self._quality_table(markdown=False)
        if quality:
            sections.append(("llamabench quant quality", quality))
        if load:
            sections.append(("llamabench load: throughput vs latency", load))
        failures = [
            f"{e.config}/{e.workload}: {e.outcome} [{e.failure.kind}] {e.failure.message}"
            for e in self.report.results
            if e.failure and (e.outcome in FAILING_OUTCOMES or e.outcome == "xfailed")
        ]
        if failures:
            sections.append(("llamabench failures", "\n".join(failures)))
        searches = [e.extra["search"]["line"] for e in self.report.results if isinstance(e.extra.get("search"), dict)]
        if searches:  # auto-fit searches (search.py): every probe is in the JSON
            sections.append(("llamabench searches", "\n".join(searches)))
        if self.gate is not None and self.gate_result is not None:
            from pytest_llamabench.gate import render

            text = (f"gate error: {self.gate_result}" if isinstance(self.gate_result, LlamabenchError)
                    else render(self.gate_result, "text"))  # fmt: skip
            sections.append((f"llamabench gate vs {self.gate.path}", text))
        html = f"\nHTML: {self.html_path}" if self.html_path is not None else ""
        sections.append(("llamabench report", f"JSON: {self.report_path}\nmarkdown: {self.report_path.with_suffix('.md')}{html}"))
        return sections


#: The run's state, in ``config.stash`` (the controller's or a worker's).
STATE = pytest.StashKey[RunState]()


def _log(config: pytest.Config, message: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        from pytest_llamabench.plugin.progress import capture_disabled

        with capture_disabled(config):  # from inside a fixture or test too (else it is captured and lost)
            reporter.write_line(f"[llamabench] {message}")
    else:
        print(f"[llamabench] {message}", flush=True)
