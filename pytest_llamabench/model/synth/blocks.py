"""Random but valid tensor data: quant blocks with finite fp16 scales, F32 values by tensor role."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pytest_llamabench.model.synth.shapes import BLOCK_SIZES

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: Target root-mean-square of the random weights (like a trained model's, ~1/sqrt(fan_in)),
#: so activations stay O(1) through all layers and every backend stays finite.
WEIGHT_RMS = 0.02
_PATTERN_BYTES = 8 * 1024 * 1024  # size of one random block pattern (tiled over each tensor)


@dataclasses.dataclass(frozen=True)
class _BlockFormat:
    """Where a quant block keeps its fp16 scales, and how large its values are at d == 1."""

    scale_fields: tuple[tuple[int, float], ...]  # (byte offset, value relative to d)
    value_rms: float  # rms of the dequantized values for uniformly random bytes and d == 1


# value_rms: Q8_0 q is int8 (rms 73.9); Q4_K y = d*sc*q - dmin*m with 6-bit sc, m and 4-bit q,
# dmin = 7.5 d centres it (rms 258); Q5_K the same with 5-bit q, dmin = 15.5 d (rms 527);
# Q6_K y = d*sc*(q-32) with int8 sc and 6-bit q (rms 73.9 * 18.5 = 1366).
_FORMATS: dict[str, _BlockFormat] = {
    "Q8_0": _BlockFormat(((0, 1.0),), 73.9),
    "Q4_K": _BlockFormat(((0, 1.0), (2, 7.5)), 258.3),
    "Q5_K": _BlockFormat(((0, 1.0), (2, 15.5)), 527.0),
    "Q6_K": _BlockFormat(((208, 1.0),), 1366.0),
}


def random_blocks(qtype: str, n_blocks: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """``n_blocks`` valid blocks of ``qtype``: random quants, finite fp16 scales giving weights of rms ~WEIGHT_RMS."""
    import numpy as np

    if qtype == "F16":
        return rng.normal(0.0, WEIGHT_RMS, n_blocks).astype(np.float16).view(np.uint8)
    fmt = _FORMATS[qtype]
    size = BLOCK_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    d = WEIGHT_RMS / fmt.value_rms * rng.uniform(0.5, 1.5, n_blocks)
    for offset, rel in fmt.scale_fields:
        blocks[:, offset : offset + 2] = (d * rel).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


class BlockPattern:
    """A random block pattern of one type, tiled over tensors from a per-tensor start block."""

    def __init__(self, qtype: str, rng: np.random.Generator) -> None:
        self.block_bytes = BLOCK_SIZES[qtype][1]
        self.n_blocks = max(1, _PATTERN_BYTES // self.block_bytes)
        self._buf = memoryview(random_blocks(qtype, self.n_blocks, rng).tobytes() * 2)

    def chunks(self, nbytes: int, start_block: int) -> Iterator[memoryview]:
        period = self.n_blocks * self.block_bytes
        offset = (start_block % self.n_blocks) * self.block_bytes
        while nbytes > 0:
            n = min(nbytes, period)
            yield self._buf[offset : offset + n]
            nbytes -= n


def f32_values(name: str, n: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Values of an F32 tensor: norms 1, SSM decay negative, conv small, router and the rest ~WEIGHT_RMS."""
    import numpy as np

    if name.endswith("norm.weight") or name.endswith("ssm_dt.bias"):
        return np.ones(n, dtype=np.float32)
    if name.endswith("ssm_a"):  # -exp(A_log), A_log ~ log U(1, 16) as in the HF init
        return -rng.uniform(1.0, 16.0, n).astype(np.float32)
    if "ssm_conv1d" in name:
        return rng.uniform(-0.5, 0.5, n).astype(np.float32)
    return rng.normal(0.0, WEIGHT_RMS, n).astype(np.float32)
