"""llama.cpp's quality tools (llama-perplexity, llama-quantize), taken from the same build as the
llama-server in use: the pinned build's bin directory, or beside the user's own llama-server."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pytest_llamabench.errors import ToolMissing

PERPLEXITY = "llama-perplexity"
QUANTIZE = "llama-quantize"


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool binary and the identity of its build (sha256 of the file: CPU and CUDA builds of one
    commit give different logits, so caches key on the binary itself)."""

    path: Path
    build: str

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "build_sha256": self.build}


def find_tool(name: str, server_binary: Path, server_where: str) -> Tool:
    """``name`` beside ``server_binary`` (which came from ``server_where``: a flag, env var, PATH, the cache)."""
    from pytest_llamabench.model.files import file_sha256

    path = server_binary.parent / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolMissing(
            f"{server_where}: no {name} beside {server_binary}; quality workloads run {name} from the same "
            f"llama.cpp build as llama-server: put it next to that llama-server (build the tools target too), "
            f"or drop your llama-server setting to use the pinned build (python -m pytest_llamabench build-server)"
        )
    return Tool(path, file_sha256(path))


__all__ = ["PERPLEXITY", "QUANTIZE", "Tool", "find_tool"]
