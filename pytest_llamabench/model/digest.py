"""sha256 of model files, with a cache that a changed file cannot pass.

A 20 GB model takes tens of seconds to hash (``benchmarks/hash_cost.py`` measures it), so
a digest is cached in ``<cache root>/sha256-cache.json``, keyed by the resolved path and
valid only while the file's size, mtime, **ctime**, inode and device are all unchanged.

Why ctime: a write changes mtime, and mtime can be set back (``touch -d``, ``os.utime``),
but setting it back changes ctime, and no system call sets ctime: only the kernel does,
to "now", on every write or metadata change. So a flipped byte with the old mtime restored
is re-hashed. What still defeats it is below the file system (root changing the clock
during the write, ``debugfs``, editing the raw disk) or a file system that does not keep
ctime. For those, ``verify = "always"`` on a model re-hashes it in every run (once per
process: a config's restarts and workloads reuse that run's digest). A renamed, copied or
chmod-ed file is simply hashed again (its inode or ctime changed).

A file that changes while it is hashed is not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 8 * 1024 * 1024
#: Digests hashed by this process, keyed like the cache (``verify = "always"`` reuses them).
_THIS_RUN: dict[tuple[str, tuple[int, ...]], str] = {}


def stat_key(path: Path) -> tuple[int, ...]:
    """What must be unchanged for a cached digest to stand: size, mtime, ctime, inode, device."""
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path, *, always: bool = False) -> str:
    """sha256 of ``path``; from the cache unless the file changed or ``always`` (then once per run)."""
    resolved = str(path.resolve())
    before = stat_key(path)
    if (resolved, before) in _THIS_RUN:
        return _THIS_RUN[(resolved, before)]
    if not always:
        entry = _load_cache().get(resolved)
        if isinstance(entry, dict) and entry.get("stat") == list(before) and isinstance(entry.get("sha256"), str):
            return str(entry["sha256"])
    digest = hash_file(path)
    if stat_key(path) == before:  # unchanged while it was read
        _remember(resolved, before, digest)
    return digest


def record_file_sha256(path: Path, digest: str) -> None:
    """Store a sha256 computed elsewhere (e.g. while the file was written) in the cache."""
    _remember(str(path.resolve()), stat_key(path), digest)


def _remember(resolved: str, key: tuple[int, ...], digest: str) -> None:
    _THIS_RUN[(resolved, key)] = digest
    cache = _load_cache()
    cache[resolved] = {"stat": list(key), "sha256": digest}
    _save_cache(cache)


def cache_file() -> Path:
    from pytest_llamabench.server.build import cache_root

    return cache_root() / "sha256-cache.json"


def _load_cache() -> dict[str, Any]:
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, dict)}  # entries of the old (path|size|mtime) form go


def _save_cache(cache: dict[str, Any]) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
