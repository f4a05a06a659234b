"""The winner as a production config: its exact llama-server command line and why it won.

Made from the JSON report alone (``RunReport``): the binary the run used, the model file,
the server args the launcher actually passed (already redacted of secrets), the image
(with the digest that ran) for container configs, and the evidence — median generation
tok/s per workload, peak VRAM and RSS against the budget, the quality verdict when the
report has one, and the margin over the runner-up with its interval (``outputs.winner``).

Formats: ``cmd`` (a shell line), ``docker`` (``docker run``), ``compose`` (a service for
``docker compose``; JSON-quoted scalars, which YAML reads as they are) and ``toml`` (a matrix
file with this one config, to keep benchmarking what runs in production).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.metrics import GEN_TOK_S, RSS_PEAK_MIB, VRAM_PEAK_MIB
from pytest_llamabench.outputs.kinds import speed_results
from pytest_llamabench.results import ResultEntry, RunReport
from pytest_llamabench.server.launcher import redacted_env

FORMATS = ("cmd", "docker", "compose", "toml")
#: llama-server's own default port; the benchmark used a free one (``--port 0``).
PORT = 8080
HOST = "127.0.0.1"
CONTAINER_MODELS = "/models"
#: The flags the launcher adds itself; a report's args never hold them, but a user's ``args`` might.
_LAUNCHER_FLAGS = ("--model", "-m", "--host", "--port")


@dataclasses.dataclass(frozen=True)
class Rationale:
    """Why this config: the numbers a reader checks before putting it in production."""

    rule: str
    verdict: str
    gen_tok_s: Mapping[str, float]  # workload -> median (per-start medians pooled)
    gen_spread: Mapping[str, tuple[float, float]]  # workload -> (min, max) of the unit samples
    starts: int
    vram_peak_mib: float | None = None
    vram_budget_mib: float | None = None
    rss_peak_mib: float | None = None
    host_memory_mib: float | None = None
    quality: str | None = None
    runner_up: str | None = None
    ratio: float | None = None
    ci: tuple[float, float] | None = None
    won: bool = True

    def lines(self) -> list[str]:
        tok = ", ".join(f"{w} {v:.1f}" for w, v in self.gen_tok_s.items())
        mean = sum(self.gen_tok_s.values()) / len(self.gen_tok_s) if self.gen_tok_s else 0.0
        out = [f"generation tok/s (median{' of per-start medians' if self.starts > 1 else ''}): {tok}; mean {mean:.1f}"]
        out.append(f"memory: {_memory(self.vram_peak_mib, self.vram_budget_mib, 'VRAM', 'budget')}, "
                   f"{_memory(self.rss_peak_mib, self.host_memory_mib, 'RSS', 'host')}")  # fmt: skip
        if self.quality:
            out.append(f"quality: {self.quality}")
        if self.runner_up is not None and self.ratio is not None:
            ci = f", 95% CI {self.ci[0]:.2f}–{self.ci[1]:.2f} over {self.starts} starts" if self.ci else ""
            out.append(f"margin over {self.runner_up}: ×{self.ratio:.2f}{ci}")
        out.append(self.verdict)
        return out

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gen_tok_s"] = dict(self.gen_tok_s)
        data["gen_spread"] = {w: list(v) for w, v in self.gen_spread.items()}
        data["ci"] = list(self.ci) if self.ci else None
        return data


@dataclasses.dataclass(frozen=True)
class ProductionConfig:
    """One config of a run, as it would be started by hand."""

    config: str
    description: str
    binary: str
    model_path: str | None
    model_file: str | None
    model_sha256: str | None
    args: tuple[str, ...]
    env: Mapping[str, str]
    gpu: bool
    image: str | None
    memory_limit: int | None
    rationale: Rationale
    build: str | None = None
    source: str = ""

    # -- command lines -------------------------------------------------------------------

    def argv(self, port: int = PORT) -> list[str]:
        """The exact llama-server command line (the benchmark's args; a fixed port, 127.0.0.1)."""
        return [self.binary, "--model", self.model_path or self.model_file or "MODEL.gguf",
                "--host", HOST, "--port", str(port), *self.args]  # fmt: skip

    def cmd(self, port: int = PORT) -> str:
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, shlex.join(self.argv(port))])

    def _container_parts(self) -> tuple[str, str, list[str]]:
        if not self.image:
            raise ConfigError(
                f"{self.source}: config {self.config} ran as a local process, not in a container, so there is "
                f"no image to run; use --format cmd, or benchmark it with image = ... in its matrix config"
            )
        model = PurePosixPath(self.model_path or self.model_file or "MODEL.gguf")
        command = ["--model", f"{CONTAINER_MODELS}/{model.name}", "--host", "0.0.0.0", "--port", str(PORT),
                   *self.args]  # fmt: skip
        return self.image, str(model.parent), command

    def docker(self, port: int = PORT) -> str:
        image, model_dir, command = self._container_parts()
        argv = ["docker", "run", "-d", "--name", f"llama-server-{self.config}", "--restart", "unless-stopped",
                "-p", f"{HOST}:{port}:{PORT}", "-v", f"{model_dir}:{CONTAINER_MODELS}:ro"]  # fmt: skip
        if self.gpu:
            argv += ["--gpus", "all"]
        if self.memory_limit:
            argv += ["--memory", f"{self.memory_limit}b", "--memory-swap", f"{self.memory_limit}b"]
        for key, value in self.env.items():
            argv += ["-e", f"{key}={value}"]
        return shlex.join([*argv, image, *command])

    def compose(self, port: int = PORT) -> str:
        image, model_dir, command = self._container_parts()
        q = json.dumps
        lines = ["services:", f"  llama-server-{self.config}:", f"    image: {q(image)}", "    restart: unless-stopped",
                 f"    command: {q(command)}", f"    ports: [{q(f'{HOST}:{port}:{PORT}')}]",
                 f"    volumes: [{q(f'{model_dir}:{CONTAINER_MODELS}:ro')}]"]  # fmt: skip
        if self.env:
            lines += ["    environment:", *(f"      {q(k)}: {q(v)}" for k, v in self.env.items())]
        if self.memory_limit:
            lines.append(f"    mem_limit: {self.memory_limit}")
        if self.gpu:
            lines += ["    deploy:", "      resources:", "        reservations:", "          devices:",
                      '            - {driver: nvidia, count: all, capabilities: [gpu]}']  # fmt: skip
        return "\n".join(lines)

    def toml(self) -> str:
        """A matrix file holding this config alone: ``pytest --llamabench-matrix=FILE`` measures it again."""
        from pytest_llamabench.config import SERVER_FLAGS

        keys, rest = _args_to_keys(self.args, {flag: key for key, flag in SERVER_FLAGS.items()})
        name = _toml_key(self.config)
        lines = [f"# production config: {self.config} from {self.source}", *(f"# {line}" for line in self.rationale.lines()),
                 "", "[models.production]"]  # fmt: skip
        lines.append(f"path = {_toml(self.model_path or self.model_file or 'MODEL.gguf')}")
        if self.model_sha256:
            lines.append(f"sha256 = {_toml(self.model_sha256)}")
        lines += ["", f"[configs.{name}]", 'model = "production"']
        if self.description:
            lines.append(f"description = {_toml(self.description)}")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
        if rest:
            lines.append(f"args = {_toml(rest)}")
        if self.env:
            lines.append("env = { " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in self.env.items()) + " }")
        if self.gpu:
            lines.append("gpu = true")
        if self.image:
            lines.append(f"image = {_toml(self.image)}")
        if self.memory_limit:
            lines.append(f"memory_limit = {self.memory_limit}")
        return "\n".join(lines) + "\n"

    def render(self, fmt: str = "cmd") -> str:
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
        return {"cmd": self.cmd, "docker": self.docker, "compose": self.compose, "toml": self.toml}[fmt]()

    def footer(self) -> str:
        """Lines under the results table: the command and the evidence."""
        lines = [f"production config ({self.config}): {self.cmd()}"]
        if self.image:
            lines.append(f"  in Docker: {self.docker()}")
        lines += [f"  {line}" for line in self.rationale.lines()[:-1]]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "config": self.config, "argv": self.argv(), "command": self.cmd(), "env": dict(self.env),
            "port": PORT, "image": self.image, "gpu": self.gpu, "memory_limit": self.memory_limit,
            "model": {"path": self.model_path, "file": self.model_file, "sha256": self.model_sha256},
            "build": self.build, "rationale": self.rationale.as_dict(),
        }  # fmt: skip
        if self.image:
            data["docker"] = self.docker()
        return data


