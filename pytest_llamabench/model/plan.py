"""A memory plan before launch: where each tensor goes and how much VRAM and host memory a
config needs, from the GGUF's tensor table and the config's offload flags.

Placement follows llama.cpp (``src/llama-model.cpp``, ``src/llama-model-loader.cpp`` at the
pinned build): with ``-ngl N`` the last N of the n_layer+1 "layers" (the output layer counts
as the last) are on the GPU, layer ``il`` when ``il >= n_layer + 1 - N``; the token embedding
always stays on the CPU. Overrides (``--n-cpu-moe N`` = ``blk\\.{0..N-1}\\.ffn_(up|down|gate|
gate_up)_(ch|)exps`` to CPU, then each ``-ot REGEX=BUFFER`` in argv order) are searched
(``regex_search``) in order, the first that matches wins.

Memory, per device:

- weights: the bytes of the tensors placed there;
- KV cache: for every layer that has attention (``attn_k``; the linear-attention layers of a
  hybrid model such as Qwen3.5 have none), ``n_ctx`` padded to 256 × (K rows × type size of
  ``cache_type_k`` + V rows × type size of ``cache_type_v``), on the layer's device;
- recurrent state (hybrid models): per linear-attention layer and slot,
  ``(conv_kernel - 1) × conv_dim + d_state × d_inner`` F32 values (``n_embd_r + n_embd_s``);
- compute buffer (an estimate; llama.cpp sizes it by reserving the worst-case graph of one
  ubatch, with logits for one output per slot, as llama-server sets ``n_outputs_max``):
  ``ubatch × 4 B × (8·n_embd + 3·n_expert_used·n_ff_exp + n_expert) + slots × n_vocab × 4 B`` plus, without flash attention, the KQ matrix
  ``n_head × n_ctx × ubatch × 4 B``; and on a GPU with weights left on the CPU, one layer's
  CPU-resident weights, which the scheduler copies to the GPU for batches of 32+ tokens. The
  terms are checked against the server's own "compute buffer size" lines (``reported``);
  expect ±50 % on this term, a few percent on the others;
- overhead: ``GPU_CONTEXT_MIB`` for the CUDA context and cuBLAS workspace (NVML counts it
  against the process), ``HOST_BASE_MIB`` for the binary and runtime, ``CUDA_HOST_MIB`` for the
  CUDA libraries' host memory in a GPU server.

Checked against the H100 run in ``docs/gpu-run/synthetic-matrix-16GiB.json`` (synthetic
Qwen3-30B-A3B, 65k ctx, KV q8_0; ``tests/test_plan.py``): C2's failed model buffer (20866 MiB)
and C6's failed KV buffer (3264 MiB) are predicted exactly; the totals are within −2.0 … +1.6 % of
the NVML peaks (the compute term is the loose one), the host totals within 0.2 % of VmHWM
(``CUDA_HOST_MIB`` was set from that run; the Qwen3.5 run on the H200 checks it).

Host memory (the server's peak RSS): CPU weights (the whole file when loaded with mmap, since
loading touches every page), CPU KV, CPU compute and overhead.

The plan orders and prunes a search and says "will not fit" before a launch; it never
replaces a launch as evidence.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_llamabench.model.files import KV_TYPE_BYTES
from pytest_llamabench.model.tensors import ModelTensors, Tensor

MIB = 2**20
GIB = 2**30
GPU_CONTEXT_MIB = 450  # CUDA context + cuBLAS workspace per process (H100/H200, CUDA 12); calibrated on the GPU run
HOST_BASE_MIB = 40  # llama-server binary, runtime, tokenizer
CUDA_HOST_MIB = 500  # host memory of the CUDA runtime and libraries (cuBLAS) in a GPU server
EXPERT_RE = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_GPU_BUFFER = re.compile(r"^(CUDA|ROCm|Vulkan|Metal|SYCL)\d*$")


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """What a plan needs from a config (see ``inputs_of``)."""

    gpu: bool = False
    n_gpu_layers: int | str = 0  # an int, "all" or "auto"
    n_cpu_moe: int = 0
    overrides: tuple[str, ...] = ()  # "REGEX=BUFFER", as -ot takes them
    ctx: int = 4096  # 0: the model's training context
    parallel: int = 1
    ubatch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    load_mode: str = "auto"  # "none": no mmap
    fit: str = "off"


def inputs_of(config: Any, ctx: int | None = None) -> PlanInputs:
    """A ``ServerConfig``'s plan inputs (``ctx``: a resolved context size, if the config's is not a number)."""
    server: Mapping[str, Any] = config.server
    value = server.get("ctx", 4096) if ctx is None else ctx
    overrides = list(config.override_tensor)
    args = list(config.args)
    for i, arg in enumerate(args[:-1]):  # -ot given through raw args counts too
        if arg in ("-ot", "--override-tensor"):
            overrides += args[i + 1].split(",")
    return PlanInputs(
        gpu=bool(config.gpu), n_gpu_layers=server.get("n_gpu_layers", 0), n_cpu_moe=int(server.get("n_cpu_moe", 0)),
        overrides=tuple(overrides), ctx=value if isinstance(value, int) else 4096,
        parallel=int(server.get("parallel", 1)), ubatch=int(server.get("ubatch", 512)),
        cache_type_k=str(server.get("cache_type_k", "f16")), cache_type_v=str(server.get("cache_type_v", "f16")),
        flash_attn=str(server.get("flash_attn", "auto")), load_mode=str(server.get("load_mode", "auto")),
        fit=str(server.get("fit", "off")),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Predicted bytes per component on the GPU and the host, and what the budget says about them."""

    gpu: dict[str, int]  # weights, kv, state, compute, overhead
    host: dict[str, int]
    layers_on_gpu: int
    expert_layers_on_gpu: int
    n_layer: int
    budget: int | None = None  # bytes the GPU may use (the VRAM budget, or the card's memory)
    budget_source: str = ""
    fit_decides: bool = False  # --fit on: llama.cpp chooses the split at load
    notes: tuple[str, ...] = ()
    host_budget: int | None = None  # bytes the server may use on the host (a container's memory_limit)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def fits(self) -> bool | None:
        """Whether the GPU part fits the budget and the host part the host budget; None when unknown."""
        if self.host_budget is not None and self.host_total > self.host_budget:
            return False
        if self.fit_decides or self.budget is None or not self.gpu_total:
            return None if self.host_budget is None else True
        return self.gpu_total <= self.budget

    def line(self, name: str) -> str:
        """``C2: needs ≈ 21.6 GB on a 16 GB card: will not fit`` (or its host-only form)."""
        if self.fit_decides:
            return f"{name}: --fit on decides the split at load; host ≈ {_gb(self.host_total)} at most"
        if not self.gpu_total:
            limit = (f" of a {_gb(self.host_budget)} limit: {'fits' if self.fits else 'will not fit'}"
                     if self.host_budget else "")  # fmt: skip
            return f"{name}: needs ≈ {_gb(self.host_total)} of host memory (all on the CPU){limit}"
        if self.budget is None:
            return f"{name}: needs ≈ {_gb(self.gpu_total)} of VRAM and ≈ {_gb(self.host_total)} of host memory"
        verdict = "fits" if self.fits else "will not fit"
        return (f"{name}: needs ≈ {_gb(self.gpu_total)} on a {_gb(self.budget, 1 if self.budget % GIB else 0)} card ({self.budget_source}): "
                f"{verdict} (weights {_gb(self.gpu['weights'])}, KV {_gb(self.gpu['kv'])}, compute "
                f"{_gb(self.gpu['compute'])}; {self.expert_layers_on_gpu}/{self.n_layer} expert layers on the GPU)")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpu_mib": {k: round(v / MIB) for k, v in self.gpu.items()}, "gpu_total_mib": round(self.gpu_total / MIB),
            "host_mib": {k: round(v / MIB) for k, v in self.host.items()}, "host_total_mib": round(self.host_total / MIB),
            "layers_on_gpu": self.layers_on_gpu, "expert_layers_on_gpu": self.expert_layers_on_gpu,
            "n_layer": self.n_layer, "budget_mib": round(self.budget / MIB) if self.budget else None,
            "budget_source": self.budget_source, "fits": self.fits, "fit_decides": self.fit_decides,
            "host_budget_mib": round(self.host_budget / MIB) if self.host_budget else None,
            "notes": list(self.notes),
        }  # fmt: skip


