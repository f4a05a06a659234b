"""Where the decode time goes: bytes read per generated token on the GPU and on the CPU, and
the tok/s ceiling that the two memory bandwidths allow.

Per generated token every weight on a device is read once, except the routed experts of a MoE
layer (``ffn_*_exps``: only ``n_expert_used`` of ``n_expert`` are read) and the token
embedding (one row); the KV cache of each attention layer is read up to the current position.
The GPU part and the CPU part run one after the other in decode, so the ceiling is
``1 / (gpu_bytes / gpu_bandwidth + cpu_bytes / cpu_bandwidth)``; decode tok/s is reported as a
percentage of it. Why moving 8 more expert layers to the GPU buys what it buys: it moves
``8 × 3 × expert bytes × n_used / n_expert`` per token from the slow side to the fast one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pytest_llamabench.model.files import KV_TYPE_BYTES
from pytest_llamabench.model.plan import PlanInputs, placement
from pytest_llamabench.model.tensors import ModelTensors, Tensor


def tensor_read_bytes(model: ModelTensors, tensor: Tensor) -> float:
    """Bytes of ``tensor`` read to generate one token."""
    if tensor.name == "token_embd.weight":
        return tensor.nbytes / max(model.n_vocab, 1)
    if len(tensor.ne) == 3 and model.n_expert and tensor.ne[2] == model.n_expert:
        return tensor.nbytes * model.n_expert_used / model.n_expert
    return float(tensor.nbytes)


def bytes_per_token(model: ModelTensors, inputs: PlanInputs, n_past: int) -> tuple[float, float]:
    """(GPU bytes, host bytes) read per generated token at position ``n_past``."""
    on_gpu = placement(model, inputs)
    out = {True: 0.0, False: 0.0}
    for tensor in model.tensors:
        out[on_gpu[tensor.name]] += tensor_read_bytes(model, tensor)
    tensors = model.by_name()
    for il in range(model.n_layer):
        k, v = tensors.get(f"blk.{il}.attn_k.weight"), tensors.get(f"blk.{il}.attn_v.weight")
        if k is not None and v is not None and len(k.ne) > 1 and len(v.ne) > 1:
            per_token = k.ne[1] * KV_TYPE_BYTES[inputs.cache_type_k] + v.ne[1] * KV_TYPE_BYTES[inputs.cache_type_v]
            out[on_gpu.get(f"blk.{il}.attn_norm.weight", False)] += n_past * per_token
    return out[True], out[False]


@dataclasses.dataclass(frozen=True)
class Roofline:
    gpu_bytes: float
    host_bytes: float
    gpu_bandwidth: float | None  # bytes/s
    host_bandwidth: float
    host_bandwidth_source: str = ""

    @property
    def ceiling_tok_s(self) -> float | None:
        seconds = self.host_bytes / self.host_bandwidth
        if self.gpu_bytes:
            if not self.gpu_bandwidth:
                return None
            seconds += self.gpu_bytes / self.gpu_bandwidth
        return 1 / seconds if seconds > 0 else None

    def as_dict(self, measured_tok_s: float | None = None) -> dict[str, Any]:
        ceiling = self.ceiling_tok_s
        gpu_s = self.gpu_bytes / self.gpu_bandwidth if self.gpu_bandwidth else None
        return {
            "gpu_mb_per_token": round(self.gpu_bytes / 1e6, 1), "host_mb_per_token": round(self.host_bytes / 1e6, 1),
            "gpu_bandwidth_gbs": round(self.gpu_bandwidth / 1e9, 1) if self.gpu_bandwidth else None,
            "host_bandwidth_gbs": round(self.host_bandwidth / 1e9, 1), "host_bandwidth_source": self.host_bandwidth_source,
            "gpu_ms_per_token": round(1e3 * gpu_s, 2) if gpu_s is not None else None,
            "host_ms_per_token": round(1e3 * self.host_bytes / self.host_bandwidth, 2),
            "ceiling_tok_s": round(ceiling, 1) if ceiling else None,
            "measured_tok_s": round(measured_tok_s, 1) if measured_tok_s else None,
            "percent_of_ceiling": round(100 * measured_tok_s / ceiling, 1) if ceiling and measured_tok_s else None,
        }  # fmt: skip


def roofline(model: ModelTensors, inputs: PlanInputs, n_past: int, *, gpu_bandwidth: float | None,
             host_bandwidth: float, host_source: str = "") -> Roofline:  # fmt: skip
    gpu, host = bytes_per_token(model, inputs, n_past)
    return Roofline(gpu, host, gpu_bandwidth, host_bandwidth, host_source)


def mean_position(workload: Mapping[str, Any]) -> int:
    """The average KV position while a workload generates: its prompt plus half its tokens."""
    prompt = int(workload.get("prompt_tokens") or 0) * int(workload.get("turns") or 1)
    return prompt + int(workload.get("n_predict") or 0) // 2


__all__ = ["Roofline", "bytes_per_token", "mean_position", "roofline", "tensor_read_bytes"]
