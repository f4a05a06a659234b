"""A synthetic vision projector (mmproj) GGUF: a real projector's shapes, random weights.

No package registry carries a small vision model as GGUF, so the embedded default pairs the
embedded SmolLM2-135M text model with a projector in the exact shapes of SmolVLM-256M's
(``mmproj-SmolVLM-256M-Instruct``: a SigLIP-B/16 ViT at 512 px, 12 layers of 768, and the
``idefics3`` pixel-shuffle projector onto SmolLM2-135M's 576-wide embeddings; SmolVLM-256M *is*
SmolLM2-135M plus this encoder). llama-server's real multimodal path (``--mmproj``, libmtmd,
clip.cpp's SigLIP graph) runs on it: image decoding, preprocessing, the ViT, the projector and
the image tokens in the text model's batch. Encoding cost depends on shapes, not weights; the
answers are noise.

Every image is resized to ``clip.vision.preproc_image_size`` (here the tile size, 512 px) and
encoded as an overview plus its tiles; the published SmolVLM file may set a larger longest edge
(more tiles per image), so compare encode times per tile, not per image.

Required keys and tensors follow llama.cpp's ``tools/mtmd/clip.cpp`` (``load_hparams``,
``load_tensors``, ``clip_graph_siglip``) of the pinned build.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.model.synth.writer import gguf_file


@dataclasses.dataclass(frozen=True)
class ProjectorShape:
    """A SigLIP ViT + idefics3 projector."""

    name: str
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int
    scale_factor: int  # pixel shuffle: (scale_factor**2) patches -> one image token
    projection_dim: int  # the text model's n_embd
    description: str = ""

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        return self.n_patches // self.scale_factor**2


PROJECTOR_SHAPES: dict[str, ProjectorShape] = {
    s.name: s
    for s in (
        ProjectorShape("smolvlm-256m", 512, 16, 768, 3072, 12, 12, 4, 576,
                       "SmolVLM-256M-Instruct's vision encoder + projector, for SmolLM2-135M (n_embd 576)"),
        ProjectorShape("tiny", 64, 16, 64, 128, 2, 2, 2, 576,
                       "a 2-layer toy in the same layout, for fast tests (SmolLM2-135M's n_embd 576)"),
    )
}  # fmt: skip


def get_projector_shape(name: str, where: str = "") -> ProjectorShape:
    if name not in PROJECTOR_SHAPES:
        raise ConfigError(f"{where}: unknown synthetic projector {name!r}; known: {', '.join(PROJECTOR_SHAPES)}")
    return PROJECTOR_SHAPES[name]


def write_synthetic_projector(shape: ProjectorShape, path: Path, *, seed: int = 0,
                              projection_dim: int | None = None) -> Path:  # fmt: skip
    """Write ``path`` (atomically) and return it. ``projection_dim`` overrides the shape's
    (a projector for another text model, e.g. to test the mismatch check)."""
    import numpy as np

    out_dim = projection_dim or shape.projection_dim
    rng = np.random.default_rng(seed)
    d, ff = shape.n_embd, shape.n_ff

    def weight(*numpy_shape: int) -> np.ndarray:  # ggml ne reversed
        return (rng.standard_normal(numpy_shape, dtype=np.float32) * 0.02).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    with gguf_file(path, "clip") as writer:
        writer.add_string("general.name", f"synthetic {shape.name} projector (random weights)")
        writer.add_string("general.description", shape.description)
        writer.add_uint32("general.file_type", 1)  # mostly f16
        writer.add_string("clip.projector_type", "idefics3")
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_bool("clip.has_audio_encoder", False)
        writer.add_bool("clip.use_gelu", True)
        writer.add_uint32("clip.vision.image_size", shape.image_size)
        writer.add_uint32("clip.vision.patch_size", shape.patch_size)
        writer.add_uint32("clip.vision.embedding_length", d)
        writer.add_uint32("clip.vision.feed_forward_length", ff)
        writer.add_uint32("clip.vision.block_count", shape.n_layer)
        writer.add_uint32("clip.vision.projection_dim", out_dim)
        writer.add_uint32("clip.vision.attention.head_count", shape.n_head)
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
        writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
        writer.add_uint32("clip.vision.projector.scale_factor", shape.scale_factor)
        writer.add_uint32("clip.vision.preproc_image_size", shape.image_size)

        p = shape.patch_size
        writer.add_tensor("v.patch_embd.weight", weight(d, 3, p, p))
        writer.add_tensor("v.patch_embd.bias", zeros(d))
        writer.add_tensor("v.position_embd.weight", (rng.standard_normal((shape.n_patches, d), dtype=np.float32) * 0.02))
        for il in range(shape.n_layer):
            for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
                writer.add_tensor(f"v.blk.{il}.{name}.weight", weight(d, d))
                writer.add_tensor(f"v.blk.{il}.{name}.bias", zeros(d))
            writer.add_tensor(f"v.blk.{il}.ln1.weight", ones(d))
            writer.add_tensor(f"v.blk.{il}.ln1.bias", zeros(d))
            writer.add_tensor(f"v.blk.{il}.ln2.weight", ones(d))
            writer.add_tensor(f"v.blk.{il}.ln2.bias", zeros(d))
            writer.add_tensor(f"v.blk.{il}.ffn_up.weight", weight(ff, d))
            writer.add_tensor(f"v.blk.{il}.ffn_up.bias", zeros(ff))
            writer.add_tensor(f"v.blk.{il}.ffn_down.weight", weight(d, ff))
            writer.add_tensor(f"v.blk.{il}.ffn_down.bias", zeros(d))
        writer.add_tensor("v.post_ln.weight", ones(d))
        writer.add_tensor("v.post_ln.bias", zeros(d))
        writer.add_tensor("mm.model.fc.weight", weight(out_dim, d * shape.scale_factor**2))
    return path


def cached_synthetic_projector(name: str, where: str = "", *, projection_dim: int | None = None) -> Path:
    """The synthetic projector ``name`` in the cache (``<cache>/synth/mmproj-synthetic-<name>-<width>-<tag>.gguf``),
    written on first use (the 190 MB SmolVLM-256M shape takes a few seconds). ``projection_dim``:
    the text model's width when it is not the shape's own (576)."""
    from pytest_llamabench.server.build import cache_root

    shape = get_projector_shape(name, where)
    if projection_dim is not None:
        shape = dataclasses.replace(shape, projection_dim=projection_dim)
    tag = hashlib.sha256(repr(shape).encode()).hexdigest()[:8]  # a changed shape is a new file
    path = cache_root() / "synth" / f"mmproj-synthetic-{shape.name}-{shape.projection_dim}-{tag}.gguf"
    if not path.exists():
        write_synthetic_projector(shape, path)
    return path


__all__ = ["PROJECTOR_SHAPES", "ProjectorShape", "cached_synthetic_projector", "get_projector_shape",
           "write_synthetic_projector"]  # fmt: skip
