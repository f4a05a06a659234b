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

``--fit on`` is predicted, not left to "fit decides": ``predict_fit`` replays llama.cpp's
``common/fit.cpp`` (pinned build) for one GPU against this plan's sizes. Fit changes nothing
when the whole model fits ``budget - --fit-target`` (1024 MiB by default) and gives up when the
user set ``-ngl``, ``-ot`` or ``--n-cpu-moe``. Otherwise, for an MoE model whose dense weights
fit, it keeps every layer on the GPU and moves the routed experts of the *last* layers to the
CPU (the opposite end from ``--n-cpu-moe``), as few as fit the target, then tries to keep part
of one more layer's FFN on the GPU (up, then up+gate; else it moves that layer's whole FFN). A
dense model, or an MoE model whose dense weights alone do not fit, gets the most layers
(``-ngl``) that fit, with their experts on the CPU. Fit measures with llama.cpp's own buffer
sizes; the prediction uses this plan's, so it is off by the plan's error near the target.
Several GPUs, or an unset ctx that fit would shrink, are not predicted ("fit decides").

The plan orders and prunes a search and says "will not fit" before a launch; it never
replaces a launch as evidence.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_llamabench.model.files import KV_TYPE_BYTES
from pytest_llamabench.model.tensors import ModelTensors, Tensor

MIB = 2**20
GIB = 2**30
GPU_CONTEXT_MIB = 450  # CUDA context + cuBLAS workspace per process (H100/H200, CUDA 12); calibrated on the GPU run
HOST_BASE_MIB = 40  # llama-server binary, runtime, tokenizer
CUDA_HOST_MIB = 500  # host memory of the CUDA runtime and libraries (cuBLAS) in a GPU server
EXPERT_RE = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
FIT_TARGET_MIB = 1024  # llama.cpp's default --fit-target: the memory fit leaves free on each GPU
#: common/fit.cpp get_overflow_pattern: the tensors of a partial layer that fit sends to the CPU
FIT_TO_CPU = {
    "moe": r"blk\.{il}\.ffn_(up|down|gate_up|gate)_(ch|)exps",
    "up": r"blk\.{il}\.ffn_(gate|gate_up|down).*",  # the up projection stays on the GPU
    "gate": r"blk\.{il}\.ffn_down.*",  # up and gate stay on the GPU
    "attn": r"blk\.{il}\.ffn_(gate|up|gate_up|down).*",  # the whole FFN (shared expert too) to the CPU
}
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
    fit_target_mib: int = FIT_TARGET_MIB  # --fit-target (the first device's, when several are given)


def inputs_of(config: Any, ctx: int | None = None) -> PlanInputs:
    """A ``ServerConfig``'s plan inputs (``ctx``: a resolved context size, if the config's is not a number)."""
    server: Mapping[str, Any] = config.server
    value = server.get("ctx", 4096) if ctx is None else ctx
    overrides = list(config.override_tensor)
    args = list(config.args)
    fit_target = FIT_TARGET_MIB
    for i, arg in enumerate(args[:-1]):  # -ot and --fit-target given through raw args count too
        if arg in ("-ot", "--override-tensor"):
            overrides += args[i + 1].split(",")
        elif arg in ("-fitt", "--fit-target") and re.match(r"^\d+", args[i + 1]):
            fit_target = int(re.split(r"[,/]", args[i + 1])[0])
    return PlanInputs(
        gpu=bool(config.gpu), n_gpu_layers=server.get("n_gpu_layers", 0), n_cpu_moe=int(server.get("n_cpu_moe", 0)),
        overrides=tuple(overrides), ctx=value if isinstance(value, int) else 4096,
        parallel=int(server.get("parallel", 1)), ubatch=int(server.get("ubatch", 512)),
        cache_type_k=str(server.get("cache_type_k", "f16")), cache_type_v=str(server.get("cache_type_v", "f16")),
        flash_attn=str(server.get("flash_attn", "auto")), load_mode=str(server.get("load_mode", "auto")),
        fit=str(server.get("fit", "off")), fit_target_mib=fit_target,
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
    fit_decides: bool = False  # --fit on, not predicted (see predict_fit): llama.cpp chooses the split at load
    notes: tuple[str, ...] = ()
    host_budget: int | None = None  # bytes the server may use on the host (a container's memory_limit)
    fit: str = ""  # --fit on, predicted: what fit does (see predict_fit)
    placed: PlanInputs | None = None  # the inputs the server runs with (fit's choice), when fit changed them

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
            why = f" ({self.notes[-1]})" if self.notes else ""
            return f"{name}: --fit on decides the split at load{why}; host ≈ {_gb(self.host_total)} at most"
        if not self.gpu_total:
            limit = (f" of a {_gb(self.host_budget)} limit: {'fits' if self.fits else 'will not fit'}"
                     if self.host_budget else "")  # fmt: skip
            return f"{name}: needs ≈ {_gb(self.host_total)} of host memory (all on the CPU){limit}"
        if self.budget is None:
            return f"{name}: needs ≈ {_gb(self.gpu_total)} of VRAM and ≈ {_gb(self.host_total)} of host memory"
        verdict = "fits" if self.fits else "will not fit"
        name = f"{name} ({self.fit})" if self.fit else name
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
            "notes": list(self.notes), "fit": self.fit or None, "fit_layout": self.fit_layout(),
        }  # fmt: skip

    def fit_layout(self) -> dict[str, Any] | None:
        """fit.cpp's terms for the predicted layout (as its log prints them, see ``reported_fit``)."""
        if self.placed is None or not self.fit.startswith("fit: experts"):
            return None
        rules = self.placed.overrides
        return {"n_gpu_layers": self.placed.n_gpu_layers, "n_partial": len(rules),
                "first_partial": fit_first_partial(rules, self.n_layer)}  # fmt: skip


