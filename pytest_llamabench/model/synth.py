"""Synthetic GGUF models: a real model's exact tensor shapes and quant types, random weights.

llama.cpp's speed and memory use depend on tensor shapes and quantization types, not on
weight values. ``write_synthetic_model`` writes a GGUF that llama-server loads like the
real file: same architecture keys, tensor names, shapes and types (so the same buffers,
``-ot``/``--n-cpu-moe`` splits and out-of-memory boundary), a real BPE tokenizer and a
ChatML template, and random but valid quant blocks. Tensor data is tiled from a
pre-generated random block pattern and written in large sequential writes, hashed on
the fly, so a ~20 GB file takes well under a minute.

The shape table follows the llama.cpp loader (``src/models/qwen3moe.cpp``,
``src/models/qwen35moe.cpp``); the recipes follow ``llama-quantize``
(``src/llama-quant.cpp``) and ``convert_hf_to_gguf.py`` (which tensors stay F32).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import hashlib
import math
import mmap
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llamabench.errors import ConfigError

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import numpy.typing as npt

Log = Callable[[str], None]
Chunk = bytes | memoryview

#: (elements per block, bytes per block) of the tensor types the recipes produce
#: (the same numbers as ``gguf.GGML_QUANT_SIZES``; kept here so planning needs no numpy).
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}  # fmt: skip

#: Target root-mean-square of the random weights (like a trained model's, ~1/sqrt(fan_in)),
#: so activations stay O(1) through all layers and every backend stays finite.
WEIGHT_RMS = 0.02
GGUF_ALIGNMENT = 32
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_SOURCE = "smollm2-135m-instruct-q4_1"  # embedded model whose BPE vocab and merges are reused
_PATTERN_BYTES = 8 * 1024 * 1024  # size of one random block pattern (tiled over each tensor)
_STAGE_BYTES = 16 * 1024 * 1024  # one write
_DIRECT_ALIGN = 4096  # O_DIRECT length and offset alignment
_GB = 1e9


# --------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class LinearAttention:
    """Gated delta-net (linear attention) hyperparameters of a hybrid ``qwen35moe`` model."""

    full_attention_interval: int  # every Nth layer (N-1, 2N-1, ...) is full attention, the rest linear
    conv_kernel: int
    state_size: int  # head dim of the linear K and V heads
    group_count: int  # number of linear K heads
    time_step_rank: int  # number of linear V heads

    @property
    def inner_size(self) -> int:
        return self.state_size * self.time_step_rank


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that fix every tensor shape of a GGUF model."""

    name: str  # table key, e.g. "qwen3-30b-a3b"
    label: str  # file-name stem and general.name, e.g. "Qwen3-30B-A3B"
    arch: str  # general.architecture
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int  # width of one routed expert's FFN
    n_vocab: int
    context_length: int
    rope_theta: float
    rms_eps: float = 1e-6
    n_ff: int = 0  # dense FFN width (metadata only in these MoE models; 0: key not written)
    n_ff_shexp: int = 0  # width of the shared expert (0: none)
    rope_dim: int = 0  # rotary dims when only part of the head rotates (0: key not written)
    rope_sections: tuple[int, ...] = ()  # M-RoPE sections (qwen35moe)
    linear: LinearAttention | None = None
    published: tuple[tuple[str, int], ...] = ()  # (recipe, bytes) of published real files
    assumptions: str = ""

    def is_recurrent(self, il: int) -> bool:
        """Whether layer ``il`` is a linear-attention (recurrent) layer."""
        return self.linear is not None and (il + 1) % self.linear.full_attention_interval != 0

    def published_size(self, quant: str) -> int | None:
        return dict(self.published).get(quant)


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape(
            name="qwen3-30b-a3b", label="Qwen3-30B-A3B", arch="qwen3moe",
            n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
            n_expert=128, n_expert_used=8, n_ff_exp=768, n_ff=6144, n_vocab=151936,
            context_length=40960, rope_theta=1e6,
            published=(("q8_0", 32_500_000_000), ("q4_k_m", 18_600_000_000)),
        ),
        ModelShape(
            name="qwen35-35b-a3b", label="Qwen3.5-35B-A3B", arch="qwen35moe",
            n_layer=40, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
            n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512, n_vocab=248320,
            context_length=262144, rope_theta=1e7, rope_dim=64, rope_sections=(11, 11, 10, 0),
            linear=LinearAttention(full_attention_interval=4, conv_kernel=4, state_size=128,
                                   group_count=16, time_step_rank=32),
            published=(("q8_0", 36_900_000_000),),
            assumptions=(
                "tensor list and keys from llama.cpp's qwen35moe loader; hyperparameter values from "
                "published GGUF metadata logs, not from the HF config; no MTP block (40 layers, as "
                "files converted without MTP); published Q8_0 size is unsloth's (some F16 tensors)"
            ),
        ),
        ModelShape(
            name="tiny-qwen3moe", label="Tiny-Qwen3MoE", arch="qwen3moe",
            n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
            n_expert=4, n_expert_used=2, n_ff_exp=256, n_ff=512, n_vocab=50000,
            context_length=4096, rope_theta=1e6,
            assumptions="not a real model: the qwen3moe graph at toy size, for fast tests",
        ),
        ModelShape(
            name="tiny-qwen35moe", label="Tiny-Qwen3.5MoE", arch="qwen35moe",
            n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
            n_expert=4, n_expert_used=2, n_ff_exp=256, n_ff_shexp=256, n_vocab=50000,
            context_length=4096, rope_theta=1e7, rope_dim=16, rope_sections=(3, 3, 2, 0),
            linear=LinearAttention(full_attention_interval=4, conv_kernel=4, state_size=64,
                                   group_count=2, time_step_rank=4),
            assumptions="not a real model: the qwen35moe hybrid graph at toy size, for fast tests",
        ),
    )
}  # fmt: skip


