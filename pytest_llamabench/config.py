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

from pytest_llamabench.config_load import LOAD_KEYS, LoadLevel, has_load, load_levels
from pytest_llamabench.config_quality import QualitySpec, QuantizeSpec, strip_quality_keys, with_quality, with_quantized
from pytest_llamabench.config_toml import Table as _Table
from pytest_llamabench.config_toml import read_toml as _read_toml
from pytest_llamabench.errors import ConfigError, ModelLoadError
from pytest_llamabench.measure.kinds import KINDS
from pytest_llamabench.metrics import THRESHOLDS
from pytest_llamabench.model.template import chat_template_args, resolve_chat_template
from pytest_llamabench.sweep import SWEEP_CONFIG_KEYS, SearchSpec, SweepPoint, expand, search_spec

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
    "split_mode": "--split-mode",  # several GPUs (gpus = 2): none, layer or row
    "tensor_split": "--tensor-split",  # several GPUs: shares per GPU, e.g. "3,1"
}
#: Keys pinned in every launch so server defaults (4 slots, fit on, ...) never leak in.
PINNED_DEFAULTS: dict[str, Any] = {"parallel": 1, "fit": "off", "n_gpu_layers": 0}

_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
_ON_OFF = ("on", "off")
_ON_OFF_AUTO = ("on", "off", "auto")
_LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")
_SPLIT_MODES = ("none", "layer", "row")
_EXPECT = ("oom", "not-recommended")  # not-recommended: its quality workloads fail their thresholds
_WORKLOAD_KINDS = tuple(KINDS)
#: Sampling keys a workload may set (sent as-is to llama-server), with their valid range.
SAMPLING_KEYS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 100.0), "top_p": (0.0, 1.0), "top_k": (0, 1_000_000), "min_p": (0.0, 1.0),
    "repeat_penalty": (0.0, 100.0), "presence_penalty": (-100.0, 100.0), "frequency_penalty": (-100.0, 100.0),
}  # fmt: skip
_CHAT_KINDS = ("chat", "vision", "template")
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
    #: vision projector: a path (like the model's own), or ``synth:NAME`` (model.projector)
    mmproj: str | None = None
    mmproj_sha256: str | None = None
    #: ``"cached"``: the sha256 cache is trusted while the file is unchanged (model/digest.py);
    #: ``"always"``: the file is hashed again in every run
    verify: str = "cached"
    #: made from another model by llama-quantize (quality.quantize), before the first launch
    quantize: QuantizeSpec | None = None

    def resolve(self) -> Path:
        from pytest_llamabench.model.files import embedded_model_path

        if self.path is not None:
            return self.path
        if self.quantize is not None:  # quality.quantize.materialize makes the file and sets path
            raise ModelLoadError(f"{self.source}: the quantized model {self.name!r} has not been made yet; it is made "
                                 "with llama-quantize before its config's first launch (run the matrix through "
                                 "pytest-llamabench)")  # fmt: skip
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
    load: LoadLevel | None = None  # one level of a concurrent workload (config_load), None: one request at a time
    #: chat kinds: ``"on"``/``"off"`` (chat_template_kwargs.enable_thinking), None: the template's default
    thinking: str | None = None
    reasoning_budget: int | None = None  # tokens of thinking allowed (-1: unlimited), None: server default
    #: sampling parameters sent with every request (SAMPLING_KEYS); unset: greedy (temperature 0)
    sampling: Mapping[str, float] = dataclasses.field(default_factory=dict)
    images: int = 1  # vision: images per request
    image_size: int = 512  # vision: width and height of each generated image, in pixels
    #: only configs matching one of these globs run this workload (empty: all)
    configs: tuple[str, ...] = ()
    quality: QualitySpec | None = None  # kind = "perplexity": corpus, reference, ctx, chunks (config_quality)
    source: str = ""

    def request_timeout_s(self) -> float:
        """``timeout_s``, else 30 s plus the biggest prompt of a request at a slow 20 tok/s."""
        if self.timeout_s is not None:
            return self.timeout_s
        queued = self.load.in_flight if self.load else 1  # a request may wait for all the others in flight
        images = 60.0 * self.images if self.kind == "vision" else 0.0  # a CPU encode of an image: tens of seconds
        return 30.0 + images + 0.05 * (self.prompt_tokens + self.n_predict) * self.turns * queued

    def applies_to(self, config: ServerConfig) -> bool:
        """Does ``config`` run this workload? ``configs`` globs; a vision workload needs an mmproj."""
        if self.configs and not any(fnmatch.fnmatchcase(config.name, p) for p in self.configs):
            return False
        return self.kind != "vision" or config.model.mmproj is not None


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
    gpus: int = 1  # whole GPUs its server gets (hardware/placement.py); gpus > 1 implies gpu
    marks: tuple[str, ...] = ()
    expect: str | None = None
    image: str | None = None
    memory_limit: int | None = None
    vram_budget: int | None = None
    ready_timeout_s: float = 120.0
    restarts: int = 1  # fresh servers per config: the server start is the experimental unit
    start: int = 0  # which of them this is (1..restarts), 0 before the matrix is expanded
    thresholds: Mapping[str, Thresholds] = dataclasses.field(default_factory=dict)
    #: ``"gguf"`` (the model's own), ``"file:PATH"`` (a Jinja file) or a llama.cpp built-in name
    chat_template: str = "gguf"
    source: str = ""
    sweep: SweepPoint | None = None  # the sweep this config is a point of (sweep.py)
    search: SearchSpec | None = None  # a search config: run by search.py, not as a server

    def budget(self, session: int | None) -> int | None:
        """The VRAM budget this config runs under: its own ``vram_budget``, else the session's
        (``--llamabench-vram-budget``) when it uses a GPU."""
        return self.vram_budget or (session if self.gpu else None)

    @property
    def instance(self) -> str:
        """This server start's name: ``C7``, or ``C7@2`` for the second of several starts."""
        return f"{self.name}@{self.start}" if self.restarts > 1 else self.name

    def thresholds_for(self, workload: str, group: str | None = None) -> Thresholds:
        """``*``, then the workload's ``group`` (a concurrent workload's levels: ``load`` for
        ``load-c4``), then the workload itself."""
        base = self.thresholds.get("*", Thresholds())
        if group is not None and group != workload:
            base = base.merged(self.thresholds.get(group, Thresholds()))
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
        return argv + chat_template_args(self.chat_template) + list(self.args)


