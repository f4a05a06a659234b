"""Model shapes and quantization recipes: every tensor's name, shape and type, no numpy.

The shape table follows the llama.cpp loader (``src/models/qwen3moe.cpp``,
``src/models/qwen35moe.cpp``); the recipes follow ``llama-quantize``
(``src/llama-quant.cpp``) and ``convert_hf_to_gguf.py`` (which tensors stay F32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from pytest_llamabench.errors import ConfigError

#: (elements per block, bytes per block) of the tensor types the recipes produce
#: (the same numbers as ``gguf.GGML_QUANT_SIZES``; kept here so planning needs no numpy).
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}  # fmt: skip


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