def fit_first_partial(rules: Sequence[str], n_layer: int) -> str:
    """Which part of the first partial layer a fit layout (``predict_fit``'s overrides) sends to the CPU."""
    start = n_layer + 1 - len(rules)
    return next((k for k, v in FIT_TO_CPU.items() if rules and v.format(il=start) + "=CPU" == rules[0]), "moe")


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
    if inputs.gpu and inputs.fit == "on":
        fitted, what = predict_fit(model, inputs, budget)
        if fitted is None:
            return dataclasses.replace(plan(model, dataclasses.replace(inputs, fit="off"), budget=budget,
                                            budget_source=budget_source, host_budget=host_budget),
                                       fit_decides=True, notes=(what,))  # fmt: skip
        fitted_plan = plan(model, fitted, budget=budget, budget_source=budget_source, host_budget=host_budget)
        return dataclasses.replace(fitted_plan, fit=what, placed=fitted)
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
                      budget_source, notes=tuple(notes), host_budget=host_budget)  # fmt: skip


def predict_fit(model: ModelTensors, inputs: PlanInputs, budget: int | None) -> tuple[PlanInputs | None, str]:
    """What ``--fit on`` sets on one GPU (common/fit.cpp at the pinned build; module docstring):
    the inputs the server then runs with, and a summary; ``None`` and why when it is not predicted."""
    if budget is None:
        return None, "no VRAM budget or GPU memory known to predict it from"
    auto = inputs.n_gpu_layers == "auto"
    base = dataclasses.replace(inputs, fit="off", n_gpu_layers="all" if auto else inputs.n_gpu_layers)
    target = budget - inputs.fit_target_mib * MIB

    def fits(candidate: PlanInputs) -> bool:
        return plan(model, candidate, budget=budget).gpu_total <= target

    # fit.cpp's order: nothing to do; else shrink an unset context; only then give up on what the user set
    if fits(base):
        return base, "fit: everything fits, nothing moved"
    if not inputs.ctx:
        return None, "fit would shrink the unset context first: not predicted"
    if not auto:
        return base, "fit gives up: n_gpu_layers is set"
    if inputs.overrides or inputs.n_cpu_moe:
        return base, "fit gives up: tensor overrides (-ot, --n-cpu-moe) are set"
    total = model.n_layer + 1  # the output layer counts as the last "layer"

    def layout(ngl: int, n_part: int, first: str = "moe") -> PlanInputs:
        """``ngl`` layers on the GPU, the last ``n_part`` of them partial (their experts on the CPU)."""
        start = total - n_part  # fit.cpp: il0 = hp_ngl + 1 - ngl, + the n_full whole layers
        rules = [FIT_TO_CPU[first if il == start else "moe"].format(il=il) + "=CPU" for il in range(start, total)]
        return dataclasses.replace(base, n_gpu_layers=ngl, overrides=tuple(rules))

    def most(low: int, high: int, ok: Callable[[int], bool]) -> int:
        """The largest n in [low, high] with ok(n), given ok(low) (ok is monotone)."""
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if ok(mid) else (low, mid - 1)
        return low

    if not model.n_expert:
        ngl = most(0, total, lambda n: fits(dataclasses.replace(base, n_gpu_layers=n)))
        return dataclasses.replace(base, n_gpu_layers=ngl), f"fit: -ngl {ngl} of {total}"
    dense = dataclasses.replace(base, overrides=(r"blk\.\d+\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU",))
    if not fits(dense) or not fits(layout(total, total - 1)):  # step 3 only: the most dense-only layers, counted from the back
        ngl = most(0, total, lambda n: n == 0 or fits(_dense_only(base, total, n)))
        return _dense_only(base, total, ngl), f"fit: -ngl {ngl} of {total}, every expert on the CPU"
    # step 4: whole layers from the front, the experts of the last n_part layers on the CPU (n_part >= 2:
    # the output "layer" has no experts, and with everything whole it would not have needed fitting)
    n_part = total - most(1, total, lambda full: fits(layout(total, total - full)))
    chosen, first = layout(total, n_part), "moe"
    if fits(up := layout(total, n_part, "up")):  # part of one more layer: up, then up + gate
        chosen, first = up, "up"
        if fits(gate := layout(total, n_part, "gate")):
            chosen, first = gate, "gate"
    elif fits(attn := layout(total, n_part, "attn")):  # else that layer's whole FFN to the CPU
        chosen, first = attn, "attn"
    start = total - n_part
    kept = {"moe": "", "up": f"; layer {start} keeps its up projection", "gate": f"; layer {start} keeps up and gate",
            "attn": f"; layer {start}'s whole FFN too"}[first]  # fmt: skip
    return chosen, f"fit: experts of layers {start}-{model.n_layer - 1} on the CPU ({model.n_layer - start} of {model.n_layer}{kept})"


