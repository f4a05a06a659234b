"""The benchmark matrix: TOML files validated into typed, frozen objects.

A matrix file has four tables (see ``configs/default.toml`` for a commented one)::

    [matrix]      name, description, models_dir
    [defaults]    server keys shared by every config
    [models.X]    path | file | embedded, sha256, size
    [workloads.X] kind, prompt_tokens, n_predict, turns, repetitions, warmup
    [configs.X]   extends, model, server keys, args, env, gpu, marks, expect,
                  image, memory_limit, vram_budget, thresholds

Every error names the file and the dotted key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_llamabench.config_toml import Table as _Table
from pytest_llamabench.config_toml import read_toml as _read_toml
from pytest_llamabench.errors import ConfigError
from pytest_llamabench.measure.kinds import KINDS
from pytest_llamabench.metrics import THRESHOLDS

#: Structured server keys -> llama-server flag. Order is the argv order.
SERVER_FLAGS: dict[str, str] = {
    "threads": "--threads",
    "threads_batch": "--threads-batch",
    "ctx": "--ctx-size",
    "parallel": "--parallel",
    "n_gpu_layers": "--n-gpu-layers",
    "n_cpu_moe": "--n-cpu-moe",
    "fit": "--fit",
    "flash_attn": "--flash-attn",
    "cache_type_k": "--cache-type-k",
    "cache_type_v": "--cache-type-v",
    "batch": "--batch-size",
    "ubatch": "--ubatch-size",
    "load_mode": "--load-mode",  # this build's replacement for --no-mmap: load_mode = "none"
}
#: Keys pinned in every launch so server defaults (4 slots, fit on, ...) never leak in.
PINNED_DEFAULTS: dict[str, Any] = {"parallel": 1, "fit": "off", "n_gpu_layers": 0}

_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
_ON_OFF = ("on", "off")
_ON_OFF_AUTO = ("on", "off", "auto")
_LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")
_EXPECT = ("oom",)
_WORKLOAD_KINDS = tuple(KINDS)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: object, where: str) -> int:
    """Parse ``16GiB``, ``512M``, ``1.5G`` or an int of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE_RE.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ConfigError(
            f"{where}: {value!r} is not a size; write it like '16GiB', '512MiB' or a byte count"
        )
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model file, declared once and referenced by configs."""

    name: str
    path: Path | None  # None for ``embedded``: resolved by modelfile.embedded_model_path
    embedded: str | None = None
    sha256: str | None = None
    size: int | None = None
    source: str = ""

    def resolve(self) -> Path:
        from pytest_llamabench.model.files import embedded_model_path

        if self.path is not None:
            return self.path
        assert self.embedded is not None
        return embedded_model_path(self.embedded, where=self.source)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Limits a measurement must meet, by threshold key (``metrics.THRESHOLDS``); ``source``
    says where they were set."""

    limits: Mapping[str, float] = dataclasses.field(default_factory=dict)
    source: str = ""

    @classmethod
    def of(cls, source: str = "", **limits: float | None) -> Thresholds:
        """From keyword limits (a marker's kwargs); an unknown key is a ConfigError naming ``source``."""
        unknown = sorted(set(limits) - set(THRESHOLD_KEYS))
        if unknown:
            raise ConfigError(
                f"{source}: unknown threshold {', '.join(unknown)}; known: {', '.join(THRESHOLD_KEYS)}"
            )
        return cls({k: float(v) for k, v in limits.items() if v is not None}, source)

    def merged(self, other: Thresholds) -> Thresholds:
        """``other``'s values win where set."""
        source = ", ".join(s for s in (self.source, other.source) if s)
        return Thresholds({**self.limits, **other.limits}, source)

    def items(self) -> list[tuple[str, float]]:
        return [(k, self.limits[k]) for k in THRESHOLD_KEYS if k in self.limits]


THRESHOLD_KEYS = tuple(THRESHOLDS)


@dataclasses.dataclass(frozen=True)
class HostMemoryContext:
    """``ctx = { host_memory_factor = 4 }``: a KV cache ``factor`` times host memory."""

    factor: float


