"""Build a llama-server Docker image locally, from a binary on this machine, with no registry.

The image is ``FROM scratch``: the binary at ``/usr/local/bin/llama-server``
(its ENTRYPOINT), the exact shared libraries ``ldd`` resolves for it and the
dynamic loader, each at the path the binary asks for, plus an empty ``/tmp``.
Nothing is pulled, so it builds offline.

Images are labelled with the binary's sha256; a second build of the same binary
under the same tag returns the existing image at once.

``python -m pytest_llamabench docker-image [--binary PATH] [--tag TAG]``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_llamabench.server.build import BuildSpec, cached_binary
from pytest_llamabench.errors import BuildError, ConfigError, DockerUnavailable

DEFAULT_TAG = "pytest-llamabench/llama-server:local"
BINARY_IN_IMAGE = "/usr/local/bin/llama-server"
LABEL_BINARY_SHA256 = "pytest-llamabench.binary-sha256"
LABEL_RECIPE = "pytest-llamabench.image-recipe"
#: Bump when the image layout changes, so cached images are rebuilt.
RECIPE_VERSION = "1"

# "libgomp.so.1 => /lib/x86_64-linux-gnu/libgomp.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_LDD_RESOLVED = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_ABSOLUTE = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_MISSING = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$")
#: GPU driver libraries: the NVIDIA container runtime mounts the host driver's own; never copy them.
_DRIVER_LIB = re.compile(r"^lib(cuda|nvidia-[\w.-]+|nvcuvid|nvoptix)\.so")


def default_binary() -> Path:
    """The project's cached CPU build, else ``$LLAMABENCH_SERVER_BIN``."""
    if cached := cached_binary(BuildSpec()):
        return cached
    if env := os.environ.get("LLAMABENCH_SERVER_BIN"):
        return Path(env).expanduser()
    raise ConfigError(
        "no llama-server to put in the image: build one with `python -m pytest_llamabench "
        "build-server`, set LLAMABENCH_SERVER_BIN, or pass --binary PATH"
    )


