"""Quant quality in the matrix: a ``kind = "perplexity"`` workload's keys, and models made
with ``llama-quantize`` (``quantize = { from = "smollm2", type = "Q2_K" }``).

A quality workload::

    [workloads.quality]
    kind = "perplexity"
    corpus = "~/data/wiki.test.raw"   # a path (relative to the matrix file); default: the embedded corpus
    reference = "q8"                  # a model of [models]: KL divergence against its logits
    ctx = 512                         # tokens per chunk (llama-perplexity -c); default 512
    chunks = 8                        # chunks scored (--chunks); default: the whole corpus

Every error names the file and the dotted key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llamabench.config_toml import Table
from pytest_llamabench.errors import ConfigError

if TYPE_CHECKING:
    from pytest_llamabench.config import ModelSpec, Workload

#: The workload kind that runs llama-perplexity instead of a server.
QUALITY_KIND = "perplexity"
#: The keys a quality workload may set besides ``kind`` (they mean nothing to other kinds).
QUALITY_KEYS = ("corpus", "reference", "ctx", "chunks")
#: The embedded corpus (quality.corpus.EMBEDDED_CORPORA), used when ``corpus`` is not set.
DEFAULT_CORPUS = "embedded:flatland"
DEFAULT_CTX = 512
#: llama-quantize types that need no importance matrix (the IQ1/IQ2/IQ3 ones do).
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_K",
    "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q3_K", "Q2_K", "Q2_K_S", "Q2_0",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QualitySpec:
    """What a quality workload scores: ``corpus`` (``embedded:NAME`` or a file path), the
    ``reference`` model its KL divergence is measured against, ``ctx`` tokens per chunk, and
    ``chunks`` (None: every chunk the corpus holds)."""

    corpus: str = DEFAULT_CORPUS
    reference: ModelSpec | None = None
    ctx: int = DEFAULT_CTX
    chunks: int | None = None
    source: str = ""

    def key(self) -> dict[str, Any]:
        """What makes two runs comparable, for reports."""
        return {"corpus": self.corpus, "reference": self.reference.name if self.reference else None,
                "ctx": self.ctx, "chunks": self.chunks}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QuantizeSpec:
    """A model made from another with the pinned llama-quantize (``--allow-requantize``)."""

    source: ModelSpec
    type: str


def strip_quality_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """A workload table without the quality keys, for the common workload parser."""
    return {k: v for k, v in data.items() if k not in QUALITY_KEYS}


def with_quality(workloads: dict[str, Workload], table: Table, models: Mapping[str, ModelSpec],
                 base_dir: Path) -> dict[str, Workload]:  # fmt: skip
    """Attach a QualitySpec to every ``kind = "perplexity"`` workload; quality keys on other kinds are errors."""
    out = dict(workloads)
    for name, workload in workloads.items():
        if name not in table.data:
            continue  # a level of a concurrent workload (NAME-c4): never a quality workload
        sub = table.table(name)
        given = [k for k in QUALITY_KEYS if k in sub.data]
        if workload.kind != QUALITY_KIND:
            if given:
                raise ConfigError(f"{sub.at(given[0])}: only quality workloads have {given[0]}; "
                                  f'set kind = "{QUALITY_KIND}" or remove it')  # fmt: skip
            continue
        if "timeout_s" in sub.data:  # a server's silence limit; llama-perplexity runs to completion
            raise ConfigError(f"{sub.at('timeout_s')}: a quality workload runs llama-perplexity to completion, with no "
                              "request to time out; remove timeout_s (score fewer chunks with chunks = N to make it shorter)")  # fmt: skip
        out[name] = dataclasses.replace(workload, quality=_quality(sub, models, base_dir))
    return out


def _quality(table: Table, models: Mapping[str, ModelSpec], base_dir: Path) -> QualitySpec:
    corpus = table.get("corpus", str, DEFAULT_CORPUS)
    if not corpus.strip():
        raise ConfigError(f"{table.at('corpus')}: empty; give a text file's path or leave it out for the embedded corpus")
    if not corpus.startswith("embedded:"):
        corpus = str(base_dir / os.path.expanduser(corpus))
    reference = None
    if (ref := table.get("reference", str)) is not None:
        if ref not in models:
            raise ConfigError(f"{table.at('reference')}: unknown model {ref!r}; name one of [models]: "
                              f"{', '.join(models) or '(none)'}")  # fmt: skip
        reference = models[ref]
    ctx = table.positive_int("ctx", DEFAULT_CTX, minimum=16) or DEFAULT_CTX
    if ctx % 2:
        raise ConfigError(f"{table.at('ctx')}: {ctx} is odd; llama-perplexity scores the second half of each "
                          "chunk, use an even number such as 512")  # fmt: skip
    return QualitySpec(corpus=corpus, reference=reference, ctx=ctx, chunks=table.positive_int("chunks"),
                       source=table.where)  # fmt: skip


def with_quantized(models: dict[str, ModelSpec], table: Table) -> dict[str, ModelSpec]:
    """Resolve ``quantize = { from = MODEL, type = TYPE }`` against the other models of the file."""
    out = dict(models)
    for name in models:
        sub = table.table(name)
        if "quantize" not in sub.data:
            continue
        q = sub.table("quantize")
        q.check_keys(["from", "type"])
        source_name, qtype = q.get("from", str), q.get("type", str)
        if source_name is None or qtype is None:
            raise ConfigError(f"{q.where}: write quantize = {{ from = \"MODEL\", type = \"Q4_K_M\" }}")
        if source_name not in models or source_name == name:
            raise ConfigError(f"{q.at('from')}: unknown model {source_name!r}; name another model of [models]: "
                              f"{', '.join(n for n in models if n != name) or '(none)'}")  # fmt: skip
        if "quantize" in table.table(source_name).data:
            raise ConfigError(f"{q.at('from')}: {source_name!r} is itself quantized from another model; "
                              "quantize from the original instead")  # fmt: skip
        if qtype.upper() not in QUANT_TYPES:
            raise ConfigError(f"{q.at('type')}: {qtype!r} is not a llama-quantize type usable without an "
                              f"importance matrix; use one of {', '.join(QUANT_TYPES)}")  # fmt: skip
        out[name] = dataclasses.replace(models[name], quantize=QuantizeSpec(models[source_name], qtype.upper()))
    return out


__all__ = ["DEFAULT_CORPUS", "QUALITY_KEYS", "QUALITY_KIND", "QUANT_TYPES", "QualitySpec", "QuantizeSpec",
           "strip_quality_keys", "with_quality", "with_quantized"]  # fmt: skip