def _gb(nbytes: int, digits: int = 1) -> str:
    return f"{nbytes / GIB:.{digits}f} GiB"


def placement(model: ModelTensors, inputs: PlanInputs) -> dict[str, bool]:
    """Tensor name -> on the GPU."""
    n_layer = model.n_layer
    ngl = _ngl(inputs, n_layer)
    first_gpu = n_layer + 1 - ngl
    rules = [(re.compile(rf"blk\.{i}{EXPERT_RE}"), False) for i in range(inputs.n_cpu_moe)]
    for item in inputs.overrides:
        regex, _, buffer = item.rpartition("=")
        rules.append((re.compile(regex), not buffer.upper().startswith("CPU")))
    out = {}
    for tensor in model.tensors:
        layer = tensor.layer
        on_gpu = inputs.gpu and (tensor.name != "token_embd.weight") and (
            (layer if layer is not None else n_layer) >= first_gpu)  # fmt: skip
        for rule, to_gpu in rules:
            if rule.search(tensor.name):
                on_gpu = to_gpu and inputs.gpu
                break
        out[tensor.name] = on_gpu
    return out


def _ngl(inputs: PlanInputs, n_layer: int) -> int:
    if not inputs.gpu:
        return 0
    value = inputs.n_gpu_layers
    if value in ("all", "auto"):
        return n_layer + 1
    return max(0, int(value))