def parse_ldd(output: str, binary: Path) -> list[Path]:
    """Absolute paths of the libraries (and the loader) in ``ldd`` output; vDSO skipped."""
    libs: list[Path] = []
    for line in output.splitlines():
        if m := _LDD_MISSING.match(line):
            raise BuildError(
                f"{binary}: shared library {m.group(1)} is not found on this machine (ldd); "
                "install it or use a statically linked llama-server"
            )
        if (m := _LDD_RESOLVED.match(line)) or (m := _LDD_ABSOLUTE.match(line)):
            lib = Path(m.group(m.lastindex or 1))
            if not _DRIVER_LIB.match(lib.name):
                libs.append(lib)
    return libs


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries ``binary`` loads, as ``ldd`` resolves them here; [] for a static binary."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise BuildError("ldd not found: install libc-bin (glibc's tools) to build the image")
    out = subprocess.run([ldd, str(binary)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if out.returncode != 0:
        raise BuildError(f"ldd {binary} failed (exit {out.returncode}): {text.strip()[:300]}")
    return parse_ldd(out.stdout, binary)


def binary_sha256(binary: Path) -> str:
    digest = hashlib.sha256()
    with binary.open("rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def write_context(binary: Path, libs: list[Path], context: Path, labels: dict[str, str]) -> None:
    """A build context: ``rootfs/`` (binary, libs at their paths, /tmp) and a Dockerfile."""
    rootfs = context / "rootfs"
    _copy_file(binary, rootfs / BINARY_IN_IMAGE.lstrip("/"))
    for lib in libs:
        _copy_file(lib, rootfs / str(lib).lstrip("/"))  # symlinks resolved: real files at the asked path
    tmp = rootfs / "tmp"
    tmp.mkdir(parents=True)
    tmp.chmod(0o1777)
    lib_dirs = sorted({str(lib.parent) for lib in libs})
    lines = ["FROM scratch", "COPY rootfs/ /"]
    if lib_dirs:
        lines.append(f"ENV LD_LIBRARY_PATH={':'.join(lib_dirs)}")
    lines.append("LABEL " + " ".join(f"{key}={json.dumps(value)}" for key, value in labels.items()))
    lines.append(f'ENTRYPOINT ["{BINARY_IN_IMAGE}"]')
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")


def _copy_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src.resolve(), dest)
    dest.chmod(0o755)


def _tagged(client: Any, tag: str) -> Any:
    """The local image ``tag``, or None."""
    from pytest_llamabench.server.docker import docker_sdk

    try:
        return client.images.get(tag)
    except docker_sdk().errors.ImageNotFound:
        return None


def cached_image_id(client: Any, tag: str, sha256: str) -> str | None:
    """The id of ``tag`` if it was built from a binary with this sha256 by this recipe."""
    image = _tagged(client, tag)
    labels = (image.labels or {}) if image is not None else {}
    if labels.get(LABEL_BINARY_SHA256) == sha256 and labels.get(LABEL_RECIPE) == RECIPE_VERSION:
        return str(image.id)
    return None


def _remove_untagged(client: Any, image_id: str) -> None:
    """Drop the image a rebuild replaced, unless it is still tagged or used by a container."""
    from pytest_llamabench.server.docker import docker_sdk

    with contextlib.suppress(docker_sdk().errors.APIError):
        if not client.images.get(image_id).tags:
            client.images.remove(image_id)


def build_local_image(
    binary: Path, *, tag: str = DEFAULT_TAG, log: Callable[[str], None] = print, client: Any = None
) -> str:
    """Build (or reuse) the image for ``binary``; returns the image id (``sha256:...``)."""
    from pytest_llamabench.server.docker import docker_client, docker_sdk

    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ConfigError(f"--binary: {binary} is not an executable file")
    if client is None:
        with contextlib.closing(docker_client()) as own_client:
            return build_local_image(binary, tag=tag, log=log, client=own_client)
    sha256 = binary_sha256(binary)
    if image_id := cached_image_id(client, tag, sha256):
        log(f"image {tag} is up to date ({image_id[:19]}, binary sha256 {sha256[:12]})")
        return image_id
    previous = _tagged(client, tag)
    libs = shared_libraries(binary)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llamabench-image-") as tmp:
        labels = {LABEL_BINARY_SHA256: sha256, LABEL_RECIPE: RECIPE_VERSION, "pytest-llamabench.binary": str(binary)}
        write_context(binary, libs, Path(tmp), labels)  # labels in one step: each step costs ~1 s
        try:
            image, _ = client.images.build(path=tmp, tag=tag, rm=True, forcerm=True)
        except docker_sdk().errors.BuildError as exc:
            lines = [str(c.get("stream") or c.get("error") or "").strip() for c in exc.build_log]
            raise BuildError(f"docker build of {tag} failed: {exc.msg}\n" + "\n".join(lines[-15:])) from None
        except docker_sdk().errors.APIError as exc:
            raise DockerUnavailable(f"docker build of {tag} failed: {exc.explanation or exc}") from None
    if previous is not None and (previous.labels or {}).get(LABEL_BINARY_SHA256) != sha256:
        _remove_untagged(client, previous.id)  # same binary: maybe a parallel build another process runs
    log(f"built image {tag} ({image.id[:19]}) from {binary} with {len(libs)} libraries "
        f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    return str(image.id)


# -- command line ----------------------------------------------------------------------


def _command(args: argparse.Namespace) -> int:
    binary = Path(args.binary).expanduser() if args.binary else default_binary()
    image_id = build_local_image(binary, tag=args.tag, log=lambda m: print(f"[llamabench] {m}", flush=True))
    print(f"{args.tag} {image_id}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``docker-image`` to ``python -m pytest_llamabench``."""
    p = subparsers.add_parser("docker-image", help="build the local llama-server image (no registry needed)")
    p.add_argument("--binary", help="llama-server to package (default: the cached build, else $LLAMABENCH_SERVER_BIN)")
    p.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default: {DEFAULT_TAG})")
    p.set_defaults(func=_command)