@dataclasses.dataclass(frozen=True)
class Workload:
    """One request shape, measured ``repetitions`` times after ``warmup`` runs."""

    name: str
    kind: str = "completion"
    prompt_tokens: int = 32
    n_predict: int = 64
    turns: int = 1
    repetitions: int = 5
    warmup: int = 1
    timeout_s: float | None = None  # longest silence of the server during a request; None: derived
    source: str = ""

    def request_timeout_s(self) -> float:
        """``timeout_s``, else 30 s plus the biggest prompt of a request at a slow 20 tok/s."""
        if self.timeout_s is not None:
            return self.timeout_s
        return 30.0 + 0.05 * (self.prompt_tokens + self.n_predict) * self.turns


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """One llama-server configuration of the matrix."""

    name: str
    model: ModelSpec
    server: Mapping[str, Any]  # SERVER_FLAGS keys -> values, after defaults + extends
    override_tensor: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""
    gpu: bool = False
    marks: tuple[str, ...] = ()
    expect: str | None = None
    image: str | None = None
    memory_limit: int | None = None
    vram_budget: int | None = None
    ready_timeout_s: float = 120.0
    restarts: int = 1  # fresh servers per config: the server start is the experimental unit
    start: int = 0  # which of them this is (1..restarts), 0 before the matrix is expanded
    thresholds: Mapping[str, Thresholds] = dataclasses.field(default_factory=dict)
    source: str = ""

    @property
    def instance(self) -> str:
        """This server start's name: ``C7``, or ``C7@2`` for the second of several starts."""
        return f"{self.name}@{self.start}" if self.restarts > 1 else self.name

    def thresholds_for(self, workload: str) -> Thresholds:
        base = self.thresholds.get("*", Thresholds())
        return base.merged(self.thresholds.get(workload, Thresholds()))

    def server_args(self, *, ctx: int | None = None) -> list[str]:
        """The llama-server flags of this config (no model, host or port)."""
        values = dict(self.server)
        if ctx is not None:
            values["ctx"] = ctx
        argv: list[str] = []
        for key, flag in SERVER_FLAGS.items():
            if key in values:
                value = values[key]
                if isinstance(value, HostMemoryContext):
                    raise ConfigError(
                        f"{self.source}: ctx of {self.name} must be resolved before launch"
                    )
                argv += [flag, str(value)]
        for pattern in self.override_tensor:
            argv += ["--override-tensor", pattern]
        return argv + list(self.args)


@dataclasses.dataclass(frozen=True)
class Matrix:
    """All configs and workloads of the loaded matrix files."""

    configs: Mapping[str, ServerConfig]
    workloads: Mapping[str, Workload]
    files: tuple[Path, ...]

    def select_configs(self, patterns: Sequence[str], where: str) -> list[ServerConfig]:
        return [self.configs[n] for n in _select(self.configs, patterns, where, "config")]

    def select_workloads(self, patterns: Sequence[str], where: str) -> list[Workload]:
        return [self.workloads[n] for n in _select(self.workloads, patterns, where, "workload")]


def expand_starts(configs: Sequence[ServerConfig], restarts: int | None = None) -> list[ServerConfig]:
    """Each config once per fresh server start, interleaved (A@1 B@1 A@2 B@2, never A A B B) so
    that drift of the host hits every config alike. ``restarts`` (an option) overrides the configs'."""
    counts = {c.name: restarts or c.restarts for c in configs}
    return [
        dataclasses.replace(c, restarts=counts[c.name], start=start)
        for start in range(1, max(counts.values(), default=0) + 1)
        for c in configs
        if start <= counts[c.name]
    ]


def _select(known: Mapping[str, object], patterns: Sequence[str], where: str, what: str) -> list[str]:
    if not patterns:
        return list(known)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in known if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(
                f"{where}: no {what} matches {pattern!r}; known {what}s: {', '.join(known) or '(none)'}"
            )
        chosen += [h for h in hits if h not in chosen]
    return chosen


# -- loading ------------------------------------------------------------------------


_SERVER_KEYS = (*SERVER_FLAGS, "override_tensor", "args", "env")
_CONFIG_KEYS = (
    "extends", "model", "description", "gpu", "marks", "expect", "image", "memory_limit",
    "vram_budget", "ready_timeout_s", "thresholds", "restarts", "allow_public_host", *_SERVER_KEYS,
)  # fmt: skip
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_host(args: Sequence[str], table: _Table) -> None:
    """llama-server binds 127.0.0.1; ``args`` may not open it to the network unless the config says so."""
    for i, arg in enumerate(args):
        host = args[i + 1] if arg == "--host" and i + 1 < len(args) else arg.partition("=")[2] if arg.startswith("--host=") else None
        if host is not None and host not in _LOOPBACK and not table.get("allow_public_host", bool, False):
            raise ConfigError(
                f"{table.at('args')}: --host {host} makes llama-server listen beyond this machine, with no API "
                f"key unless you set one; remove it, or set allow_public_host = true in this config if you mean it"
            )