def get_shape(name: str) -> ModelShape:
    """The named model shape, or a ConfigError listing the known ones."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ConfigError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}") from None


# --------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A quantization mixture, as ``llama-quantize`` would produce it."""

    name: str  # CLI name, e.g. "q4_k_m"
    label: str  # file-name suffix, e.g. "Q4_K_M"
    file_type: int  # general.file_type (llama_ftype)
    default_type: str  # type of every quantizable tensor no rule changes


RECIPES: dict[str, Recipe] = {
    r.name: r for r in (Recipe("q8_0", "Q8_0", 7, "Q8_0"), Recipe("q4_k_m", "Q4_K_M", 15, "Q4_K"))
}


def get_recipe(name: str) -> Recipe:
    """The named recipe, or a ConfigError listing the known ones."""
    try:
        return RECIPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown quantization recipe {name!r}; known: {', '.join(RECIPES)}") from None


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: name, ggml shape (``ne[0]`` is the row length) and type."""

    name: str
    ne: tuple[int, ...]
    qtype: str

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def nbytes(self) -> int:
        block, size = BLOCK_SIZES[self.qtype]
        return self.n_elements // block * size


def tensor_shapes(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the llama.cpp loader requires for ``shape``, in file order."""
    if shape.arch not in ("qwen3moe", "qwen35moe"):
        raise ConfigError(f"{shape.name}: architecture {shape.arch!r} is not supported")
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (shape.n_embd, shape.n_vocab))]
    for il in range(shape.n_layer):
        out += _layer_tensors(shape, il)
    out += [("output_norm.weight", (shape.n_embd,)), ("output.weight", (shape.n_embd, shape.n_vocab))]
    return out


def _layer_tensors(shape: ModelShape, il: int) -> list[tuple[str, tuple[int, ...]]]:
    b, e = f"blk.{il}.", shape.n_embd
    out: list[tuple[str, tuple[int, ...]]] = [(b + "attn_norm.weight", (e,))]
    if shape.is_recurrent(il):
        out += _linear_attention_tensors(shape, b)
    else:
        out += _attention_tensors(shape, b)
    if shape.arch == "qwen35moe":
        out.append((b + "post_attention_norm.weight", (e,)))
    else:
        out.append((b + "ffn_norm.weight", (e,)))
    return out + _moe_tensors(shape, b)


def _attention_tensors(shape: ModelShape, b: str) -> list[tuple[str, tuple[int, ...]]]:
    e, d = shape.n_embd, shape.head_dim
    q_out = shape.n_head * d * (2 if shape.arch == "qwen35moe" else 1)  # qwen3.5: query + output gate
    return [
        (b + "attn_q.weight", (e, q_out)),
        (b + "attn_k.weight", (e, shape.n_head_kv * d)),
        (b + "attn_v.weight", (e, shape.n_head_kv * d)),
        (b + "attn_output.weight", (shape.n_head * d, e)),
        (b + "attn_q_norm.weight", (d,)),
        (b + "attn_k_norm.weight", (d,)),
    ]