def plan(model: ModelTensors, inputs: PlanInputs, *, budget: int | None = None, budget_source: str = "",
         host_budget: int | None = None) -> MemoryPlan:  # fmt: skip
    """The memory plan of ``model`` launched with ``inputs`` (see the module docstring)."""
    on_gpu = placement(model, inputs)
    tensors = model.by_name()
    weights = {True: 0, False: 0}
    for name, where in on_gpu.items():
        weights[where] += tensors[name].nbytes
    layer_gpu = {il: _layer_on_gpu(model, on_gpu, il) for il in range(model.n_layer)}
    n_ctx = -(-(inputs.ctx or model.n_ctx_train or 4096) // 256) * 256
    kv, state = {True: 0, False: 0}, {True: 0, False: 0}
    for il in range(model.n_layer):
        k, v = tensors.get(f"blk.{il}.attn_k.weight"), tensors.get(f"blk.{il}.attn_v.weight")
        if k is not None and v is not None:
            kv[layer_gpu[il]] += int(n_ctx * (_rows(k) * KV_TYPE_BYTES[inputs.cache_type_k]
                                              + _rows(v) * KV_TYPE_BYTES[inputs.cache_type_v]))  # fmt: skip
        state[layer_gpu[il]] += _recurrent_state(tensors, il) * inputs.parallel
    compute_gpu, compute_host = _compute(model, inputs, on_gpu, n_ctx)
    experts_gpu = sum(1 for il in range(model.n_layer)
                      if any(on_gpu.get(f"blk.{il}.ffn_{p}_exps.weight") for p in ("up", "down", "gate")))  # fmt: skip
    any_gpu = inputs.gpu and (weights[True] > 0 or kv[True] > 0)
    mmap = inputs.load_mode not in ("none", "dio")
    gpu = {"weights": weights[True], "kv": kv[True], "state": state[True], "compute": compute_gpu,
           "overhead": GPU_CONTEXT_MIB * MIB if any_gpu else 0}  # fmt: skip
    host = {"weights": model.total_bytes if mmap else weights[False], "kv": kv[False], "state": state[False],
            "compute": compute_host, "overhead": (HOST_BASE_MIB + (CUDA_HOST_MIB if any_gpu else 0)) * MIB}  # fmt: skip
    notes = []
    if mmap and weights[True]:
        notes.append("loaded with mmap: the whole file counts in the server's RSS")
    if inputs.flash_attn == "off" and any_gpu:
        notes.append(f"flash attention off: the KQ matrix ({_gb(_kq_bytes(model, inputs, n_ctx))}) is in the compute buffer")
    return MemoryPlan(gpu, host, sum(layer_gpu.values()), experts_gpu, model.n_layer, budget if any_gpu else None,
                      budget_source, fit_decides=inputs.gpu and (inputs.fit == "on" or inputs.n_gpu_layers == "auto"),
                      notes=tuple(notes), host_budget=host_budget)  # fmt: skip


def _layer_on_gpu(model: ModelTensors, on_gpu: Mapping[str, bool], il: int) -> bool:
    """A layer's device: that of its attention norm (llama.cpp puts the layer's KV with its layer)."""
    return bool(on_gpu.get(f"blk.{il}.attn_norm.weight", False))


def _rows(tensor: Tensor) -> int:
    return tensor.ne[1] if len(tensor.ne) > 1 else tensor.ne[0]


def _recurrent_state(tensors: Mapping[str, Tensor], il: int) -> int:
    conv, out, norm = (tensors.get(f"blk.{il}.{n}") for n in ("ssm_conv1d.weight", "ssm_out.weight", "ssm_norm.weight"))
    if conv is None or out is None:
        return 0
    d_state = norm.ne[0] if norm is not None else 0
    return 4 * ((conv.ne[0] - 1) * conv.ne[1] + d_state * out.ne[0])


def _kq_bytes(model: ModelTensors, inputs: PlanInputs, n_ctx: int) -> int:
    return model.n_head * n_ctx * inputs.ubatch * 4


def _compute(model: ModelTensors, inputs: PlanInputs, on_gpu: Mapping[str, bool], n_ctx: int) -> tuple[int, int]:
    """(GPU, host) compute buffer estimate for one ubatch (see the module docstring)."""
    tensors = model.by_name()
    n_ff_exp = next((t.ne[1] for t in model.tensors if t.name.endswith("ffn_up_exps.weight")), 0)
    activations = inputs.ubatch * 4 * (8 * model.n_embd + 3 * model.n_expert_used * n_ff_exp + model.n_expert)
    logits = inputs.parallel * 4 * model.n_vocab  # llama-server reserves outputs for one token per slot
    attention = _kq_bytes(model, inputs, n_ctx) if inputs.flash_attn == "off" else 0
    output_on_gpu = on_gpu.get("output.weight", on_gpu.get("token_embd.weight", False))
    if not inputs.gpu or not any(on_gpu.values()):
        return 0, activations + logits + attention
    cpu_layer = [sum(t.nbytes for t in model.tensors if t.layer == il and not on_gpu[t.name])
                 for il in range(model.n_layer)]  # fmt: skip
    offload_copy = max(cpu_layer, default=0) if inputs.ubatch >= 32 else 0
    gpu = activations + attention + (logits if output_on_gpu else 0) + offload_copy
    host = (0 if output_on_gpu else logits) + (activations if any(cpu_layer) else 0)
    del tensors
    return gpu, host


# -- what the server itself reported ------------------------------------------------------

_BUFFER_LINE = re.compile(r"\b(\S+?)\s+(model|KV|RS|compute|output) buffer size =\s+([\d.]+) MiB")
_KINDS = {"model": "weights", "KV": "kv", "RS": "state", "compute": "compute", "output": "compute"}


def reported_buffers(log: str) -> dict[str, dict[str, float]]:
    """The buffer sizes llama.cpp logged at load, in MiB: ``{"gpu": {"weights": …}, "host": {…}}``.

    GPU buffers are named CUDA0, ROCm0, …; ``CUDA_Host`` (pinned) and ``CPU*`` buffers are host memory.
    """
    out: dict[str, dict[str, float]] = {"gpu": {}, "host": {}}
    for name, kind, mib in _BUFFER_LINE.findall(log):
        side = "gpu" if _GPU_BUFFER.match(name) else "host"
        key = _KINDS[kind]
        out[side][key] = out[side].get(key, 0.0) + float(mib)
    return {side: {k: round(v, 1) for k, v in sizes.items()} for side, sizes in out.items()}


def compare(plan_: MemoryPlan, reported: Mapping[str, Mapping[str, float]],
            measured: Mapping[str, float | None]) -> dict[str, Any]:  # fmt: skip
    """Predicted beside the server's reported buffers and the measured peaks (MiB), with errors in %."""
    rows: dict[str, Any] = {}
    for side, predicted in (("gpu", plan_.gpu), ("host", plan_.host)):
        for key, value in predicted.items():
            got = reported.get(side, {}).get(key)
            if got is None and not value:
                continue
            rows[f"{side}.{key}"] = {"predicted_mib": round(value / MIB), "reported_mib": got,
                                     "error_pct": _error(value / MIB, got)}  # fmt: skip
    for side, total, key in (("gpu", plan_.gpu_total, "vram_peak_mib"), ("host", plan_.host_total, "rss_peak_mib")):
        got = measured.get(key)
        rows[f"{side}.total"] = {"predicted_mib": round(total / MIB), "measured_mib": got, "error_pct": _error(total / MIB, got)}
    return rows


def _error(predicted: float, actual: float | None) -> float | None:
    if actual is None or actual <= 0:
        return None
    return round(100 * (predicted - actual) / actual, 1)


def budget_of(explicit: int | None, gpu_total: int | None) -> tuple[int | None, str]:
    """The budget a plan is judged against and where it came from."""
    if explicit:
        return explicit, "VRAM budget"
    if gpu_total:
        return gpu_total, "the GPU's memory"
    return None, ""


def plan_lines(plans: Sequence[tuple[str, MemoryPlan]]) -> list[str]:
    return [p.line(name) for name, p in plans]


__all__ = ["MemoryPlan", "PlanInputs", "budget_of", "compare", "inputs_of", "placement", "plan", "reported_buffers"]
