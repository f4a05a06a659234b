"""SmolVLM-256M's text model made from the embedded SmolLM2-135M: its weights, plus SmolVLM's image
marker tokens in the vocabulary.

SmolVLM-256M *is* SmolLM2-135M with a SigLIP encoder, and llama.cpp's ``idefics3`` path
(libmtmd) frames every image with single tokens that only SmolVLM's vocabulary has
(``<fake_token_around_image>``, ``<global-img>``, ``<row_R_col_C>``): with stock SmolLM2 the server
answers ``400 Invalid token``. This copies the embedded GGUF and appends those tokens (as
user-defined tokens, with embedding rows copied from existing ones), so the real multimodal path
runs end to end on the embedded model. Written once into the cache (a few seconds).
"""

from __future__ import annotations

from pathlib import Path

from pytest_llamabench.model.synth.writer import gguf_file

#: SmolVLM's added tokens that llama.cpp's idefics3 image framing looks up or writes.
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))  # fmt: skip
_USER_DEFINED = 4  # llama.cpp's token type for added tokens


def write_vlm_text_model(src: Path, dst: Path, added: tuple[str, ...] = IMAGE_TOKENS) -> Path:
    """Copy ``src`` to ``dst`` with ``added`` tokens appended to its vocabulary (atomically)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    with gguf_file(dst, arch) as writer:
        n_added = len(added)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            value = field.contents()
            vtype = gguf.GGUFValueType(field.types[0])
            sub_type = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
            if field.name == "tokenizer.ggml.tokens":
                value = [*value, *added]
            elif field.name == "tokenizer.ggml.token_type":
                value = [*value, *([_USER_DEFINED] * n_added)]
            elif field.name == "tokenizer.ggml.scores":
                value = [*value, *([0.0] * n_added)]
            elif field.name == f"{arch}.vocab_size":
                value = int(value) + n_added
            elif field.name == "general.name":
                value = f"{value} + SmolVLM image tokens"
            writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        for tensor in reader.tensors:
            data = np.asarray(tensor.data)
            if tensor.name in ("token_embd.weight", "output.weight"):  # one row per token: copy rows for the new ones
                data = np.concatenate([data, data[1 : 1 + n_added]])
            writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType(tensor.tensor_type))
    return dst


def cached_vlm_text_model(src: Path) -> Path:
    """``write_vlm_text_model(src)`` into ``<cache>/synth/``, once per source file."""
    from pytest_llamabench.server.build import cache_root

    stat = src.stat()
    dst = cache_root() / "synth" / f"{src.stem}+smolvlm-tokens-{stat.st_size}.gguf"
    if not dst.exists():
        write_vlm_text_model(src, dst)
    return dst


__all__ = ["IMAGE_TOKENS", "cached_vlm_text_model", "write_vlm_text_model"]