def _linear_attention_tensors(shape: ModelShape, b: str) -> list[tuple[str, tuple[int, ...]]]:
    assert shape.linear is not None
    lin, e = shape.linear, shape.n_embd
    key_dim = lin.state_size * lin.group_count
    conv_dim = 2 * key_dim + lin.inner_size
    return [
        (b + "attn_qkv.weight", (e, conv_dim)),
        (b + "attn_gate.weight", (e, lin.inner_size)),
        (b + "ssm_conv1d.weight", (lin.conv_kernel, conv_dim)),
        (b + "ssm_dt.bias", (lin.time_step_rank,)),
        (b + "ssm_a", (lin.time_step_rank,)),
        (b + "ssm_beta.weight", (e, lin.time_step_rank)),
        (b + "ssm_alpha.weight", (e, lin.time_step_rank)),
        (b + "ssm_norm.weight", (lin.state_size,)),
        (b + "ssm_out.weight", (lin.inner_size, e)),
    ]


def _moe_tensors(shape: ModelShape, b: str) -> list[tuple[str, tuple[int, ...]]]:
    e, f, x = shape.n_embd, shape.n_ff_exp, shape.n_expert
    out: list[tuple[str, tuple[int, ...]]] = [
        (b + "ffn_gate_inp.weight", (e, x)),
        (b + "ffn_gate_exps.weight", (e, f, x)),
        (b + "ffn_up_exps.weight", (e, f, x)),
        (b + "ffn_down_exps.weight", (f, e, x)),
    ]
    if shape.n_ff_shexp:
        fs = shape.n_ff_shexp
        out += [
            (b + "ffn_gate_inp_shexp.weight", (e,)),
            (b + "ffn_gate_shexp.weight", (e, fs)),
            (b + "ffn_up_shexp.weight", (e, fs)),
            (b + "ffn_down_shexp.weight", (fs, e)),
        ]
    return out


def plan_tensors(shape: ModelShape, quant: str) -> list[TensorPlan]:
    """The tensors of ``shape`` with the types ``llama-quantize`` gives them under ``quant``."""
    recipe = get_recipe(quant)
    named = tensor_shapes(shape)
    n_attn_v = sum(1 for name, _ in named if _is_attn_v(name))
    i_attn_v = 0
    plans = []
    for name, ne in named:
        if stays_float(name, ne):
            qtype = "F32"
        elif recipe.name == "q4_k_m":
            qtype = _q4_k_m_type(shape, name, i_attn_v, n_attn_v)
        else:
            qtype = recipe.default_type
        i_attn_v += _is_attn_v(name)
        plans.append(TensorPlan(name, ne, _fit_block(qtype, ne[0])))
    return plans


def stays_float(name: str, ne: Sequence[int]) -> bool:
    """Tensors that convert_hf_to_gguf writes as F32 and llama-quantize never quantizes."""
    return (
        len(ne) < 2
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")  # ssm_a, ssm_dt.bias
        or "ffn_gate_inp" in name  # the expert router
        or "ssm_conv1d" in name
    )


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of the layers that get more bits (first/last eighth, every third)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _is_attn_v(name: str) -> bool:
    # llama-quant counts the fused attn_qkv of linear-attention layers as an attn_v tensor too
    return "attn_v.weight" in name or "attn_qkv.weight" in name


def _q4_k_m_type(shape: ModelShape, name: str, i_attn_v: int, n_attn_v: int) -> str:
    """llama-quant.cpp's Q4_K_M rules (``llama_tensor_get_type_impl``) for the tensors these arches have."""
    if name == "output.weight":
        return "Q6_K"
    if _is_attn_v(name):
        if shape.n_expert == 8:
            return "Q8_0"
        return "Q6_K" if use_more_bits(i_attn_v, n_attn_v) else "Q4_K"
    if "attn_k.weight" in name and shape.n_expert == 8:
        return "Q8_0"
    if "attn_output.weight" in name and shape.n_expert == 8:
        return "Q5_K"
    if "ffn_down" in name:  # ffn_down_exps and ffn_down_shexp: layer taken from the name
        return "Q6_K" if use_more_bits(int(name.split(".")[1]), shape.n_layer) else "Q4_K"
    return "Q4_K"


def _fit_block(qtype: str, row: int) -> str:
    """A type whose block fits rows of ``row`` elements (llama-quant's fallback, simplified:
    it picks Q5_0/Q5_1 for Q4_K/Q5_K, here Q8_0; none of the table's shapes needs it)."""
    block = BLOCK_SIZES[qtype][0]
    if row % block == 0:
        return qtype
    return "Q8_0" if row % BLOCK_SIZES["Q8_0"][0] == 0 else "F16"


