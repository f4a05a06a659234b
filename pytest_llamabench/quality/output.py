"""llama-perplexity's printed results, as numbers.

The lines are those of llama.cpp's ``tools/perplexity/perplexity.cpp`` at the pinned commit:

- ``Final estimate: PPL = 12.3456 +/- 0.12345`` (a plain or ``--kl-divergence-base`` run)
- with ``--kl-divergence``: ``Mean PPL(Q) : x ± u``, ``Mean PPL(base) : x ± u``,
  ``Mean PPL(Q)/PPL(base) : x ± u``, ``Mean    KLD: x ± u``, ``Maximum KLD: x``, ``99.0%   KLD: x``,
  ``Median  KLD: x``, ``RMS Δp    : x ± u %``, ``Same top p: x ± u %``
- ``calculating perplexity over N chunks, n_ctx=C`` / ``computing over N chunks, n_ctx=C``

Failures it only logs (its exit status is 0): a corpus shorter than two contexts, an inconsistent
vocabulary, a logits file made with a bigger context.
"""

from __future__ import annotations

import dataclasses
import math
import re

_NUM = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|-?inf))"
_PM = r"\s*(?:±|\+/-)\s*"
FINAL = re.compile(rf"Final estimate: PPL = {_NUM}{_PM}{_NUM}")
MEAN_PPL_Q = re.compile(rf"^Mean PPL\(Q\)\s*:\s*{_NUM}{_PM}{_NUM}", re.M)
PPL_RATIO = re.compile(rf"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}", re.M)
KLD_MEAN = re.compile(rf"^Mean\s+KLD:\s*{_NUM}{_PM}{_NUM}", re.M)
KLD_MAX = re.compile(rf"^Maximum KLD:\s*{_NUM}", re.M)
KLD_P99 = re.compile(rf"^99\.0%\s+KLD:\s*{_NUM}", re.M)
KLD_MEDIAN = re.compile(rf"^Median\s+KLD:\s*{_NUM}", re.M)
RMS_DP = re.compile(rf"^RMS Δp\s*:\s*{_NUM}{_PM}{_NUM}\s*%", re.M)
SAME_TOP = re.compile(rf"^Same top p:\s*{_NUM}{_PM}{_NUM}\s*%", re.M)
CHUNKS = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)")
TOO_SHORT = re.compile(r"you need at least (\d+) tokens to evaluate perplexity with a context of (\d+)")
TOKENIZED = re.compile(r"tokenizes to only (\d+) tokens")
VOCAB = re.compile(r"inconsistent vocabulary \((\d+) vs (\d+)\)")
LOGITS_CTX = re.compile(r"has been computed with (\d+), while the current context is (\d+)")
BAD_LOGITS = re.compile(r"does not look like a file containing log-probabilities|failed reading")


@dataclasses.dataclass(frozen=True)
class PerplexityOutput:
    """What one run printed; KLD fields are None for a run without ``--kl-divergence``."""

    ppl: float
    ppl_error: float
    chunks: int | None = None
    ctx: int | None = None
    ppl_ratio: float | None = None
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    rms_dp_pct: float | None = None
    same_top_p_pct: float | None = None

    @property
    def ppl_increase_pct(self) -> float | None:
        return None if self.ppl_ratio is None else (self.ppl_ratio - 1.0) * 100.0


@dataclasses.dataclass(frozen=True)
class Problem:
    """A failure llama-perplexity logged: ``what`` is ``too-short``, ``vocab`` or ``logits``."""

    what: str
    line: str
    numbers: tuple[int, ...] = ()


def problem(text: str) -> Problem | None:
    """The first failure the output shows, if any."""
    if m := TOO_SHORT.search(text):
        got = TOKENIZED.search(text)
        return Problem("too-short", m.group(0), (int(m.group(1)), int(m.group(2)), int(got.group(1)) if got else -1))
    if m := VOCAB.search(text):
        return Problem("vocab", m.group(0), (int(m.group(1)), int(m.group(2))))
    if m := LOGITS_CTX.search(text):
        return Problem("logits", m.group(0), (int(m.group(1)), int(m.group(2))))
    if m := BAD_LOGITS.search(text):
        return Problem("logits", m.group(0))
    return None


def parse(text: str, *, kld: bool) -> PerplexityOutput | None:
    """The results of a run, or None when it printed none (see ``problem`` for why)."""
    chunks = CHUNKS.search(text)
    n_chunks, ctx = (int(chunks.group(1)), int(chunks.group(2))) if chunks else (None, None)
    if not kld:
        final = FINAL.search(text)
        if final is None:
            return None
        return PerplexityOutput(_f(final.group(1)), _f(final.group(2)), n_chunks, ctx)
    q, kl = MEAN_PPL_Q.search(text), KLD_MEAN.search(text)
    if q is None or kl is None:
        return None
    return PerplexityOutput(
        ppl=_f(q.group(1)),
        ppl_error=_f(q.group(2)),
        chunks=n_chunks,
        ctx=ctx,
        ppl_ratio=_first(PPL_RATIO, text),
        kld_mean=_f(kl.group(1)),
        kld_median=_first(KLD_MEDIAN, text),
        kld_p99=_first(KLD_P99, text),
        kld_max=_first(KLD_MAX, text),
        rms_dp_pct=_first(RMS_DP, text),
        same_top_p_pct=_first(SAME_TOP, text),
    )


def _first(pattern: re.Pattern[str], text: str) -> float | None:
    m = pattern.search(text)
    return _f(m.group(1)) if m else None


def _f(text: str) -> float:
    value = float(text)
    return value if not math.isinf(value) else float("nan")


__all__ = ["PerplexityOutput", "Problem", "parse", "problem"]