@dataclasses.dataclass(frozen=True)
class Matrix:
    """All configs and workloads of the loaded matrix files."""

    configs: Mapping[str, ServerConfig]
    workloads: Mapping[str, Workload]
    files: tuple[Path, ...]

    def select_configs(self, patterns: Sequence[str], where: str) -> list[ServerConfig]:
        return [self.configs[n] for n in _select(self.configs, patterns, where, "config")]

    def select_workloads(self, patterns: Sequence[str], where: str) -> list[Workload]:
        """A concurrent workload's name selects all its levels (``load``: ``load-c1``, ``load-c2``, ...)."""
        expanded: list[str] = []
        for pattern in patterns:
            levels = [w.name for w in self.workloads.values() if w.load and fnmatch.fnmatchcase(w.load.group, pattern)]
            direct = any(fnmatch.fnmatchcase(n, pattern) for n in self.workloads)
            expanded += [pattern] if direct or not levels else levels
        return [self.workloads[n] for n in _select(self.workloads, expanded, where, "workload")]


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
    "extends", "model", "description", "gpu", "gpus", "marks", "expect", "image", "memory_limit",
    "vram_budget", "ready_timeout_s", "thresholds", "restarts", "allow_public_host", *_SERVER_KEYS,
    *SWEEP_CONFIG_KEYS, "chat_template",
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
                  "cache_type_k": _CACHE_TYPES, "cache_type_v": _CACHE_TYPES, "split_mode": _SPLIT_MODES}  # fmt: skip
    for key, choices in choices_of.items():
        if (choice := table.choice(key, choices)) is not None:
            out[key] = choice
    if "tensor_split" in table.data:
        out["tensor_split"] = _tensor_split(table)
    if "override_tensor" in table.data:
        out["override_tensor"] = table.str_list("override_tensor")
    if "args" in table.data:
        out["args"] = table.str_list("args")
    if "env" in table.data:
        env = table.table("env")
        out["env"] = {k: env.get(k, str) for k in env.data}
    return out