def _dense_only(base: PlanInputs, total: int, ngl: int) -> PlanInputs:
    """fit.cpp step 3: ``ngl`` layers from the back on the GPU, all but the first of them without experts."""
    start = total - ngl + 1
    rules = tuple(FIT_TO_CPU["moe"].format(il=il) + "=CPU" for il in range(start, total))
    return dataclasses.replace(base, n_gpu_layers=ngl, overrides=rules)


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


_FIT_SET = re.compile(r"set ngl_per_device\[0\]\.\(n_layer, n_part(?:, overflow_type)?\)=\((\d+), (\d+)(?:, (\w+))?\)")
_FIT_DONE = re.compile(r"CUDA0 \([^)]*\): +(\d+) layers(?: \( *(\d+) overflowing\))?, +(\d+) MiB used, +(-?\d+) MiB free")


def reported_fit(log: str) -> dict[str, Any] | None:
    """What ``--fit on`` chose, from its own log lines (common/fit.cpp; None when fit changed nothing):
    ``{"n_gpu_layers": 41, "n_partial": 15, "first_partial": "gate", "used_mib": 14708, "free_mib": 1086}``
    (``n_partial``/``first_partial`` None when fit only set ``-ngl``)."""
    done = _FIT_DONE.findall(log)
    if not done:
        return None
    layers, overflowing, used_mib, free_mib = done[-1]
    n_layer, used, free = int(layers), int(used_mib), int(free_mib)
    if not overflowing:  # fit stopped at step 3: -ngl only, logged without a partial count
        return {"n_gpu_layers": n_layer, "n_partial": None, "first_partial": None, "used_mib": used, "free_mib": free}
    n_part = int(overflowing)
    chosen = [m for m in _FIT_SET.findall(log) if (int(m[0]), int(m[1])) == (n_layer, n_part)]
    first = (chosen[-1][2] or "moe").lower() if chosen else "moe"
    return {"n_gpu_layers": n_layer, "n_partial": n_part, "first_partial": first, "used_mib": used, "free_mib": free}


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


__all__ = ["FIT_TO_CPU", "MemoryPlan", "PlanInputs", "budget_of", "compare", "fit_first_partial", "inputs_of", "placement", "plan", "predict_fit",
           "reported_buffers", "reported_fit"]
