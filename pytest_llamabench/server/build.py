"""Find llama-server, or build a pinned one from a PyPI sdist into the user cache.

Resolution order (the first that is set wins; documented in the README):

1. ``--llamabench-server-bin`` (command line)
2. ``LLAMABENCH_SERVER_BIN`` (environment)
3. ``llamabench_server_bin`` (ini / pyproject)
4. ``llama-server`` on ``PATH``
5. the cached build for this backend, built on demand (≈9 min on 2 cores)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_llamabench.errors import BuildError, ConfigError

#: The pinned source: llama-cpp-python's sdist vendors llama.cpp (commit 0c1e570).
SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-bench", "llama-perplexity", "llama-quantize")
BACKENDS = ("cpu", "cuda")

_COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: easy to copy into an image
    "-DGGML_NATIVE=OFF",  # a native build dies with SIGILL on other CPUs
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI
    "-DLLAMA_OPENSSL=OFF",
)


def cache_root() -> Path:
    """``$LLAMABENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-llamabench``, else ``~/.cache/...``."""
    if env := os.environ.get("LLAMABENCH_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pytest-llamabench"


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    backend: str = "cpu"
    cuda_architectures: str | None = None  # e.g. "90"; None: from the GPU (nvidia-smi) or "native"

    @property
    def key(self) -> str:
        arch = f"-sm{self.cuda_architectures}" if self.backend == "cuda" and self.cuda_architectures else ""
        return f"{SOURCE_PACKAGE}-{SOURCE_VERSION}-{self.backend}{arch}-avx2"

    @property
    def bin_dir(self) -> Path:
        return cache_root() / "llama.cpp" / self.key / "bin"

    def cmake_flags(self) -> list[str]:
        flags = list(_COMMON_FLAGS)
        if self.backend == "cuda":
            flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_architectures or 'native'}"]
        return flags


def cached_binary(spec: BuildSpec, name: str = "llama-server") -> Path | None:
    path = spec.bin_dir / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def resolve_server_bin(
    candidates: Sequence[tuple[str | None, str]], *, spec: BuildSpec, build_if_missing: bool, log: Callable[[str], None]
) -> tuple[Path, str]:
    """The llama-server to use, and where it came from.

    ``candidates`` are (value, where) pairs in precedence order (option, env, ini).
    """
    for value, where in candidates:
        if value:
            path = Path(value).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ConfigError(f"{where}: {value} is not an executable file; fix the path or unset it")
            return path.resolve(), where
    if found := shutil.which("llama-server"):
        return Path(found), "PATH"
    if cached := cached_binary(spec):
        return cached, f"cache ({spec.key})"
    if not build_if_missing:
        raise ConfigError(
            "no llama-server found: pass --llamabench-server-bin, set LLAMABENCH_SERVER_BIN, put "
            "llama-server on PATH, or build one with `python -m pytest_llamabench build-server`"
        )
    build(spec, log=log)
    built = cached_binary(spec)
    assert built is not None
    return built, f"built ({spec.key})"


def build(
    spec: BuildSpec,
    *,
    sdist: Path | None = None,
    jobs: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Build the pinned llama.cpp targets into the cache; returns the bin dir."""
    if spec.backend not in BACKENDS:
        raise ConfigError(f"--backend: {spec.backend!r} is not one of {', '.join(BACKENDS)}")
    if not force and all(cached_binary(spec, t) for t in TARGETS):
        log(f"llama.cpp {spec.key}: already built in {spec.bin_dir}")
        return spec.bin_dir
    cmake, ninja = _tool("cmake"), _tool("ninja")
    work = cache_root() / "llama.cpp" / f"{spec.key}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        source = _unpack(sdist or _download_sdist(work, log), work)
        build_dir = work / "build"
        log(f"llama.cpp {spec.key}: configuring ({' '.join(spec.cmake_flags())})")
        _run([cmake, "-S", str(source), "-B", str(build_dir), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
              *spec.cmake_flags()], work / "configure.log")  # fmt: skip
        n_jobs = jobs or os.cpu_count() or 2
        log(f"llama.cpp {spec.key}: building {', '.join(TARGETS)} with {n_jobs} jobs "
            f"(about {'4' if spec.backend == 'cuda' else '9'} min on 16/2 cores; log: {work / 'build.log'})")  # fmt: skip
        started = time.monotonic()
        _run([ninja, "-C", str(build_dir), "-j", str(n_jobs), *TARGETS], work / "build.log", progress=log)
        staging = spec.bin_dir.with_name("bin.new")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for target in TARGETS:
            shutil.copy2(build_dir / "bin" / target, staging / target)
        shutil.rmtree(spec.bin_dir, ignore_errors=True)
        staging.rename(spec.bin_dir)  # appears whole or not at all
        log(f"llama.cpp {spec.key}: built in {time.monotonic() - started:.0f} s -> {spec.bin_dir}")
    finally:
        shutil.rmtree(work / "src", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)  # logs are kept only when the build failed
    return spec.bin_dir


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # the PyPI wheels of cmake/ninja put their scripts next to this interpreter
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    raise BuildError(f"{name} not found: install it (python -m pip install {name}) and build again")


def _download_sdist(work: Path, log: Callable[[str], None]) -> Path:
    log(f"downloading the {SOURCE_PACKAGE}=={SOURCE_VERSION} sdist from PyPI (llama.cpp source)")
    dest = work / "sdist"
    # sdist of this package only; its build backend comes as wheels to read the metadata
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SOURCE_PACKAGE,
           "-d", str(dest), f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"]  # fmt: skip
    _run(cmd, work / "download.log")
    archives = sorted(dest.glob("*.tar.gz"))
    if not archives:
        raise BuildError(f"pip download left no sdist in {dest}; see {work / 'download.log'}")
    return archives[0]


def _unpack(sdist: Path, work: Path) -> Path:
    src = work / "src"
    with tarfile.open(sdist) as tar:
        tar.extractall(src, filter="data")
    found = list(src.glob("*/vendor/llama.cpp/CMakeLists.txt")) or list(src.glob("*/CMakeLists.txt"))
    if not found:
        raise BuildError(f"{sdist}: no llama.cpp CMakeLists.txt inside; is this the right sdist?")
    return found[0].parent


def _run(cmd: list[str], log_path: Path, progress: Callable[[str], None] | None = None) -> None:
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        last = 0.0
        for line in proc.stdout:
            log_file.write(line)
            # ninja prints "[12/218] Building ..."; show one progress line every 30 s
            if progress and line.startswith("[") and time.monotonic() - last > 30:
                progress(f"  {line.split(']')[0]}] ...")
                last = time.monotonic()
        code = proc.wait()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise BuildError(f"{cmd[0]} failed (exit {code}); log: {log_path}\n{tail}")


def server_version(binary: Path) -> str:
    """First lines of ``llama-server --version`` (version, commit, compiler)."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return " | ".join(line.strip() for line in text if line.strip())[:300] or "unknown"