def _tensor_split(table: _Table) -> str:
    """``tensor_split = [3, 1]`` (or ``"3,1"``): one non-negative share per GPU, as llama.cpp's text."""
    value = table.get("tensor_split", (list, str))
    items = value.split(",") if isinstance(value, str) else value
    try:
        shares = [float(v) for v in items if not isinstance(v, bool)]
    except (TypeError, ValueError):
        shares = []
    if not shares or len(shares) != len(items) or min(shares) < 0 or sum(shares) <= 0:
        raise ConfigError(f"{table.at('tensor_split')}: {value!r} is not a split; give one share per GPU, e.g. [3, 1]")
    return ",".join(f"{v:g}" for v in shares)


def _gpus(table: _Table) -> tuple[bool, int]:
    """(gpu, gpus): ``gpus = 2`` asks for two whole GPUs and implies ``gpu = true``."""
    gpus = table.positive_int("gpus", 1) or 1
    gpu = table.get("gpu", bool, "gpus" in table.data)
    if "gpus" in table.data and not gpu:
        raise ConfigError(f"{table.at('gpus')}: gpus = {gpus} with gpu = false; remove one of them")
    split = table.data.get("tensor_split")
    shares = len(split.split(",") if isinstance(split, str) else split) if isinstance(split, (str, list)) else 0
    if shares > gpus:
        raise ConfigError(f"{table.at('tensor_split')}: {shares} shares for gpus = {gpus}; give one share per GPU "
                          f"or set gpus = {shares}")  # fmt: skip
    return gpu, gpus


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


def _chat_options(table: _Table, kind: str) -> dict[str, Any]:
    """thinking, reasoning_budget, sampling keys, images and image_size of a workload."""
    thinking = table.choice("thinking", _ON_OFF)
    budget = table.get("reasoning_budget", int)
    if (thinking is not None or budget is not None) and kind not in _CHAT_KINDS:
        key = "thinking" if thinking is not None else "reasoning_budget"
        raise ConfigError(f"{table.at(key)}: only chat workloads think; set kind = \"chat\" (or vision)")
    if budget is not None and budget < -1:
        raise ConfigError(f"{table.at('reasoning_budget')}: use -1 (unlimited), 0 (none) or a token count")
    sampling: dict[str, float] = {}
    for key, (low, high) in SAMPLING_KEYS.items():
        value = table.get(key, int if key == "top_k" else float)
        if value is None:
            continue
        if not low <= value <= high:
            raise ConfigError(f"{table.at(key)}: {value} is out of range; use {low:g} to {high:g}")
        sampling[key] = value
    images = table.positive_int("images", 1) or 1
    image_size = table.positive_int("image_size", 512) or 512
    if kind != "vision" and ("images" in table.data or "image_size" in table.data):
        raise ConfigError(f"{table.at('images' if 'images' in table.data else 'image_size')}: "
                          "only vision workloads send images; set kind = \"vision\"")  # fmt: skip
    if not 16 <= image_size <= 4096:
        raise ConfigError(f"{table.at('image_size')}: use 16 to 4096 pixels")
    return {"thinking": thinking, "reasoning_budget": budget, "sampling": sampling, "images": images,
            "image_size": image_size, "configs": table.str_list("configs")}  # fmt: skip


def _workload(name: str, table: _Table) -> Workload:
    table.check_keys(["kind", "prompt_tokens", "n_predict", "turns", "repetitions", "warmup", "timeout_s",
                      "thinking", "reasoning_budget", *SAMPLING_KEYS, "images", "image_size", "configs"])  # fmt: skip
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
        **_chat_options(table, kind),
        source=table.where,
    )


def _workloads(name: str, table: _Table) -> list[Workload]:
    """One workload, or one per level of a concurrent one (``concurrency``/``rate``, config_load)."""
    plain = _workload(name, _Table({k: v for k, v in strip_quality_keys(table.data).items() if k not in LOAD_KEYS},
                                   table.where))  # fmt: skip
    levels = load_levels(table, name)
    if not levels:
        if plain.kind == "load":
            raise ConfigError(f"{table.at('kind')}: a load workload needs concurrency = [1, 2, 4] (streams) "
                              "or rate = [0.5, 1] (requests/s)")  # fmt: skip
        return [plain]
    if plain.kind not in ("completion", "load"):
        raise ConfigError(f"{table.at('kind')}: concurrent load sends completion requests; remove "
                          f"kind = {plain.kind!r} or move concurrency/rate to a workload of its own")  # fmt: skip
    return [dataclasses.replace(plain, name=f"{name}-{level.suffix}", kind="load", load=level) for level in levels]


