"""One benchmark run's state: settings, the loaded matrix, the report and the gate.

``Session.from_pytest`` is the only place that reads pytest's config; the rest
takes plain values.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.plugin import options
from pytest_llamabench.server.build import BuildSpec
from pytest_llamabench.config import Matrix, ServerConfig, Workload, load_matrix
from pytest_llamabench.errors import ConfigError, LlamabenchError
from pytest_llamabench.results import Report, host_fingerprint
from pytest_llamabench.bench import Bench, BenchSettings
from pytest_llamabench.outputs.table import build_rows, render


class Session:
    def __init__(
        self,
        *,
        bench: Bench,
        matrix: Matrix | None,
        matrix_where: str,
        config_patterns: list[str],
        workload_patterns: list[str],
        report_path: Path | None,
        require_gpu: bool,
        is_worker: bool,
        gate: dict[str, Any] | None = None,
    ) -> None:
        self.bench = bench
        self.matrix = matrix
        self.matrix_where = matrix_where
        self.config_patterns = config_patterns
        self.workload_patterns = workload_patterns
        self.report_path = report_path
        self.require_gpu = require_gpu
        self.is_worker = is_worker
        self.gate = gate
        self.report: Report | None = None
        self.gate_result: Any = None
        self._gpus_at_start: list[dict[str, object]] = []

    @property
    def is_controller(self) -> bool:
        return not self.is_worker

    # -- construction from pytest -------------------------------------------------

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> Session:
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
            api_key=os.environ.get("LLAMABENCH_API_KEY"),
        )
        if workerinput and "llamabench_run_id" in workerinput:
            settings.run_id = workerinput["llamabench_run_id"]
        gate = None
        baseline, baseline_where = options.path_value(config, "baseline")
        if baseline is not None:
            from pytest_llamabench.gate.compare import Tolerances, load_report

            gate = {
                "baseline": load_report(baseline),
                "baseline_path": baseline,
                "tolerances": Tolerances(options.value(config, "tolerance")[0] or []),
                "fingerprint": options.value(config, "fingerprint")[0],
                "alpha": options.value(config, "alpha")[0],
            }
        session = cls(
            bench=Bench(settings, log=lambda m: _log(config, m)),
            matrix=matrix,
            matrix_where=matrix_where,
            config_patterns=options.value(config, "config")[0] or [],
            workload_patterns=options.value(config, "workload")[0] or [],
            report_path=report_path or state_dir / "report.json",
            require_gpu=bool(options.value(config, "require-gpu")[0]),
            is_worker=workerinput is not None,
            gate=gate,
        )
        if matrix is not None:
            session.selected_configs()  # unknown names are a usage error now, not at collection
            session.selected_workloads()
        return session

    # -- selection ---------------------------------------------------------------

    def _matrix(self) -> Matrix:
        if self.matrix is None:
            raise ConfigError(
                "no benchmark matrix is loaded: pass --llamabench-matrix=FILE.toml, set LLAMABENCH_MATRIX, "
                "or set llamabench_matrix in your pytest ini"
            )
        return self.matrix

    def selected_configs(self) -> list[ServerConfig]:
        return self._matrix().select_configs(self.config_patterns, "--llamabench-config")

    def selected_workloads(self) -> list[Workload]:
        return self._matrix().select_workloads(self.workload_patterns, "--llamabench-workload")

    @cache  # noqa: B019 - one probe per session object
    def gpu_status(self) -> Any:
        from pytest_llamabench.hardware.gpu import probe_gpu

        return probe_gpu()

    def log_tail(self, config_name: str, lines: int = 40) -> str:
        path = self.bench.settings.log_dir / f"{config_name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-lines:])
        except OSError:
            return ""

    # -- session lifecycle (controller) -------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"host": host_fingerprint(), "gpus": self._gpus_at_start}
        if self.bench.settings.vram_budget:
            fp["vram_budget_mib"] = round(self.bench.settings.vram_budget / 2**20)
        return fp

    def start(self) -> list[str]:
        """Controller only: sweep leftovers, snapshot GPUs, open the report."""
        messages = []
        if self.gpu_status().available:
            from pytest_llamabench.hardware.gpu import snapshot_gpus

            self._gpus_at_start = [g.as_dict() for g in snapshot_gpus()]
        if self.matrix is not None and any(c.image for c in self.matrix.configs.values()):
            messages += self._sweep_containers()
        if self.report_path is not None:
            files = [str(p) for p in self.matrix.files] if self.matrix else []
            # written with the first result, so runs without benchmarks leave no file behind
            self.report = Report(self.report_path, matrix_files=files, fingerprint=self.fingerprint())
        return messages

    def _sweep_containers(self) -> list[str]:
        try:
            from pytest_llamabench.server.container import docker_client, sweep_leftovers

            removed = sweep_leftovers(docker_client(), exclude_run_id=self.bench.settings.run_id)
        except LlamabenchError:
            return []  # no daemon: container configs will fail with the reason
        return [f"removed {len(removed)} container(s) left by an earlier crashed run: {', '.join(removed)}"] if removed else []

    def finish(self) -> bool:
        """Controller only: final report write, GPU end state, gate. True if the gate failed."""
        if self.matrix is not None and any(c.image for c in self.matrix.configs.values()):
            try:
                from pytest_llamabench.server.container import docker_client, remove_run_containers

                remove_run_containers(docker_client(), self.bench.settings.run_id)
            except LlamabenchError:
                pass
        if self.report is None or (not self.report.results and self.gate is None):
            return False
        if self._gpus_at_start:
            from pytest_llamabench.hardware.gpu import snapshot_gpus

            self.report.data["fingerprint"]["gpus_at_end"] = [g.as_dict() for g in snapshot_gpus()]
        self.report.data["binary"] = self.bench.describe_binary() or None
        if self.gate is not None:
            from pytest_llamabench.gate.compare import compare, parse_report

            try:
                self.gate_result = compare(
                    self.gate["baseline"], parse_report(self.report.data, source="this run"),
                    tolerances=self.gate["tolerances"], alpha=self.gate["alpha"],
                    fingerprint=self.gate["fingerprint"],
                )  # fmt: skip
            except LlamabenchError as exc:
                self.gate_result = exc
            self.report.data["gate"] = {
                "baseline": str(self.gate["baseline_path"]),
                "regressed": bool(getattr(self.gate_result, "regressed", True)),
                "summary": self.gate_result.summary()
                if callable(getattr(self.gate_result, "summary", None))
                else str(self.gate_result),
            }
        self.report.write(finished=True)
        self._write_markdown()
        return self.gate is not None and bool(getattr(self.gate_result, "regressed", True))

    def _table(self, markdown: bool) -> str:
        assert self.report is not None
        descriptions = {n: c.description for n, c in self.matrix.configs.items()} if self.matrix else {}
        rows, workloads = build_rows(self.report.results, descriptions)
        return render(rows, workloads, markdown=markdown) if rows else ""

    def _write_markdown(self) -> None:
        assert self.report is not None
        table = self._table(markdown=True)
        if not table:
            return
        text = f"## llama-server benchmark\n\n{table}"
        self.report.path.with_suffix(".md").write_text(text)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a") as fh:
                fh.write(text + "\n")

    def summary_sections(self) -> list[tuple[str, str]]:
        if self.is_worker or self.report is None or not self.report.results:
            return []
        sections = []
        table = self._table(markdown=False)
        if table:
            sections.append(("llamabench results", table))
        failures = [
            f"{e['config']}/{e['workload']}: {e['outcome']} [{e['failure']['kind']}] {e['failure']['message']}"
            for e in self.report.results
            if e.get("failure") and e["outcome"] in ("failed", "error", "xfailed")
        ]
        if failures:
            sections.append(("llamabench failures", "\n".join(failures)))
        if self.gate_result is not None:
            text = self.gate_result.render("text") if hasattr(self.gate_result, "render") else f"gate error: {self.gate_result}"
            sections.append((f"llamabench gate vs {self.gate['baseline_path'] if self.gate else ''}", text))
        sections.append(("llamabench report", f"JSON: {self.report.path}\nmarkdown: {self.report.path.with_suffix('.md')}"))
        return sections


def _log(config: pytest.Config, message: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[llamabench] {message}")
    else:
        print(f"[llamabench] {message}", flush=True)