def _server_values(table: _Table) -> dict[str, Any]:
    """Validate the server keys of a [defaults] or [configs.X] table."""
    out: dict[str, Any] = {}
    for key in ("threads", "threads_batch", "parallel", "batch", "ubatch"):
        if (v := table.positive_int(key)) is not None:
            out[key] = v
    if (v := table.positive_int("n_cpu_moe", minimum=0)) is not None:
        out["n_cpu_moe"] = v
    if "ctx" in table.data:
        ctx = table.get("ctx", (int, dict))
        if isinstance(ctx, dict):
            sub = table.table("ctx")
            sub.check_keys(["host_memory_factor"])
            factor = sub.get("host_memory_factor", float)
            if factor is None or factor <= 1:
                raise ConfigError(f"{sub.at('host_memory_factor')}: must be a number > 1")
            out["ctx"] = HostMemoryContext(factor)
        elif ctx < 0:
            raise ConfigError(f"{table.at('ctx')}: must be >= 0")
        else:
            out["ctx"] = ctx
    if "n_gpu_layers" in table.data:
        ngl = table.get("n_gpu_layers", (int, str))
        if isinstance(ngl, str) and ngl not in ("auto", "all"):
            raise ConfigError(f"{table.at('n_gpu_layers')}: use an integer, 'all' or 'auto'")
        out["n_gpu_layers"] = ngl
    choices_of = {"fit": _ON_OFF, "flash_attn": _ON_OFF_AUTO, "load_mode": _LOAD_MODES,
                  "cache_type_k": _CACHE_TYPES, "cache_type_v": _CACHE_TYPES}  # fmt: skip
    for key, choices in choices_of.items():
        if (choice := table.choice(key, choices)) is not None:
            out[key] = choice
    if "override_tensor" in table.data:
        out["override_tensor"] = table.str_list("override_tensor")
    if "args" in table.data:
        out["args"] = table.str_list("args")
    if "env" in table.data:
        env = table.table("env")
        out["env"] = {k: env.get(k, str) for k in env.data}
    return out


def _thresholds(table: _Table) -> dict[str, Thresholds]:
    """``thresholds = { "*" = {...}, short = {...} }`` or a flat table for all workloads."""
    flat = {k: v for k, v in table.data.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in table.data.items() if isinstance(v, dict)}
    out: dict[str, Thresholds] = {}
    for name, data, where in [("*", flat, table.where)] + [
        (k, v, table.at(k)) for k, v in nested.items()
    ]:
        if not data:
            continue
        sub = _Table(data, where)
        sub.check_keys(THRESHOLD_KEYS)
        out[name] = Thresholds.of(where, **{k: sub.get(k, float) for k in THRESHOLD_KEYS})
    return out


def _workload(name: str, table: _Table) -> Workload:
    table.check_keys(["kind", "prompt_tokens", "n_predict", "turns", "repetitions", "warmup", "timeout_s"])
    timeout = table.get("timeout_s", float)
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"{table.at('timeout_s')}: must be > 0 seconds")
    kind = table.choice("kind", _WORKLOAD_KINDS) or "completion"
    turns = table.positive_int("turns", 3 if kind == "chat" else 1)
    assert turns is not None
    if kind == "completion" and turns != 1:
        raise ConfigError(f"{table.at('turns')}: only chat workloads have turns; set kind = \"chat\"")
    return Workload(
        name=name,
        kind=kind,
        prompt_tokens=table.positive_int("prompt_tokens", 32) or 32,
        n_predict=table.positive_int("n_predict", 64) or 64,
        turns=turns,
        repetitions=table.positive_int("repetitions", 5) or 5,
        warmup=table.positive_int("warmup", 1, minimum=0) or 0,
        timeout_s=timeout,
        source=table.where,
    )


def _model(name: str, table: _Table, base_dir: Path, models_dir: Path | None) -> ModelSpec:
    table.check_keys(["path", "file", "embedded", "sha256", "size"])
    given = [k for k in ("path", "file", "embedded") if k in table.data]
    if len(given) != 1:
        raise ConfigError(
            f"{table.where}: give exactly one of path (relative to the matrix file), "
            f"file (relative to the models dir) or embedded; got {given or 'none'}"
        )
    path: Path | None = None
    if "path" in table.data:
        path = base_dir / os.path.expanduser(table.get("path", str))
    elif "file" in table.data:
        if models_dir is None:
            raise ConfigError(
                f"{table.at('file')}: no models dir is set; pass --llamabench-models-dir=DIR, "
                "set LLAMABENCH_MODELS_DIR, or set models_dir in the file's [matrix] table"
            )
        path = models_dir / table.get("file", str)
    sha256 = table.get("sha256", str)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ConfigError(f"{table.at('sha256')}: expected 64 hex digits")
    return ModelSpec(
        name=name,
        path=path,
        embedded=table.get("embedded", str),
        sha256=sha256.lower() if sha256 else None,
        size=table.positive_int("size"),
        source=table.where,
    )


def load_matrix(paths: Sequence[Path], *, models_dir: Path | None = None) -> Matrix:
    """Load and validate matrix files. Names must be unique across files."""
    configs: dict[str, ServerConfig] = {}
    workloads: dict[str, Workload] = {}
    for path in paths:
        file_configs, file_workloads = _load_file(path, models_dir)
        _merge_unique(configs, file_configs, "config")
        _merge_unique(workloads, file_workloads, "workload")
    return Matrix(configs=configs, workloads=workloads, files=tuple(paths))


