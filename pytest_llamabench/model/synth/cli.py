"""The ``synth-model`` command of ``python -m pytest_llamabench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pytest_llamabench.model.synth.shapes import RECIPES, SHAPES, default_file_name, get_recipe, get_shape, tensor_data_size
from pytest_llamabench.model.synth.writer import write_synthetic_model

_GB = 1e9


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