def verdict_of(report: RunReport) -> dict[str, Any]:
    """The run's winner verdict: the one the run wrote, else decided now from the results."""
    stored = report.extra.get("winner")
    if isinstance(stored, Mapping) and "best" in stored:
        return dict(stored)
    from pytest_llamabench.outputs.table import speed_table

    _, _, verdict = speed_table(report.per_unit())
    return verdict.as_dict()


def production_config(report: RunReport, config: str | None = None,
                      verdict: Mapping[str, Any] | None = None) -> ProductionConfig:  # fmt: skip
    """The winner (or ``config``) of ``report`` as a production config; a ConfigError says why not."""
    verdict = dict(verdict) if verdict is not None else verdict_of(report)
    name = config or verdict.get("winner")
    if not name:
        why = verdict.get("line") or "no config passed every workload"
        raise ConfigError(
            f"{report.source}: the run named no winner ({why}); pick a config yourself with --config NAME"
            + (f", e.g. --config {verdict['best']}" if verdict.get("best") else "")
        )
    units = [r for r in speed_results(report.per_unit()) if r.config == name]
    if not units:
        known = ", ".join(report.configs()) or "(none)"
        raise ConfigError(f"{report.source}: no results for config {name!r}; configs in this report: {known}")
    launched = next((r for r in units if r.server and r.server.get("args") is not None
                     and r.median(GEN_TOK_S.name) is not None), None)  # fmt: skip
    if launched is None or launched.server is None:
        raise ConfigError(
            f"{report.source}: config {name} measured nothing (its server never served a workload: "
            f"{units[0].outcome_text}); a production config needs a config that ran"
        )
    server = launched.server
    model = launched.model or {}
    binary = (report.binary or launched.binary or {}).get("path")
    image = _pinned_image(server)
    return ProductionConfig(
        config=name,
        description=launched.description or "",
        binary=str(binary) if binary and not image else "llama-server",
        model_path=_str(model.get("path")),
        model_file=_str(model.get("file")),
        model_sha256=_str(model.get("sha256")),
        args=tuple(_without_launcher_flags([str(a) for a in server.get("args") or ()])),
        env=redacted_env({str(k): str(v) for k, v in (server.get("env") or {}).items()}),
        gpu=bool(server.get("gpu")) or bool(server.get("devices")) or (launched.peak(VRAM_PEAK_MIB.name) or 0) > 0,
        image=_str(image),
        memory_limit=server.get("memory_limit") if isinstance(server.get("memory_limit"), int) else None,
        rationale=_rationale(report, name, units, verdict),
        build=launched.build,
        source=report.source,
    )