def tensor_data_size(shape: ModelShape, quant: str) -> int:
    """Bytes of tensor data (without metadata and padding) of the file ``quant`` would give."""
    return sum(t.nbytes for t in plan_tensors(shape, quant))


def default_file_name(shape: ModelShape, quant: str) -> str:
    return f"{shape.label}-synthetic-{get_recipe(quant).label}.gguf"


# --------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A BPE tokenizer for the GGUF metadata."""

    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: int
    eos_id: int
    pad_id: int


@functools.lru_cache(maxsize=2)
def _source_vocab(source: Path | None = None) -> Vocab:
    """The real vocab and merges of a GGUF: ``source`` (e.g. llama.cpp's models/ggml-vocab-qwen2.gguf,
    the real Qwen2/Qwen3 tokenizer) or, by default, the embedded SmolLM2 model (ChatML tokens)."""
    from gguf import GGUFReader

    from pytest_llamabench.model.files import embedded_model_path

    reader = GGUFReader(source or embedded_model_path(TOKENIZER_SOURCE, where="synth-model"), "r")

    def items(key: str) -> list[npt.NDArray[Any]]:
        f = reader.get_field(key)
        if f is None:
            raise ConfigError(f"the embedded model {TOKENIZER_SOURCE} has no {key}; reinstall it")
        return [f.parts[i] for i in f.data]

    tokens = tuple(p.tobytes().decode("utf-8") for p in items("tokenizer.ggml.tokens"))
    types = tuple(int(p[0]) for p in items("tokenizer.ggml.token_type"))
    merges = tuple(p.tobytes().decode("utf-8") for p in items("tokenizer.ggml.merges"))
    pre_field = reader.get_field("tokenizer.ggml.pre")
    pre = str(pre_field.contents()) if pre_field is not None else "default"
    ids = {tok: i for i, tok in enumerate(tokens)}
    missing = [t for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>") if t not in ids]
    if missing:
        raise ConfigError(f"the embedded model {TOKENIZER_SOURCE} lacks the ChatML tokens {missing}")
    return Vocab(pre, tokens, types, merges, ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"])


def synthetic_vocab(n_vocab: int, source: Path | None = None) -> Vocab:
    """A real tokenizer (see ``_source_vocab``) padded with unique filler tokens up to ``n_vocab``."""
    base = _source_vocab(source)
    if n_vocab < len(base.tokens):
        raise ConfigError(f"vocab size {n_vocab} is below the source tokenizer's {len(base.tokens)}")
    taken = set(base.tokens)
    filler = [f"<|synthetic_{i}|>" for i in range(n_vocab - len(base.tokens))]
    if taken.intersection(filler):
        raise ConfigError("a filler token collides with a real token")  # cannot happen with SmolLM2
    return dataclasses.replace(
        base, tokens=base.tokens + tuple(filler), token_types=base.token_types + (1,) * len(filler)
    )


# --------------------------------------------------------------------------- random blocks


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


class _Pattern:
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


# --------------------------------------------------------------------------- writing


class _SequentialWriter:
    """Writes a file front to back through a page-aligned staging buffer, hashing it on the way.

    Writes are whole, aligned buffers with O_DIRECT where the file system allows it: on a
    busy host, buffered writes of 20 GB cost minutes of kernel time in page-cache work.
    A second thread sha256es the same (immutable) buffers; both drop the GIL.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd, self._direct = _open_direct(path)
        self._stage = mmap.mmap(-1, _STAGE_BYTES)
        self._view = memoryview(self._stage)
        self._fill = 0
        self.position = 0
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[Chunk | None] = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._hash_loop, name="synth-sha256", daemon=True)
        self._thread.start()

    def __enter__(self) -> _SequentialWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._view.release()
        self._stage.close()

    def _hash_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._sha.update(item)

    def write(self, data: Chunk) -> None:
        """Append immutable ``data`` to the file and the hash."""
        self._queue.put(data)
        src = memoryview(data)
        done = 0
        while done < len(src):
            n = min(len(src) - done, _STAGE_BYTES - self._fill)
            self._view[self._fill : self._fill + n] = src[done : done + n]
            self._fill += n
            done += n
            if self._fill == _STAGE_BYTES:
                self._flush(_STAGE_BYTES)
        self.position += len(src)

    def pad(self) -> None:
        """Zero-pad to the GGUF data alignment."""
        if n := -self.position % GGUF_ALIGNMENT:
            self.write(bytes(n))

    def finish(self) -> str:
        """Write what is staged, cut the file to its length, return its sha256."""
        if self._fill:
            whole = -(-self._fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self._view[self._fill : whole] = bytes(whole - self._fill)
            self._flush(whole)
        os.ftruncate(self._fd, self.position)
        self._queue.put(None)
        self._thread.join()
        return self._sha.hexdigest()

    def _flush(self, length: int) -> None:
        try:
            written = os.write(self._fd, self._view[:length])
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            self._reopen_buffered()  # the file system took O_DIRECT at open but not at write
            written = os.write(self._fd, self._view[:length])
        if written != length:
            raise OSError("short write to the synthetic model (disk full?)")
        self._fill = 0

    def _reopen_buffered(self) -> None:
        offset = os.lseek(self._fd, 0, os.SEEK_CUR)
        os.close(self._fd)
        self._fd, self._direct = os.open(self._path, os.O_WRONLY), False
        os.lseek(self._fd, offset, os.SEEK_SET)


def _open_direct(path: Path) -> tuple[int, bool]:
    """Open ``path`` for writing from its start, with O_DIRECT where available; say which."""
    flags = os.O_WRONLY | os.O_CREAT
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError:
            pass  # tmpfs and some others refuse O_DIRECT: plain writes work too
    return os.open(path, flags, 0o644), False


def write_synthetic_model(
    shape: str, quant: str, path: Path, *, seed: int = 0, vocab: Path | None = None, log: Log = print
) -> Path:
    """Write ``path``: a GGUF with ``shape``'s tensors under recipe ``quant`` and random weights.

    Written to ``PATH.partial`` and renamed when complete; its sha256, computed while
    writing, goes into the project's sha256 cache so verifying it later costs no re-read.
    """
    from pytest_llamabench.model.files import record_file_sha256

    model, recipe = get_shape(shape), get_recipe(quant)
    plans = plan_tensors(model, recipe.name)
    total = sum(t.nbytes for t in plans)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(path, total)
    partial = path.with_name(path.name + ".partial")
    log(f"writing {path.name}: {model.label} {recipe.label}, {len(plans)} tensors, {total / _GB:.2f} GB")
    start = time.monotonic()
    try:
        _write_metadata(partial, model, recipe, plans, seed, vocab)
        digest = _write_tensor_data(partial, plans, seed, log, start)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    record_file_sha256(path, digest)
    elapsed = time.monotonic() - start
    size = path.stat().st_size
    log(f"wrote {path} ({size / _GB:.2f} GB) in {elapsed:.1f} s ({size / _GB / max(elapsed, 1e-9):.2f} GB/s)")
    return path


def _check_free_space(path: Path, nbytes: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < nbytes + 256 * 1024 * 1024:
        raise ConfigError(
            f"{path.parent} has {free / _GB:.1f} GB free; the synthetic model needs {nbytes / _GB:.1f} GB"
        )


def _write_metadata(
    path: Path, model: ModelShape, recipe: Recipe, plans: Sequence[TensorPlan], seed: int, vocab: Path | None
) -> None:
    """Header, key/values and tensor infos, through gguf's GGUFWriter (no tensor data)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, model.arch)
    _add_hparams(writer, model)
    writer.add_name(f"{model.label} synthetic")
    writer.add_type("model")
    writer.add_file_type(recipe.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("llamabench.synthetic.shape", model.name)
    writer.add_string("llamabench.synthetic.recipe", recipe.name)
    writer.add_uint32("llamabench.synthetic.seed", seed)
    _add_tokenizer(writer, synthetic_vocab(model.n_vocab, vocab))
    for t in plans:
        writer.add_tensor_info(
            t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.qtype]
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def _add_hparams(writer: gguf.GGUFWriter, model: ModelShape) -> None:
    writer.add_block_count(model.n_layer)
    writer.add_context_length(model.context_length)
    writer.add_embedding_length(model.n_embd)
    if model.n_ff:
        writer.add_feed_forward_length(model.n_ff)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_layer_norm_rms_eps(model.rms_eps)
    writer.add_expert_count(model.n_expert)
    writer.add_expert_used_count(model.n_expert_used)
    writer.add_expert_feed_forward_length(model.n_ff_exp)
    if model.n_ff_shexp:
        writer.add_expert_shared_feed_forward_length(model.n_ff_shexp)
    if model.rope_dim:
        writer.add_rope_dimension_count(model.rope_dim)
    if model.rope_sections:
        writer.add_rope_dimension_sections(list(model.rope_sections))
    if (lin := model.linear) is not None:
        writer.add_ssm_conv_kernel(lin.conv_kernel)
        writer.add_ssm_state_size(lin.state_size)
        writer.add_ssm_group_count(lin.group_count)
        writer.add_ssm_time_step_rank(lin.time_step_rank)
        writer.add_ssm_inner_size(lin.inner_size)
        writer.add_full_attention_interval(lin.full_attention_interval)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _write_tensor_data(path: Path, plans: Sequence[TensorPlan], seed: int, log: Log, start: float) -> str:
    """Append every tensor's data (aligned) to the metadata at ``path``; return the file's sha256."""
    import numpy as np

    rng = np.random.default_rng(seed)
    patterns: dict[str, _Pattern] = {}
    total = sum(t.nbytes for t in plans)
    done, next_report = 0, total / 10
    metadata = path.read_bytes()  # what GGUFWriter wrote; rewritten in place so every write is aligned
    with _SequentialWriter(path) as out:
        out.write(metadata)
        out.pad()
        for index, t in enumerate(plans):
            if t.qtype == "F32":
                out.write(f32_values(t.name, t.n_elements, rng).tobytes())
            else:
                if t.qtype not in patterns:
                    patterns[t.qtype] = _Pattern(t.qtype, rng)
                for chunk in patterns[t.qtype].chunks(t.nbytes, start_block=index * 7919):
                    out.write(chunk)
            out.pad()
            done += t.nbytes
            if total > _GB and done >= next_report:
                log(f"  {done / _GB:6.2f} / {total / _GB:.2f} GB  ({time.monotonic() - start:.1f} s)")
                next_report += total / 10
        return out.finish()


# --------------------------------------------------------------------------- CLI


def format_shape_table() -> str:
    """One line per shape: architecture, size, and the expected file size of each recipe."""
    lines = [f"{'shape':<16} {'arch':<10} {'layers':>6} {'experts':>8} {'vocab':>7}  "
             + "  ".join(f"{r.label:>8}" for r in RECIPES.values()) + "  published"]  # fmt: skip
    for s in SHAPES.values():
        sizes = "  ".join(f"{_human(tensor_data_size(s, r.name)):>8}" for r in RECIPES.values())
        published = ", ".join(f"{get_recipe(q).label} {_human(n)}" for q, n in s.published) or "-"
        lines.append(
            f"{s.name:<16} {s.arch:<10} {s.n_layer:>6} {s.n_expert:>4}/{s.n_expert_used:<3} {s.n_vocab:>7}  "
            f"{sizes}  {published}"
        )
        if s.assumptions:
            lines.append(f"{'':<16} note: {s.assumptions}")
    return "\n".join(lines)


def _human(nbytes: int) -> str:
    return f"{nbytes / _GB:.1f} GB" if nbytes >= _GB else f"{nbytes / 1e6:.0f} MB"


def default_out_dir() -> Path:
    from pytest_llamabench.server.build import cache_root

    return cache_root() / "synthetic-models"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``synth-model`` command to the project's CLI."""
    p = subparsers.add_parser(
        "synth-model", help="write a GGUF with a real model's shapes and random weights",
        description="Write a GGUF with a real model's exact tensor shapes and quantization types "
        "and random weights, to benchmark llama-server without downloading the model.",
    )  # fmt: skip
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b", help="model shape (see --list)")
    p.add_argument("--quant", choices=list(RECIPES), default="q4_k_m", help="quantization recipe")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="output file")
    where.add_argument("--out-dir", type=Path, help="output folder, file named after shape and recipe "
                       "(default: the user cache's synthetic-models/)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--vocab", type=Path, help="GGUF to take the tokenizer from (e.g. llama.cpp's "
                   "models/ggml-vocab-qwen2.gguf); default: the embedded SmolLM2 model's")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the shapes with their expected file sizes")
    p.set_defaults(func=_synth_model)


def _synth_model(args: argparse.Namespace) -> int:
    if args.list:
        print(format_shape_table())
        return 0
    shape = get_shape(args.shape)
    path = args.out or (args.out_dir or default_out_dir()) / default_file_name(shape, args.quant)
    write_synthetic_model(args.shape, args.quant, path, seed=args.seed, vocab=args.vocab, log=_log)
    print(path)
    return 0


def _log(message: str) -> None:
    print(f"[llamabench] {message}", file=sys.stderr, flush=True)
