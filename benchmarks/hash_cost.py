"""What a full sha256 of a model file costs: the number behind the hash cache (model/digest.py).

Writes a real (not sparse) file of ``--size-gb`` GB of incompressible bytes, then hashes it
the way the plugin does (``model.digest.hash_file``, 8 MiB reads):

* ``cpu``: sha256 of the same bytes already in memory (the ceiling: hashlib's speed);
* ``cold``: the file dropped from the page cache first (``posix_fadvise(DONTNEED)``), the
  cost on a first run or after the cache was evicted: disk and CPU;
* ``warm``: right after, from the page cache.

and extrapolates each to a 20 GB model. Run it on a quiet machine, on the disk that holds
the models (``--dir``), e.g.::

    python benchmarks/hash_cost.py --size-gb 8 --dir ~/models --json docs/hash-cost/hash-cost.json

The file is deleted afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from pytest_llamabench.model.digest import hash_file

_CHUNK = 8 * 1024 * 1024
_GB = 10**9


def write_file(path: Path, size: int) -> None:
    block = os.urandom(_CHUNK)  # incompressible; every block written for real, so nothing is sparse
    with path.open("wb") as fh:
        written = 0
        while written < size:
            n = min(_CHUNK, size - written)
            fh.write(block[:n] if n < _CHUNK else block)
            written += n
            block = block[1:] + block[:1]  # not the same block twice (dedup on some file systems)
        fh.flush()
        os.fsync(fh.fileno())


def drop_from_page_cache(path: Path) -> None:
    with path.open("rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="file size in GB (default 1; 8+ for a real disk)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write it (the models disk)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    size = int(args.size_gb * _GB)
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"llamabench-hash-cost-{os.getpid()}.bin"
    results: dict[str, list[float]] = {"cpu": [], "cold": [], "warm": []}
    try:
        print(f"writing {size / _GB:.1f} GB to {path} ...", flush=True)
        write_file(path, size)
        memory = os.urandom(_CHUNK) * 32  # 256 MiB in memory
        for run in range(args.runs):
            results["cpu"].append(len(memory) / timed(lambda: hashlib.sha256(memory).hexdigest()))
            drop_from_page_cache(path)
            results["cold"].append(size / timed(lambda: hash_file(path)))
            results["warm"].append(size / timed(lambda: hash_file(path)))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1] / _GB:.2f} GB/s" for k, v in results.items()), flush=True)
    finally:
        path.unlink(missing_ok=True)
    summary = {
        kind: {"gb_per_s": statistics.median(v) / _GB, "seconds_for_20_gb": 20 * _GB / statistics.median(v)}
        for kind, v in results.items()
    }
    print(f"\n{'':6} {'GB/s':>6} {'20 GB takes':>12}")
    for kind, row in summary.items():
        print(f"{kind:6} {row['gb_per_s']:6.2f} {row['seconds_for_20_gb']:10.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        facts = {"size_gb": size / _GB, "dir": str(args.dir), "runs": args.runs, "cpu": platform.processor() or platform.machine(),
                 "python": platform.python_version(), "openssl": __import__("ssl").OPENSSL_VERSION}  # fmt: skip
        args.json.write_text(json.dumps({"facts": facts, "summary": summary, "samples_bytes_per_s": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
