"""Noise-aware regression gate over two benchmark reports.

``python -m pytest_llamabench compare BASE.json NEW.json`` reads two reports (ours, or
pytest-benchmark's ``--benchmark-json``, both as ``results.RunReport``), and for every
(config, workload, metric) compares the raw samples of both sides:

* a two-sided Mann-Whitney U test (exact for small samples without ties, normal
  approximation with tie correction otherwise) says whether the change is real
  (``statistics``);
* a tolerance on the ratio of medians (``gen_tok_s:-5%``) says whether it matters
  (``tolerances``);
* a bootstrap confidence interval of that ratio can confirm "no change".

Two reports compare only when measured on the same setup (``fingerprint``). The verdicts
are in ``verdicts``, their tables in ``render``, the command line in ``cli``.
"""

from __future__ import annotations

from pytest_llamabench.gate.fingerprint import FINGERPRINT_POLICIES, FingerprintMismatch, Mismatch
from pytest_llamabench.gate.statistics import (
    MannWhitney,
    bootstrap_ratio_ci,
    mann_whitney_u,
    min_exact_p,
    min_repetitions,
)
from pytest_llamabench.gate.tolerances import Tolerance, ToleranceError, ToleranceRule, Tolerances, parse_tolerance
from pytest_llamabench.gate.verdicts import (
    IMPROVED,
    INCONCLUSIVE,
    MIN_SAMPLES,
    NEW,
    NO_CHANGE,
    REGRESSED,
    VERDICTS,
    Comparison,
    Row,
    compare,
    compare_samples,
    load_report,
)
from pytest_llamabench.gate.render import render

__all__ = [
    "FINGERPRINT_POLICIES", "IMPROVED", "INCONCLUSIVE", "MIN_SAMPLES", "NEW", "NO_CHANGE", "REGRESSED",
    "VERDICTS", "Comparison", "FingerprintMismatch", "MannWhitney", "Mismatch", "Row", "Tolerance",
    "ToleranceError", "ToleranceRule", "Tolerances", "bootstrap_ratio_ci", "compare", "compare_samples",
    "load_report", "mann_whitney_u", "min_exact_p", "min_repetitions", "parse_tolerance", "render",
]  # fmt: skip
