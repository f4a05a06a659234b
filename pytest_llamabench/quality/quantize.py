"""Models made with the pinned llama-quantize: ``quantize = { from = "smollm2", type = "Q2_K" }``.

``llama-quantize --allow-requantize SOURCE OUT TYPE`` (requantizing an already quantized file,
such as the embedded Q4_1 SmolLM2, needs the flag). The file is cached outside the repository,
under ``<cache>/quality/quants/``, named by the source's sha256, the type and the llama-quantize
build, so a second run reuses it; it appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pytest_llamabench.config import ModelSpec, ServerConfig
from pytest_llamabench.errors import QualityRunFailed
from pytest_llamabench.quality.tools import QUANTIZE, Tool, find_tool


def quant_dir() -> Path:
    from pytest_llamabench.server.build import cache_root

    return cache_root() / "quality" / "quants"


def _name(source_sha256: str, qtype: str, build: str) -> str:
    return f"{source_sha256[:16]}-{qtype}-{build[:12]}.gguf"


def materialize(config: ServerConfig, server_binary: Path, server_where: str,
                log: Callable[[str], None] = print) -> ServerConfig:  # fmt: skip
    """``config`` with its model's file made (and its path set) when the model is quantized."""
    model = config.model
    if model.quantize is None:
        return config
    made = make_quantized(model, find_tool(QUANTIZE, server_binary, server_where), log=log)
    return dataclasses.replace(config, model=dataclasses.replace(model, path=made))


def make_quantized(model: ModelSpec, tool: Tool, *, log: Callable[[str], None] = print) -> Path:
    from pytest_llamabench.model.files import verify_model

    spec = model.quantize
    assert spec is not None
    source = spec.source.resolve()
    digest = verify_model(source, sha256=spec.source.sha256, where=spec.source.source).sha256
    assert digest is not None  # verify_model hashes by default
    out = quant_dir() / _name(digest, spec.type, tool.build)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    argv = [str(tool.path), "--allow-requantize", str(source), str(tmp), spec.type, str(os.cpu_count() or 1)]
    log(f"quantizing {spec.source.name} -> {model.name} ({spec.type}) with {tool.path.name}")
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=3600)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise QualityRunFailed(f"{model.source}: llama-quantize took over an hour for {model.name}; "
                               "make the file yourself and declare it with path =") from None  # fmt: skip
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise QualityRunFailed(f"{model.source}.quantize: llama-quantize failed (exit {done.returncode}) making "
                               f"{spec.type} from {source.name}: {tail.splitlines()[-1] if tail else 'no output'}; "
                               "check the type, or make the file yourself and declare it with path =",
                               log_tail=tail)  # fmt: skip
    tmp.replace(out)
    log(f"quantized {model.name} ({spec.type}) in {time.monotonic() - started:.1f} s -> {out}")
    return out


__all__ = ["make_quantized", "materialize", "quant_dir"]
