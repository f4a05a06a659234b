"""``kind = "vision"``: images and a question through /v1/chat/completions, per repetition.

The images are real PNGs made at run time (``images`` of ``image_size`` px, a different one each
repetition: no image cache), sent as ``image_url`` data URIs with ``prompt_tokens`` tokens of
text; the config's model needs ``mmproj``. Checked: the answer is not empty, ``n_predict`` tokens
were generated, the server evaluated more prompt tokens than the text alone (the image tokens)
and reused no cache. Measured, besides tok/s and TTFT: ``image_encode_ms``, the time the server
spent encoding the images (vision encoder + projector), from its own timestamped log lines of
this request: each ``encoding mtmd batch`` to the ``decoding image batch`` that follows it (the
server logs no duration for the encode itself; the text model's decoding of the image tokens
after it is prompt evaluation).
"""

from __future__ import annotations

import base64
import dataclasses
import re
import struct
import zlib
from typing import Any

from pytest_llamabench.config import Workload
from pytest_llamabench.errors import ConfigError
from pytest_llamabench.measure.chat_options import TokenSplit, request_options, used_sampling
from pytest_llamabench.measure.sample import Prompts, Sample, aggregate, check, request_of, where
from pytest_llamabench.metrics import IMAGE_ENCODE_MS, SAMPLE_METRICS
from pytest_llamabench.server.launcher import Server

METRICS = (*SAMPLE_METRICS, IMAGE_ENCODE_MS)
#: llama.cpp's log prefix ``M.SS.mmm.uuu`` (minutes, seconds, ms, µs since start) on the two lines
_EVENT = re.compile(r"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) \w .*?(encoding mtmd batch|decoding image batch)", re.M)
QUESTION = "Describe what you see in the image. "


@dataclasses.dataclass
class VisionSample(Sample):
    image_encode_ms: float | None = None


def png(size: int, seed: int) -> bytes:
    """A ``size`` x ``size`` RGB PNG: gradients, stripes and a disc that move with ``seed``."""
    cx, cy, r = (seed * 37) % size, (seed * 61) % size, size // 4
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")  # filter: none
        for x in range(size):
            inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
            row += bytes((255 if inside else (x * 255 // size), (y * 255 // size), ((x // 16 + y // 16 + seed) % 2) * 200))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b"")


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def run_once(server: Server, workload: Workload, prompts: Prompts, index: int) -> Sample:
    at = where(server, workload)
    if getattr(server, "projector", None) is None:
        raise ConfigError(
            f"{workload.source}: kind = \"vision\" needs a vision projector, and config {server.config.name}'s "
            f"model has none: set mmproj = \"…\" in {server.config.model.source or '[models.X]'}"
        )
    text = QUESTION + server.client.detokenize(prompts.slice(index * 7919, workload.prompt_tokens))
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": data_uri(png(workload.image_size, index * 13 + i))}}
                for i in range(workload.images)]  # fmt: skip
    split = TokenSplit()
    log_start = _log_size(server)
    result = server.client.stream_chat(
        {"messages": [{"role": "user", "content": content}], "max_tokens": workload.n_predict, "ignore_eos": True,
         "cache_prompt": False, **request_options(server, workload)}, split  # fmt: skip
    )
    timings = result.timings
    check(timings.get("predicted_n") == workload.n_predict, at,
          f"generated {timings.get('predicted_n')} tokens, asked for {workload.n_predict}")  # fmt: skip
    check(bool(result.text.strip()) or split.reasoning > 0, at, "the answer to the image is empty")
    text_tokens = len(server.client.tokenize(text))
    check(int(timings.get("prompt_n", 0)) > text_tokens, at,
          f"the server evaluated {timings.get('prompt_n')} prompt tokens for {text_tokens} of text and "
          f"{workload.images} image(s): the images were not turned into tokens")  # fmt: skip
    check(timings.get("cache_n", 0) == 0, at, f"the prompt cache was reused (cache_n={timings.get('cache_n')})")
    encode_ms = _encode_ms(server, log_start)
    sample = aggregate([request_of(result)])
    return VisionSample(**dataclasses.asdict(sample), image_encode_ms=encode_ms)


def endpoint(prompts: Prompts) -> str:
    return "/v1/chat/completions"


def facts(server: Server, workload: Workload) -> dict[str, Any]:
    projector = getattr(server, "projector", None)
    return {"mmproj": projector.as_dict() if projector is not None else None,
            "images": {"count": workload.images, "size_px": workload.image_size, "format": "png"},
            "sampling": used_sampling(server), "thinking": workload.thinking}  # fmt: skip


def _log_size(server: Server) -> int:
    try:
        return server.log_path.stat().st_size
    except OSError:
        return 0


def _encode_ms(server: Server, start: int) -> float | None:
    """Encode time of the images the server logged since ``start``; None when its log does not show
    them (a container's log without timestamps, a build that logs otherwise)."""
    try:
        with server.log_path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    total, began, pairs = 0.0, None, 0
    for m in _EVENT.finditer(text):
        at = int(m.group(1)) * 60_000 + int(m.group(2)) * 1000 + int(m.group(3)) + int(m.group(4)) / 1000
        if m.group(5) == "encoding mtmd batch":
            began = at
        elif began is not None:
            total, began, pairs = total + at - began, None, pairs + 1
    return total if pairs else None