def _model(name: str, table: _Table, base_dir: Path, models_dir: Path | None) -> ModelSpec:
    table.check_keys(["path", "file", "embedded", "sha256", "size", "mmproj", "mmproj_sha256", "verify", "quantize"])
    given = [k for k in ("path", "file", "embedded", "quantize") if k in table.data]
    if len(given) != 1:
        raise ConfigError(
            f"{table.where}: give exactly one of path (relative to the matrix file), "
            f"file (relative to the models dir), embedded or quantize; got {given or 'none'}"
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
    mmproj = table.get("mmproj", str)
    if mmproj is not None and not mmproj.startswith("synth:"):  # like the model: models dir for file =
        folder = models_dir if "file" in table.data and models_dir is not None else base_dir
        mmproj = str(folder / os.path.expanduser(mmproj))
    mmproj_sha256 = table.get("mmproj_sha256", str)
    if mmproj_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", mmproj_sha256):
        raise ConfigError(f"{table.at('mmproj_sha256')}: expected 64 hex digits")
    return ModelSpec(
        name=name,
        path=path,
        embedded=table.get("embedded", str),
        sha256=sha256.lower() if sha256 else None,
        size=table.positive_int("size"),
        source=table.where,
        mmproj=mmproj,
        mmproj_sha256=mmproj_sha256.lower() if mmproj_sha256 else None,
        verify=table.choice("verify", ("cached", "always")) or "cached",
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
    models = with_quantized(models, models_table)  # quantize = { from = ..., type = ... } (config_quality)
    workloads_table = root.table("workloads")
    workloads: dict[str, Workload] = {}
    for name in workloads_table.data:
        for workload in _workloads(name, workloads_table.table(name)):
            if workload.name in workloads:
                raise ConfigError(f"{workload.source}: workload {workload.name!r} is defined twice (a level of "
                                  f"a concurrent workload is named NAME-cN or NAME-rR); rename one")  # fmt: skip
            workloads[workload.name] = workload
    workloads = with_quality(workloads, workloads_table, models, path.parent)  # kind = "perplexity" (config_quality)

    defaults = root.table("defaults")
    defaults.check_keys([k for k in _CONFIG_KEYS if k not in ("extends", *SWEEP_CONFIG_KEYS)])
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
            merged = {k: v for k, v in parent.items() if k not in ("description", "expect", *SWEEP_CONFIG_KEYS)}
            merged.update(values)
            values = merged
        resolved[name] = values
        return values

    configs = {}
    for name in raw_configs.data:
        values = {**defaults.data, **resolve(name, ())}
        values.pop("extends", None)
        if "chat_template" in values:  # file: relative to this matrix file
            where = f"{raw_configs.at(name)}.chat_template"
            values["chat_template"] = resolve_chat_template(_Table(values, raw_configs.at(name)).get("chat_template", str), path.parent, where)
        for point, point_values, sweep in expand(name, values, raw_configs.at(name), list(raw_configs.table(name).data)):  # sweep.py
            if point in raw_configs.data and point != name:
                raise ConfigError(f"{raw_configs.at(point)}: also a point of the sweep in {raw_configs.at(name)}; rename it")
            configs[point] = dataclasses.replace(_config(point, _Table(point_values, raw_configs.at(name)), models), sweep=sweep)
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
        gpu=_gpus(table)[0],
        gpus=_gpus(table)[1],
        marks=table.str_list("marks"),
        expect=table.choice("expect", _EXPECT),
        image=table.get("image", str),
        memory_limit=parse_size(memory_limit, table.at("memory_limit")) if memory_limit else None,
        vram_budget=parse_size(vram_budget, table.at("vram_budget")) if vram_budget else None,
        ready_timeout_s=timeout,
        restarts=restarts,
        thresholds=_thresholds(table.table("thresholds")),
        chat_template=table.get("chat_template", str, "gguf"),
        source=table.where,
        search=search_spec(table.data, table.where, gpu=table.get("gpu", bool, False), memory_limit="memory_limit" in table.data),
    )
