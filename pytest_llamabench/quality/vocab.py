"""A GGUF's vocabulary size: the length of ``tokenizer.ggml.tokens``, read without loading the model.

KL divergence compares two models' distributions over the same tokens: a reference with another
vocabulary (another model family) is refused before llama-perplexity runs, which would only log
"inconsistent vocabulary" and carry on."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from pytest_llamabench.errors import ModelLoadError
from pytest_llamabench.model.files import TOKENS_KEY, read_gguf_tables


def vocab_size(path: Path) -> int | None:
    """Number of tokens in the GGUF's vocabulary; None when it has none."""
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            tokens = read_gguf_tables(buf, keep=(TOKENS_KEY,))[0].get(TOKENS_KEY)
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path}: cannot read its vocabulary ({exc}); is it a complete GGUF file?") from None
    return len(tokens) if isinstance(tokens, list) else None


__all__ = ["vocab_size"]
