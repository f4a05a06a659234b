"""Does a llama-server build know a model's architecture? Checked before the model is loaded.

llama.cpp keeps its architecture names (``general.architecture`` values such as ``qwen3moe``,
``qwen35moe``) as string literals in ``src/llama-arch.cpp``, so they sit NUL-terminated in the
built binary (static build) or in ``libllama.so`` beside it. A name absent from all of them is
certainly unknown to the build: the launch fails at once with the fix, instead of after a
minutes-long load of a 20 GB file. A name present is taken as known (the server's own
``unknown model architecture`` error is still classified if it was not).
"""

from __future__ import annotations

import functools
import mmap
from pathlib import Path

from pytest_llamabench.errors import UnsupportedArchitecture

#: Present in every llama.cpp build's architecture table: if this is missing, the probe found
#: the wrong files (a wrapper script, a stripped launcher) and says nothing.
_ALWAYS_KNOWN = b"llama\x00"
_LIB_GLOBS = ("libllama*.so*", "libllama*.dylib")


def build_files(binary: Path) -> tuple[Path, ...]:
    """The binary and any libllama next to it or in ../lib, ../lib64 (shared builds)."""
    binary = binary.resolve()
    files = [binary]
    for folder in (binary.parent, binary.parent.parent / "lib", binary.parent.parent / "lib64"):
        for pattern in _LIB_GLOBS:
            files += sorted(p for p in folder.glob(pattern) if p.is_file())
    return tuple(dict.fromkeys(files))


@functools.lru_cache(maxsize=32)
def _knows(files: tuple[Path, ...], stamps: tuple[tuple[int, int], ...], name: str) -> bool | None:
    needle = name.encode() + b"\x00"
    found_table = False
    for path in files:
        try:
            with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if buf.find(needle) >= 0:
                    return True
                found_table = found_table or buf.find(_ALWAYS_KNOWN) >= 0
        except (OSError, ValueError):
            continue
    return False if found_table else None


def build_knows_architecture(binary: Path, name: str) -> bool | None:
    """True: the build has the name; False: it certainly does not; None: cannot tell."""
    files = build_files(binary)
    stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _knows(files, stamps, name)


def check_architecture(binary: Path, architecture: str, *, model: Path, where: str) -> None:
    """Raise ``UnsupportedArchitecture`` with the fix when the build cannot load ``architecture``."""
    if architecture in ("", "unknown", "clip"):
        return
    if build_knows_architecture(binary, architecture) is False:
        raise UnsupportedArchitecture(
            f"{where}: this llama.cpp build ({binary}) does not know architecture {architecture!r} of "
            f"{model.name} (general.architecture): build a newer one, e.g. `python -m pytest_llamabench "
            "build-server --sdist llama_cpp_python-<newer>.tar.gz`, or pass --llamabench-server-bin / an "
            "image of a build that supports it"
        )


__all__ = ["build_files", "build_knows_architecture", "check_architecture"]