def _rationale(report: RunReport, name: str, units: Sequence[ResultEntry], verdict: Mapping[str, Any]) -> Rationale:
    from pytest_llamabench.outputs.table import WINNER_RULE

    gen = {r.workload: m for r in units if r.workload and (m := r.median(GEN_TOK_S.name)) is not None}
    spread = {r.workload: (min(s), max(s)) for r in units if r.workload and (s := r.samples(GEN_TOK_S.name))}
    vram = [v for r in units if (v := r.peak(VRAM_PEAK_MIB.name)) is not None]
    rss = [v for r in units if (v := r.peak(RSS_PEAK_MIB.name)) is not None]
    budget = report.fingerprint.get("vram_budget_mib")
    host = report.fingerprint.get("host") or {}
    is_winner = verdict.get("winner") == name
    ci = verdict.get("ci")
    return Rationale(
        rule=WINNER_RULE,
        verdict=str(verdict.get("line") or "") if is_winner or verdict.get("best") == name
        else f"chosen by hand (--config {name}); the run's verdict: {verdict.get('line') or 'none'}",
        gen_tok_s=gen,
        gen_spread=spread,
        starts=max(int(r.extra.get("starts", 1)) for r in units),
        vram_peak_mib=max(vram) if vram else None,
        vram_budget_mib=float(budget) if isinstance(budget, (int, float)) else None,
        rss_peak_mib=max(rss) if rss else None,
        host_memory_mib=float(host["memory_mib"]) if isinstance(host.get("memory_mib"), (int, float)) else None,
        quality=quality_verdict(report, name, units),
        runner_up=_str(verdict.get("runner_up")) if verdict.get("best") == name else None,
        ratio=float(verdict["ratio"]) if verdict.get("best") == name and isinstance(verdict.get("ratio"), (int, float)) else None,
        ci=(float(ci[0]), float(ci[1])) if verdict.get("best") == name and isinstance(ci, list) and len(ci) == 2 else None,
        won=is_winner,
    )


