"""Find llama-server, or build a pinned one from a PyPI sdist into the user cache.

Resolution order (the first that is set wins; documented in the README):

1. ``--llamabench-server-bin`` (command line)
2. ``LLAMABENCH_SERVER_BIN`` (environment)
3. ``llamabench_server_bin`` (ini / pyproject)
4. ``llama-server`` on ``PATH``
5. a cached build: for a session with GPU configs on a machine with a usable NVIDIA GPU a
   CUDA build (any ``--cuda-arch``) first, else the build for ``--llamabench-backend``
   (default cpu), built on demand (≈9 min on 2 cores)

The source is the pinned sdist (source.py verifies it); the build passes the pinned commit
to CMake, so ``--version`` and ``/props`` name it whatever tree it was built from, and
``bin/build-info.json`` records which tarball (pinned sdist or its trimmed copy) it was.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_llamabench.errors import BuildError, ConfigError
from pytest_llamabench.server.source import (
    LLAMA_CPP_BUILD_NUMBER,
    LLAMA_CPP_COMMIT,
    SOURCE_PACKAGE,
    SOURCE_VERSION,
    SourceCheck,
    extract_kept,
    verify_sdist,
)

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
    # the pinned commit, not what git finds (a trimmed tree has no .git: "commit unknown")
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}",
    f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_BUILD_NUMBER}",
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


def cached_cuda_builds() -> list[BuildSpec]:
    """Cached CUDA builds of the pinned source (``…-cuda-avx2``, ``…-cuda-sm90-avx2``, …), newest first."""
    prefix = f"{SOURCE_PACKAGE}-{SOURCE_VERSION}-cuda"
    found = []
    for bin_dir in (cache_root() / "llama.cpp").glob(f"{prefix}*-avx2/bin"):
        arch = bin_dir.parent.name.removeprefix(prefix).removesuffix("-avx2").removeprefix("-sm") or None
        spec = BuildSpec("cuda", arch)
        if spec.key == bin_dir.parent.name and (path := cached_binary(spec)):
            found.append((path.stat().st_mtime, spec))
    return [spec for _, spec in sorted(found, key=lambda f: -f[0])]


def cached_server(spec: BuildSpec, *, prefer_cuda: bool = False) -> tuple[Path, BuildSpec] | None:
    """The cached llama-server to use: a CUDA build first when ``prefer_cuda`` (or the spec asks for
    CUDA without an architecture: whichever was built), else exactly ``spec``'s."""
    if prefer_cuda or (spec.backend == "cuda" and not spec.cuda_architectures):
        for cuda in cached_cuda_builds():
            if (path := cached_binary(cuda)) is not None:
                return path, cuda
    path = cached_binary(spec)
    return (path, spec) if path is not None else None


def resolve_server_bin(
    candidates: Sequence[tuple[str | None, str]],
    *,
    spec: BuildSpec,
    build_if_missing: bool,
    log: Callable[[str], None],
    prefer_cuda: bool = False,
) -> tuple[Path, str]:
    """The llama-server to use, and where it came from.

    ``candidates`` are (value, where) pairs in precedence order (option, env, ini).
    ``prefer_cuda``: the session has GPU configs and a usable GPU, so a cached CUDA build wins
    over the CPU one (an explicit path, env var, ini value or PATH still win over both).
    """
    for value, where in candidates:
        if value:
            path = Path(value).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ConfigError(f"{where}: {value} is not an executable file; fix the path or unset it")
            return path.resolve(), where
    if found := shutil.which("llama-server"):
        return Path(found), "PATH"
    if cached := cached_server(spec, prefer_cuda=prefer_cuda):
        return cached[0], f"cache ({cached[1].key})"
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
    lock_path = cache_root() / "llama.cpp" / f"{spec.key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:  # one build per key: a second one would delete the first's work dir
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"llama.cpp {spec.key}: another process is building it; waiting for that build")
            fcntl.flock(lock, fcntl.LOCK_EX)
            if all(cached_binary(spec, t) for t in TARGETS):
                return spec.bin_dir
        return _build_locked(spec, sdist, jobs, log)


def _build_locked(spec: BuildSpec, sdist: Path | None, jobs: int | None, log: Callable[[str], None]) -> Path:
    cmake, ninja = _tool("cmake"), _tool("ninja")
    work = cache_root() / "llama.cpp" / f"{spec.key}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        check = verify_sdist(sdist) if sdist else verify_sdist(_download_sdist(work, log), where="pip download")
        log(f"llama.cpp source: {check.description}")
        source = extract_kept(check, work / "src")
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
        _write_build_info(staging, spec, check)
        keep_vocabs(source)
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


def _write_build_info(bin_dir: Path, spec: BuildSpec, check: SourceCheck) -> None:
    info = {"key": spec.key, "commit": LLAMA_CPP_COMMIT, "build_number": LLAMA_CPP_BUILD_NUMBER,
            "source": check.as_dict(), "cmake_flags": spec.cmake_flags()}  # fmt: skip
    (bin_dir / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")


def vocab_dir() -> Path:
    """Where builds keep llama.cpp's tokenizer-only GGUFs (``models/ggml-vocab-*.gguf``)."""
    return cache_root() / "llama.cpp" / f"{SOURCE_PACKAGE}-{SOURCE_VERSION}-vocab"


def keep_vocabs(source: Path) -> list[Path]:
    """Copy the source's ``models/ggml-vocab-*.gguf`` into ``vocab_dir()`` (e.g. for synth-model --vocab)."""
    dest = vocab_dir()
    dest.mkdir(parents=True, exist_ok=True)
    kept = []
    for vocab in sorted((source / "models").glob("ggml-vocab-*.gguf")):
        tmp = dest / f"{vocab.name}.{os.getpid()}.part"
        shutil.copyfile(vocab, tmp)
        tmp.replace(dest / vocab.name)
        kept.append(dest / vocab.name)
    return kept


def vocab_file(name: str, *, sdist: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """``ggml-vocab-NAME.gguf``: kept by an earlier build, else taken from the (verified) sdist."""
    from pytest_llamabench.server.source import KEPT_VOCABS

    filename = name if name.endswith(".gguf") else f"ggml-vocab-{name}.gguf"
    if (kept := vocab_dir() / filename).is_file() and sdist is None:
        return kept
    work = cache_root() / "llama.cpp" / "vocab.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        check = verify_sdist(sdist) if sdist else verify_sdist(_download_sdist(work, log), where="pip download")
        keep_vocabs(extract_kept(check, work / "src"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not kept.is_file():
        known = ", ".join(sorted(v.name for v in vocab_dir().glob("ggml-vocab-*.gguf")))
        raise ConfigError(f"vocab: no {filename} in the pinned source (kept: {known or ', '.join(KEPT_VOCABS)}); "
                          "name one of those")  # fmt: skip
    return kept


def build_info(binary: Path) -> dict[str, object] | None:
    """The ``build-info.json`` a build wrote next to ``binary``, if any."""
    try:
        info = json.loads((binary.parent / "build-info.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


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

