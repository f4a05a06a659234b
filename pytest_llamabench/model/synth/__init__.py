"""Synthetic GGUF models: a real model's exact tensor shapes and quant types, random weights.

llama.cpp's speed and memory use depend on tensor shapes and quantization types, not on
weight values. ``write_synthetic_model`` writes a GGUF that llama-server loads like the
real file: same architecture keys, tensor names, shapes and types (so the same buffers,
``-ot``/``--n-cpu-moe`` splits and out-of-memory boundary), a real BPE tokenizer and a
ChatML template, and random but valid quant blocks. Tensor data is tiled from a
pre-generated random block pattern and written in large sequential writes, hashed on
the fly, so a ~20 GB file takes well under a minute.

Modules: ``shapes`` (shape table, recipes, tensor plans; no numpy), ``vocab`` (tokenizer),
``blocks`` (random tensor data), ``writer`` (the GGUF file), ``cli`` (``synth-model``).
"""

from __future__ import annotations

from pytest_llamabench.model.synth.blocks import WEIGHT_RMS, f32_values, random_blocks
from pytest_llamabench.model.synth.cli import default_out_dir, format_shape_table, register
from pytest_llamabench.model.synth.shapes import (
    BLOCK_SIZES,
    RECIPES,
    SHAPES,
    LinearAttention,
    ModelShape,
    Recipe,
    TensorPlan,
    default_file_name,
    get_recipe,
    get_shape,
    plan_tensors,
    stays_float,
    tensor_data_size,
    tensor_shapes,
    use_more_bits,
)
from pytest_llamabench.model.synth.vocab import TOKENIZER_SOURCE, Vocab, synthetic_vocab
from pytest_llamabench.model.synth.writer import CHATML_TEMPLATE, GGUF_ALIGNMENT, write_synthetic_model

__all__ = [
    "BLOCK_SIZES",
    "CHATML_TEMPLATE",
    "GGUF_ALIGNMENT",
    "RECIPES",
    "SHAPES",
    "TOKENIZER_SOURCE",
    "WEIGHT_RMS",
    "LinearAttention",
    "ModelShape",
    "Recipe",
    "TensorPlan",
    "Vocab",
    "default_file_name",
    "default_out_dir",
    "f32_values",
    "format_shape_table",
    "get_recipe",
    "get_shape",
    "plan_tensors",
    "random_blocks",
    "register",
    "stays_float",
    "synthetic_vocab",
    "tensor_data_size",
    "tensor_shapes",
    "use_more_bits",
    "write_synthetic_model",
]