def quality_verdict(report: RunReport, config: str, units: Iterable[ResultEntry] = ()) -> str | None:
    """The quality verdict of ``config``'s model wherever the report holds one: a row of the
    top-level ``quality`` section (or a result's own ``quality``) for this config or its model file."""
    units = list(units)
    model_files = {str(u.model.get("file")) for u in units if u.model and u.model.get("file")}
    candidates: list[Any] = [u.extra.get("quality") for u in units]
    section = report.extra.get("quality")
    candidates += section if isinstance(section, list) else list(section.values()) if isinstance(section, Mapping) else []
    for row in candidates:
        if not isinstance(row, Mapping) or not row.get("verdict"):
            continue
        if row.get("config", config) != config and row.get("model_file") not in model_files:
            continue
        facts = [f"{k} {v:.4g}" for k, v in row.items() if k in _QUALITY_FACTS and isinstance(v, (int, float))]
        return f"{row['verdict']}" + (f" ({', '.join(facts)})" if facts else "")
    return None


_QUALITY_FACTS = ("ppl", "increase_pct", "kld_mean", "same_top_p_pct")


def _pinned_image(server: Mapping[str, Any]) -> str | None:
    """The image that ran: pinned to its registry digest when it has one (a locally built image has
    only an ID, which ``name@`` cannot pin: its tag is kept)."""
    image, digest = _str(server.get("image")), _str(server.get("image_digest"))
    if image is None or digest is None or "@" in image or digest == server.get("image_id"):
        return image
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return f"{name}@{digest}"


def _without_launcher_flags(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _LAUNCHER_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in _LAUNCHER_FLAGS and "=" in arg:
            continue
        out.append(arg)
    return out


def _args_to_keys(args: Sequence[str], flags: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Structured matrix keys for the flags a config's keys make; the rest stay raw args."""
    keys: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        key = flags.get(args[i])
        if key is not None and i + 1 < len(args) and key not in keys:
            value = args[i + 1]
            keys[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
            i += 2
            continue
        if args[i] == "--override-tensor" and i + 1 < len(args):
            keys.setdefault("override_tensor", []).append(args[i + 1])
            i += 2
            continue
        rest.append(args[i])
        i += 1
    return keys, rest


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _memory(peak: float | None, limit: float | None, what: str, of: str) -> str:
    if peak is None:
        return f"{what} not measured"
    if limit:
        return f"{what} {peak:.0f} MiB of {limit:.0f} MiB {of} ({peak / limit:.0%})"
    return f"{what} {peak:.0f} MiB"


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def winner_footer(report: RunReport, verdict: dict[str, Any], *, markdown: bool = False) -> str:
    """The results table's footer: the winner's command line and its evidence, also put in the
    verdict (``verdict["production"]``, the report's ``winner``). Empty without a winner."""
    if not verdict.get("winner"):
        return ""
    try:
        production = production_config(report, verdict=verdict)
    except ConfigError:  # its server args were not recorded (a report from an older version)
        return ""
    verdict["production"] = production.as_dict()
    if not markdown:
        return "\n" + production.footer()
    docker = f"\n\nIn Docker:\n\n```bash\n{production.docker()}\n```" if production.image else ""
    lines = "\n".join(f"- {line}" for line in production.rationale.lines()[:-1])
    return (f"\n**Production config: {production.config}** (`python -m pytest_llamabench winner REPORT.json "
            f"--format cmd|docker|compose|toml`):\n\n```bash\n{production.cmd()}\n```{docker}\n\n{lines}\n")


__all__ = ["FORMATS", "ProductionConfig", "Rationale", "production_config", "quality_verdict", "redacted_env",
           "verdict_of", "winner_footer"]
