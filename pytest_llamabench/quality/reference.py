"""The reference model's logits (``llama-perplexity --kl-divergence-base FILE``), computed once.

They are cached under ``<cache>/quality/reference/`` by what determines them: the reference
model's sha256, the corpus's sha256, ``ctx``, ``chunks``, the llama-perplexity build (sha256 of
the binary) and the reference run's flags (KV cache types, offload; threads excluded). The
reference's own perplexity is stored next to them, so a second run starts nothing for the
reference. The file is big: chunks × ctx/2 × vocabulary × 2 bytes (SmolLM2, 4 chunks of 512:
100 MB; a 248k-vocabulary model over WikiText-2's ~580 chunks: ~70 GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_llamabench.config import ServerConfig
from pytest_llamabench.config_quality import QualitySpec
from pytest_llamabench.errors import QualityRunFailed
from pytest_llamabench.quality.corpus import Corpus
from pytest_llamabench.quality.perplexity import Mode, Run, config_flags, perplexity_argv, run_perplexity
from pytest_llamabench.quality.tools import Tool

_NOT_KEYED = ("--threads", "--threads-batch")


@dataclasses.dataclass(frozen=True)
class ReferenceLogits:
    """A reference's saved logits and its own perplexity; ``computed`` is False when taken from the cache."""

    path: Path
    ppl: float
    ppl_error: float
    chunks: int | None
    key: str
    computed: bool
    seconds: float
    log: Path | None = None  # the reference run's log, when this run computed it

    def as_dict(self) -> dict[str, Any]:
        return {"logits": str(self.path), "key": self.key, "ppl": self.ppl, "ppl_error": self.ppl_error,
                "chunks": self.chunks, "cached": not self.computed, "seconds": round(self.seconds, 3),
                "log": str(self.log) if self.log else None}  # fmt: skip


def reference_key(model_sha256: str, corpus: Corpus, spec: QualitySpec, tool: Tool, config: ServerConfig) -> str:
    flags = config_flags(config)
    keyed = [f for i, f in enumerate(flags) if f not in _NOT_KEYED and (i == 0 or flags[i - 1] not in _NOT_KEYED)]
    parts = [model_sha256, corpus.sha256, str(spec.ctx), str(spec.chunks), tool.build, *keyed]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def reference_logits(
    config: ServerConfig,
    model: Path,
    model_sha256: str,
    corpus: Corpus,
    spec: QualitySpec,
    tool: Tool,
    *,
    cache_dir: Path,
    log_dir: Path,
    env: dict[str, str],
    check: Callable[[Run, str], None],
    log: Callable[[str], None] = print,
) -> ReferenceLogits:
    """The cached logits of ``model`` run with ``config``'s flags, computing them when missing.
    ``check(run, what)`` raises the run's failure as the right error."""
    key = reference_key(model_sha256, corpus, spec, tool, config)
    folder = cache_dir / "reference"
    logits, meta = folder / f"{key}.logits", folder / f"{key}.json"
    cached = _read_meta(meta)
    if cached is not None and logits.is_file() and logits.stat().st_size == cached.get("bytes"):
        return ReferenceLogits(logits, float(cached["ppl"]), float(cached["ppl_error"]), cached.get("chunks"), key,
                               computed=False, seconds=0.0)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    tmp = logits.with_name(f".{logits.name}.{os.getpid()}.tmp")
    log(f"{config.name}: computing the reference logits of {model.name} over {corpus.name} "
        f"(ctx {spec.ctx}, chunks {spec.chunks or 'all'}); cached as {logits}")  # fmt: skip
    argv = perplexity_argv(tool.path, model, corpus.path, config, ctx=spec.ctx, chunks=spec.chunks,
                           mode=Mode("base", tmp))  # fmt: skip
    try:
        run = run_perplexity(argv, log_dir / f"reference-{key}.log", env=env, kld=False)
        check(run, f"the reference run of {model.name}")
        assert run.output is not None
        if not tmp.is_file():
            raise QualityRunFailed(f"{config.source}: llama-perplexity wrote no logits to {tmp}; log: {run.log}")
        tmp.replace(logits)
    finally:
        tmp.unlink(missing_ok=True)
    info = {"ppl": run.output.ppl, "ppl_error": run.output.ppl_error, "chunks": run.output.chunks,
            "ctx": spec.ctx, "bytes": logits.stat().st_size, "model": str(model), "model_sha256": model_sha256,
            "corpus": corpus.as_dict(), "build_sha256": tool.build, "argv": argv, "seconds": run.seconds}  # fmt: skip
    meta_tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps(info, indent=1) + "\n")
    meta_tmp.replace(meta)
    return ReferenceLogits(logits, run.output.ppl, run.output.ppl_error, run.output.chunks, key, computed=True,
                           seconds=run.seconds, log=run.log)  # fmt: skip


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "ppl" in data and "ppl_error" in data else None


__all__ = ["ReferenceLogits", "reference_key", "reference_logits"]
