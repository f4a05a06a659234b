"""A GGUF's vocabulary size: the length of ``tokenizer.ggml.tokens``, read without loading the model.

KL divergence compares two models' distributions over the same tokens: a reference with another
vocabulary (another model family) is refused before llama-perplexity runs, which would only log
"inconsistent vocabulary" and carry on."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from pytest_llamabench.errors import ModelLoadError

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
TOKENS_KEY = "tokenizer.ggml.tokens"


def vocab_size(path: Path) -> int | None:
    """Number of tokens in the GGUF's vocabulary; None when it has none."""
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("not a GGUF file")
            pos = 16  # magic, version, tensor count
            (n_kv,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
            for _ in range(n_kv):
                key, pos = _string(buf, pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                if key == TOKENS_KEY and vtype == _ARRAY:
                    return int(struct.unpack_from("<Q", buf, pos + 4)[0])
                pos = _skip(buf, pos, vtype)
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path}: cannot read its vocabulary ({exc}); is it a complete GGUF file?") from None
    return None


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    n = int(struct.unpack_from("<Q", buf, pos)[0])
    start = pos + 8
    if start + n > len(buf):
        raise ValueError("a string runs past the end of the file")
    return bytes(buf[start : start + n]).decode("utf-8", errors="replace"), start + n


def _skip(buf: mmap.mmap, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[vtype]
    if vtype == _STRING:
        return _string(buf, pos)[1]
    if vtype == _ARRAY:
        item, count = (int(v) for v in struct.unpack_from("<IQ", buf, pos))
        pos += 12
        if item in _SCALAR_SIZES:
            return pos + count * _SCALAR_SIZES[item]
        for _ in range(count):
            pos = _skip(buf, pos, item)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


__all__ = ["vocab_size"]
