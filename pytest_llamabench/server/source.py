"""The pinned llama.cpp source: the llama-cpp-python sdist, verified before anything is built from it.

Two ways a tarball is accepted, both pinned in this module:

* the sdist exactly as PyPI serves it: its file sha256 is ``SDIST_SHA256``;
* a *trimmed* copy made by ``python -m pytest_llamabench trim-sdist`` (for machines that
  cannot download it, or carry at most a few MB): the sdist without docs, tests, media,
  benches, CI files, its git metadata and the test vocabularies except Qwen2's and
  Qwen3.5's. Its gzip bytes differ, so it is pinned by content instead: ``TREE_SHA256``
  is a digest of every kept file's name and sha256.

Only kept members are ever extracted, so what is built is exactly what was digested,
whichever of the two was given. Anything else is refused with one line naming the file
and both hashes. Because the trimmed tree has no ``.git``, the build passes the pinned
commit to CMake itself (``build.py``), so every tree reports the same version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pytest_llamabench.errors import BuildError

SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"
#: sha256 of ``llama_cpp_python-0.3.36.tar.gz`` as ``pip download`` fetched it from PyPI.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: Digest of the kept members (``tree_digest``) of that sdist; a trimmed copy has the same.
TREE_SHA256 = "3373b16f4fd34e2d19379d9e1231d81ca071a3de2bb63f0d7d75904ebb254b80"
#: The vendored llama.cpp commit (``.git/modules/vendor/llama.cpp/HEAD`` in the sdist) and the
#: build number its depth-1 clone gives (``git rev-list --count HEAD`` = 1).
LLAMA_CPP_COMMIT = "0c1e570"
LLAMA_CPP_BUILD_NUMBER = 1

_TOP = "llama_cpp_python-0.3.36/"
#: Not needed to build the four targets (the build has LLAMA_BUILD_TESTS=OFF, no docs or UI).
TRIMMED_PREFIXES = tuple(
    _TOP + p
    for p in (
        ".git/", ".github/", "docs/", "tests/",
        "vendor/llama.cpp/.github/", "vendor/llama.cpp/docs/", "vendor/llama.cpp/tests/",
        "vendor/llama.cpp/media/", "vendor/llama.cpp/benches/", "vendor/llama.cpp/models/",
    )
)  # fmt: skip
VOCAB_DIR = _TOP + "vendor/llama.cpp/models/"
#: Tokenizer-only GGUFs kept from models/ (for synth-model --vocab): Qwen2/Qwen3's and Qwen3.5's.
KEPT_VOCABS = ("ggml-vocab-qwen2.gguf", "ggml-vocab-qwen35.gguf")


@dataclasses.dataclass(frozen=True)
class SourceCheck:
    """How a source tarball matched the pin (recorded in the build's build-info.json)."""

    path: Path
    sha256: str
    tree_sha256: str | None  # computed only when the file hash is not the pinned one
    trimmed: bool

    @property
    def description(self) -> str:
        if self.trimmed:
            return (f"trimmed {SOURCE_PACKAGE} {SOURCE_VERSION} sdist (sha256 {self.sha256}), its content "
                    f"matches the pinned tree digest {TREE_SHA256}")  # fmt: skip
        return f"{SOURCE_PACKAGE} {SOURCE_VERSION} sdist, pinned sha256 {self.sha256}"

    def as_dict(self) -> dict[str, object]:
        return {"file": self.path.name, "sha256": self.sha256, "trimmed": self.trimmed,
                "tree_sha256": self.tree_sha256, "pinned": True, "description": self.description}  # fmt: skip


def is_kept(name: str) -> bool:
    """Whether a tarball member is part of the pinned, buildable tree."""
    if name.startswith(VOCAB_DIR):
        return name[len(VOCAB_DIR) :] in KEPT_VOCABS
    return name.startswith(_TOP) and not name.startswith(TRIMMED_PREFIXES)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _kept_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if (member.isfile() or member.issym()) and is_kept(member.name):
            yield member


def tree_digest(path: Path) -> str:
    """sha256 over (name, type, content sha256 or link target) of every kept member, sorted by name."""
    entries = []
    try:
        with tarfile.open(path) as tar:
            for member in _kept_members(tar):
                if member.issym():
                    entries.append(f"{member.name}\0link\0{member.linkname}\n")
                    continue
                fh = tar.extractfile(member)
                assert fh is not None
                digest = hashlib.sha256()
                while chunk := fh.read(1024 * 1024):
                    digest.update(chunk)
                entries.append(f"{member.name}\0file\0{digest.hexdigest()}\n")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BuildError(f"--sdist {path}: not a readable tar.gz ({exc}); download the sdist again") from None
    if len({e.split("\0")[0] for e in entries}) != len(entries):
        raise BuildError(f"--sdist {path}: a member appears twice; refusing an ambiguous source tarball")
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def verify_sdist(path: Path, *, where: str = "--sdist") -> SourceCheck:
    """The pinned sdist or its trimmed copy; anything else is a BuildError naming both hashes."""
    if not path.is_file():
        raise BuildError(f"{where}: {path} is not a file; pass the {SOURCE_PACKAGE}=={SOURCE_VERSION} sdist")
    sha256 = file_sha256(path)
    if sha256 == SDIST_SHA256:
        return SourceCheck(path, sha256, None, trimmed=False)
    tree = tree_digest(path)
    if tree == TREE_SHA256:
        return SourceCheck(path, sha256, tree, trimmed=True)
    raise BuildError(
        f"{where}: {path} is not the pinned {SOURCE_PACKAGE} {SOURCE_VERSION} sdist: its sha256 is {sha256} "
        f"(pinned {SDIST_SHA256}) and its content digest {tree} (a trimmed copy has {TREE_SHA256}); "
        "download it again (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`) or make "
        "the trimmed copy with `python -m pytest_llamabench trim-sdist`"
    )


def extract_kept(check: SourceCheck, dest: Path) -> Path:
    """Extract only the kept members into ``dest``; returns the vendored llama.cpp directory."""
    with tarfile.open(check.path) as tar:
        members = list(_kept_members(tar))
        tar.extractall(dest, members=members, filter="data")
    source = dest / _TOP / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise BuildError(f"{check.path}: no vendor/llama.cpp/CMakeLists.txt inside; is this the right sdist?")
    return source


def write_trimmed(sdist: Path, dest: Path, log: Callable[[str], None] = print) -> SourceCheck:
    """``trim-sdist``: verify the original sdist, write its kept members to ``dest`` (tar.gz)."""
    check = verify_sdist(sdist)
    if check.trimmed:
        raise BuildError(f"trim-sdist: {sdist} is already trimmed; pass the original sdist from PyPI")
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(sdist) as src, tarfile.open(tmp, "w:gz", compresslevel=9) as out:
        for member in _kept_members(src):
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
    tmp.replace(dest)
    trimmed = verify_sdist(dest)
    log(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB, sha256 {trimmed.sha256}); "
        f"content digest {trimmed.tree_sha256} = the pinned one")  # fmt: skip
    return trimmed