def _merge_unique(target: dict[str, Any], new: Mapping[str, Any], kind: str) -> None:
    for name, value in new.items():
        if name in target:
            raise ConfigError(
                f"{value.source}: {kind} {name!r} is also defined in {target[name].source}; "
                "load one of the files or rename one"
            )
        target[name] = value


def _load_file(path: Path, models_dir: Path | None) -> tuple[dict[str, ServerConfig], dict[str, Workload]]:
    root = _Table(_read_toml(path), f"{path}:")
    root.check_keys(["matrix", "defaults", "models", "workloads", "configs"])
    meta = root.table("matrix")
    meta.check_keys(["name", "description", "models_dir"])
    if models_dir is None and "models_dir" in meta.data:
        models_dir = path.parent / os.path.expanduser(meta.get("models_dir", str))

    models_table = root.table("models")
    models = {
        name: _model(name, models_table.table(name), path.parent, models_dir)
        for name in models_table.data
    }
    workloads_table = root.table("workloads")
    workloads = {name: _workload(name, workloads_table.table(name)) for name in workloads_table.data}

    defaults = root.table("defaults")
    defaults.check_keys([k for k in _CONFIG_KEYS if k != "extends"])
    raw_configs = root.table("configs")
    for name in raw_configs.data:
        raw_configs.table(name).check_keys(_CONFIG_KEYS)

    resolved: dict[str, dict[str, Any]] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        if name in resolved:
            return resolved[name]
        table = raw_configs.table(name)
        values = dict(table.data)
        parent_name = table.get("extends", str)
        if parent_name is not None:
            if parent_name in chain + (name,):
                cycle = " -> ".join((*chain, name, parent_name))
                raise ConfigError(f"{table.at('extends')}: cycle in extends: {cycle}; remove one link")
            if parent_name not in raw_configs.data:
                raise ConfigError(
                    f"{table.at('extends')}: unknown config {parent_name!r}; "
                    f"known configs: {', '.join(raw_configs.data)}"
                )
            parent = resolve(parent_name, chain + (name,))
            merged = {k: v for k, v in parent.items() if k not in ("description", "expect")}
            merged.update(values)
            values = merged
        resolved[name] = values
        return values

    configs = {}
    for name in raw_configs.data:
        values = {**defaults.data, **resolve(name, ())}
        values.pop("extends", None)
        configs[name] = _config(name, _Table(values, raw_configs.at(name)), models)
    return configs, workloads


def _config(name: str, table: _Table, models: Mapping[str, ModelSpec]) -> ServerConfig:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+]*(-[A-Za-z0-9_.+]+)*", name):
        raise ConfigError(f"{table.where}: config names may hold letters, digits, '-', '_', '.', '+'")
    model_name = table.get("model", str)
    if model_name is None:
        raise ConfigError(f"{table.at('model')}: missing; name one of [models]: {', '.join(models)}")
    if model_name not in models:
        raise ConfigError(
            f"{table.at('model')}: unknown model {model_name!r}; known models: {', '.join(models) or '(none)'}"
        )
    values = _server_values(table)
    server = {**PINNED_DEFAULTS, **{k: v for k, v in values.items() if k in SERVER_FLAGS}}
    if "ctx" not in server:
        raise ConfigError(f"{table.at('ctx')}: missing; set ctx in [defaults] or in the config")
    memory_limit = table.get("memory_limit", (str, int))
    vram_budget = table.get("vram_budget", (str, int))
    timeout = table.get("ready_timeout_s", float, 120.0)
    if timeout <= 0:
        raise ConfigError(f"{table.at('ready_timeout_s')}: must be > 0")
    _check_host(values.get("args", ()), table)
    restarts = table.get("restarts", int, 1)
    if restarts < 1:
        raise ConfigError(f"{table.at('restarts')}: {restarts} fresh servers cannot be measured; use restarts >= 1")
    return ServerConfig(
        name=name,
        model=models[model_name],
        server=server,
        override_tensor=values.get("override_tensor", ()),
        args=values.get("args", ()),
        env=values.get("env", {}),
        description=table.get("description", str, ""),
        gpu=table.get("gpu", bool, False),
        marks=table.str_list("marks"),
        expect=table.choice("expect", _EXPECT),
        image=table.get("image", str),
        memory_limit=parse_size(memory_limit, table.at("memory_limit")) if memory_limit else None,
        vram_budget=parse_size(vram_budget, table.at("vram_budget")) if vram_budget else None,
        ready_timeout_s=timeout,
        restarts=restarts,
        thresholds=_thresholds(table.table("thresholds")),
        source=table.where,
    )
