"""The vision projector (``mmproj``) of a model: resolved, verified before launch, checked
against the text model.

A projector is a GGUF whose ``general.architecture`` is ``clip`` with a projector type
(``clip.projector_type`` or ``clip.vision.projector_type``) and a vision encoder. A 1 KB file,
an HTML error page saved as ``.gguf``, a truncated download, a text model given as mmproj, or a
projector made for another model (its projection width is not the text model's ``n_embd``)
is a ``ModelLoadError`` naming the file and the key, before any server starts.
"""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llamabench.errors import ModelLoadError
from pytest_llamabench.model.files import TOKENS_KEY, ModelInfo, read_gguf_tables, verify_model

if TYPE_CHECKING:
    from pytest_llamabench.config import ServerConfig

#: ``mmproj = "synth:NAME"``: a synthetic projector (``model.synth.projector``) made on first use.
SYNTH_PREFIX = "synth:"
#: The fewest tensors a vision encoder can have (patch embedding, one block, a projection).
MIN_TENSORS = 8
MIN_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ProjectorInfo:
    path: Path
    size: int
    sha256: str | None
    projector_type: str
    projection_dim: int
    image_size: int
    patch_size: int
    n_layer: int
    tensor_count: int

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "path": str(self.path), **{
            k: v for k, v in dataclasses.asdict(self).items() if k != "path"}}  # fmt: skip


def resolve_mmproj(value: str, where: str, text_model: ModelInfo | None = None) -> Path:
    """A path, or ``synth:NAME`` written into the cache on first use, projecting to the text model's
    width (SmolVLM-256M's encoder for SmolLM2-135M's 576, or for a synthetic Qwen3-30B-A3B's 2048)."""
    if value.startswith(SYNTH_PREFIX):
        from pytest_llamabench.model.synth.projector import cached_synthetic_projector

        width = text_model.n_embd if text_model is not None and text_model.n_embd else None
        return cached_synthetic_projector(value[len(SYNTH_PREFIX) :], where, projection_dim=width)
    return Path(value)


def verify_projector(path: Path, *, text_model: ModelInfo | None, where: str, sha256: str | None = None) -> ProjectorInfo:
    """Check that ``path`` is a sane vision projector for ``text_model``."""
    info = verify_model(path, sha256=sha256, where=where, hash_file=sha256 is not None)
    meta = info.metadata
    fix = "download the model's mmproj file again (the projector GGUF published next to the model)"
    if info.architecture != "clip":
        raise ModelLoadError(
            f"{where}: {path} is a {info.architecture!r} model, not a vision projector "
            f"(general.architecture must be 'clip'); {fix}"
        )
    projector_type = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    if not projector_type or not meta.get("clip.has_vision_encoder"):
        raise ModelLoadError(
            f"{where}: {path} has no vision projector (clip.projector_type and clip.has_vision_encoder "
            f"missing: an audio-only or broken projector?); {fix}"
        )
    if info.tensor_count < MIN_TENSORS or info.size < MIN_BYTES:
        raise ModelLoadError(
            f"{where}: {path} holds {info.tensor_count} tensors in {info.size} bytes: too small for a vision "
            f"encoder (a partial download?); {fix}"
        )
    projection_dim = int(meta.get("clip.vision.projection_dim") or 0)
    if text_model is not None and text_model.n_embd and projection_dim and projection_dim != text_model.n_embd:
        raise ModelLoadError(
            f"{where}: {path} projects images to {projection_dim}-wide embeddings "
            f"(clip.vision.projection_dim), but the text model {text_model.path.name} is {text_model.n_embd} wide "
            f"({text_model.architecture}.embedding_length): it is the mmproj of another model; use the mmproj "
            "published with this model"
        )
    if projector_type == "idefics3" and text_model is not None:
        _check_image_tokens(text_model, path, where)
    return ProjectorInfo(
        path=path,
        size=info.size,
        sha256=info.sha256,
        projector_type=str(projector_type),
        projection_dim=projection_dim,
        image_size=int(meta.get("clip.vision.image_size") or 0),
        patch_size=int(meta.get("clip.vision.patch_size") or 0),
        n_layer=int(meta.get("clip.vision.block_count") or 0),
        tensor_count=info.tensor_count,
    )


#: Tokens llama.cpp's idefics3 framing (SmolVLM) looks up in the text model's vocabulary.
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>")


def _check_image_tokens(text_model: ModelInfo, projector: Path, where: str) -> None:
    """An idefics3 (SmolVLM) projector frames images with tokens only SmolVLM's vocabulary has;
    without them every image request fails with ``400 Invalid token``."""
    with text_model.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        tokens = set(read_gguf_tables(buf, keep=(TOKENS_KEY,))[0].get(TOKENS_KEY) or ())
    missing = [t for t in IDEFICS3_TOKENS if t not in tokens]
    if missing:
        raise ModelLoadError(
            f"{where}: {projector.name} is an idefics3 (SmolVLM) projector, but the text model "
            f"{text_model.path.name} has no {', '.join(missing)} token: every image would fail with 400 Invalid "
            "token; use the text GGUF published with the projector (for the embedded SmolLM2: "
            'embedded = "smollm2-135m-instruct-q4_1-vlm-tokens")'
        )


def vision_projector(config: ServerConfig, text_model: ModelInfo) -> ProjectorInfo | None:
    """The verified projector of a config's model (``mmproj`` on its ``[models.X]``), or None."""
    spec = config.model
    if spec.mmproj is None:
        return None
    where = f"{spec.source}.mmproj" if spec.source else "mmproj"
    path = resolve_mmproj(spec.mmproj, where, text_model)
    return verify_projector(path, text_model=text_model, where=where, sha256=spec.mmproj_sha256)


__all__ = ["ProjectorInfo", "SYNTH_PREFIX", "resolve_mmproj", "verify_projector", "vision_projector"]
