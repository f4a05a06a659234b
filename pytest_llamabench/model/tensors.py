"""The tensor table of a GGUF model: every tensor's name, shape, type and size, and the few
hyperparameters a memory plan needs. Read from the file's header (no tensor data is touched),
or built from a synthetic shape (``model.synth.shapes``) without writing the file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_llamabench.errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor: ggml shape (``ne[0]`` is the row length), type name and bytes."""

    name: str
    ne: tuple[int, ...]
    qtype: str
    nbytes: int

    @property
    def layer(self) -> int | None:
        """The block index of ``blk.N.…`` tensors; None for input/output tensors."""
        if self.name.startswith("blk."):
            return int(self.name.split(".")[1])
        return None


@dataclasses.dataclass(frozen=True)
class ModelTensors:
    """A model's tensors and the hyperparameters a plan needs."""

    arch: str
    n_layer: int
    n_ctx_train: int
    n_expert: int
    n_expert_used: int
    tensors: tuple[Tensor, ...]
    source: str = ""
    n_head: int = 0
    head_dim: int = 0

    @property
    def n_embd(self) -> int:
        return self._embd().ne[0]

    @property
    def n_vocab(self) -> int:
        return self._embd().ne[1] if len(self._embd().ne) > 1 else 0

    def _embd(self) -> Tensor:
        return next((t for t in self.tensors if t.name == "token_embd.weight"), Tensor("", (0, 0), "F32", 0))

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_name(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors}

    @classmethod
    def from_gguf(cls, path: Path) -> ModelTensors:
        """Read the tensor infos and hyperparameters of a GGUF file (cached by path, size, mtime)."""
        stat = path.stat()
        return _read(path.resolve(), stat.st_size, stat.st_mtime_ns)

    @classmethod
    def from_synthetic(cls, shape_name: str, quant: str) -> ModelTensors:
        """The tensors ``synth-model --shape SHAPE --quant QUANT`` would write."""
        from pytest_llamabench.model.synth.shapes import get_shape, plan_tensors

        shape = get_shape(shape_name)
        tensors = tuple(Tensor(t.name, t.ne, t.qtype, t.nbytes) for t in plan_tensors(shape, quant))
        return cls(shape.arch, shape.n_layer, shape.context_length, shape.n_expert, shape.n_expert_used, tensors,
                   f"synthetic {shape.name} {quant}", shape.n_head, shape.head_dim)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _read(path: Path, size: int, mtime_ns: int) -> ModelTensors:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from pytest_llamabench.model.files import read_gguf_tables

    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, table, _ = read_gguf_tables(buf)
        tensors = []
        for name, ne, type_id, _offset in table:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
            tensors.append(Tensor(name, ne, qtype.name, math.prod(ne) // block * type_size))
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ModelLoadError(f"{path}: cannot read its tensor table ({exc}); is it a complete GGUF file?") from None
    return _model(meta, tensors, str(path))


def _model(meta: Mapping[str, Any], tensors: Iterable[Tensor], source: str) -> ModelTensors:
    arch = str(meta.get("general.architecture", "unknown"))

    def num(key: str) -> int:
        value = meta.get(f"{arch}.{key}")
        return int(value) if isinstance(value, (int, float)) else 0

    n_head, n_embd = num("attention.head_count"), num("embedding_length")
    head_dim = num("attention.key_length") or (n_embd // n_head if n_head else 0)
    return ModelTensors(arch, num("block_count"), num("context_length"), num("expert_count"),
                        num("expert_used_count"), tuple(tensors), source, n_head, head_dim)  # fmt: skip


__all__ = ["ModelTensors", "Tensor"]
