"""The tokenizer of a synthetic model: a real BPE vocab and merges, padded to the shape's vocab size."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llamabench.errors import ConfigError

if TYPE_CHECKING:
    import numpy.typing as npt

TOKENIZER_SOURCE = "smollm2-135m-instruct-q4_1"  # embedded model whose BPE vocab and merges are reused


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
