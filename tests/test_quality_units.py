"""Quant quality, pure parts: the matrix keys, the quality table and its verdicts, the winner
filter and the gate's exact comparison of deterministic metrics."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_llamabench.config import load_matrix
from pytest_llamabench.errors import ConfigError, CorpusError
from pytest_llamabench.gate.exact import compare_exact
from pytest_llamabench.gate.tolerances import Tolerances, parse_tolerance
from pytest_llamabench.gate.verdicts import IMPROVED, NO_CHANGE, REGRESSED, compare
from pytest_llamabench.outputs import quality_table
from pytest_llamabench.outputs.table import build_table
from pytest_llamabench.quality.corpus import load_corpus, strip_gutenberg
from pytest_llamabench.results import ResultEntry, RunReport
from pytest_llamabench.stats import Summary

HEAD = """
[models.ref]
embedded = "smollm2-135m-instruct-q4_1"
[models.q2]
quantize = { from = "ref", type = "q2_k" }
[defaults]
model = "ref"
ctx = 1024
"""


def _load(tmp_path: Path, body: str) -> object:
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(HEAD) + textwrap.dedent(body))
    return load_matrix([path])


def test_quality_workload_keys(tmp_path: Path) -> None:
    matrix = _load(tmp_path, """
        [workloads.q]
        kind = "perplexity"
        corpus = "wiki.test.raw"
        reference = "ref"
        ctx = 256
        chunks = 3
        [configs.a]
        model = "q2"
    """)
    spec = matrix.workloads["q"].quality  # type: ignore[attr-defined]
    assert spec.corpus == str(tmp_path / "wiki.test.raw")  # relative to the matrix file
    assert (spec.reference.name, spec.ctx, spec.chunks) == ("ref", 256, 3)
    model = matrix.configs["a"].model  # type: ignore[attr-defined]
    assert model.quantize.type == "Q2_K" and model.quantize.source.name == "ref"


def test_quality_defaults_to_the_embedded_corpus(tmp_path: Path) -> None:
    matrix = _load(tmp_path, '[workloads.q]\nkind = "perplexity"\n[configs.a]\n')
    spec = matrix.workloads["q"].quality  # type: ignore[attr-defined]
    assert (spec.corpus, spec.reference, spec.ctx, spec.chunks) == ("embedded:flatland", None, 512, None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[workloads.q]\nkind = "perplexity"\nreference = "nope"\n', "workloads.q.reference: unknown model 'nope'; name one of [models]: ref, q2"),
        ('[workloads.q]\nkind = "perplexity"\nctx = 511\n', "workloads.q.ctx: 511 is odd"),
        ('[workloads.q]\nprompt_tokens = 8\nreference = "ref"\n', 'workloads.q.reference: only quality workloads have reference; set kind = "perplexity"'),
        ('[workloads.q]\nkind = "perplexity"\ncorpus = " "\n', "workloads.q.corpus: empty"),
        ('[workloads.q]\nkind = "perplexity"\ntimeout_s = 60\n', "workloads.q.timeout_s: a quality workload runs llama-perplexity to completion"),
    ],
)
def test_quality_key_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=_escaped(message)):
        _load(tmp_path, body + "[configs.a]\n")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ('quantize = { from = "ref", type = "IQ2_XXS" }', "models.x.quantize.type: 'IQ2_XXS' is not a llama-quantize type usable without an importance matrix"),
        ('quantize = { from = "nope", type = "Q4_0" }', "models.x.quantize.from: unknown model 'nope'"),
        ('quantize = { from = "q2", type = "Q4_0" }', "models.x.quantize.from: 'q2' is itself quantized"),
        ('quantize = { type = "Q4_0" }', "models.x.quantize: write quantize = "),
        ('quantize = { from = "ref", type = "Q4_0" }\nembedded = "smollm2-135m-instruct-q4_1"', "give exactly one of path"),
    ],
)
def test_quantize_errors(tmp_path: Path, model: str, message: str) -> None:
    with pytest.raises(ConfigError, match=_escaped(message)):
        _load(tmp_path, f"[models.x]\n{model}\n[configs.a]\n")


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_strip_gutenberg_keeps_only_the_book() -> None:
    text = "The Project Gutenberg EBook of X\n\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody line.\n\nEnd of the Project Gutenberg EBook of X\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicence\n"
    assert strip_gutenberg(text) == "Body line.\n"


def test_embedded_corpus_is_flatland_from_the_installed_wheel(tmp_path: Path) -> None:
    corpus = load_corpus("embedded:flatland", where="m.toml:workloads.q.corpus", cache_dir=tmp_path)
    text = corpus.path.read_text()
    assert text.startswith("FLATLAND") or "Flatland" in text[:2000]
    assert "Gutenberg" not in text  # header and licence cut off
    assert corpus.path.is_relative_to(tmp_path) and len(text.split()) > 30000
    again = load_corpus("embedded:flatland", where="x", cache_dir=tmp_path)
    assert again.sha256 == corpus.sha256 and again.path == corpus.path


def test_user_corpus_errors(tmp_path: Path) -> None:
    where = "m.toml:workloads.q.corpus"
    with pytest.raises(CorpusError, match=f"{where}: corpus file not found: {tmp_path / 'wiki.test.raw'}"):
        load_corpus(str(tmp_path / "wiki.test.raw"), where=where, cache_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"), where=where, cache_dir=tmp_path)
    with pytest.raises(CorpusError, match="unknown embedded corpus 'wiki'"):
        load_corpus("embedded:wiki", where=where, cache_dir=tmp_path)


# -- the quality table -------------------------------------------------------------


def _quality(config: str, file: str, role: str, *, ppl: float, inc: float | None = None, kld: float | None = None,
             top: float | None = None, outcome: str = "passed", thresholds: dict[str, float] | None = None) -> ResultEntry:
    metrics = {"ppl": ppl, "ppl_error": 0.5, "ppl_increase_pct": inc, "kld_mean": kld, "same_top_p_pct": top}
    entry = ResultEntry(f"{config}-quality", config, "quality", outcome, endpoint="llama-perplexity",
                        metrics={k: Summary.of([v]) for k, v in metrics.items() if v is not None},
                        model={"file": file, "size": 2_000_000_000}, extra={"quality": {"role": role}},
                        thresholds=thresholds)
    if outcome == "failed":
        from pytest_llamabench.results import Failure

        entry.failure = Failure("threshold", "threshold not met")
    return entry


def _speed(config: str, file: str, gen: float) -> ResultEntry:
    return ResultEntry(f"{config}-short", config, "short", "passed", metrics={"gen_tok_s": Summary.of([gen] * 3)},
                       model={"file": file})


LIMITS = {"max_ppl_increase_pct": 5.0, "source": "m.toml"}


def test_quality_rows_and_verdicts() -> None:
    rows = quality_table.build_rows([
        _quality("Q8_0", "q8.gguf", "reference", ppl=6.5342, inc=0.0, kld=0.0, top=100.0),
        _quality("Q4_K_M", "q4.gguf", "candidate", ppl=6.6688, inc=2.06, kld=0.0213, top=93.4, thresholds=LIMITS),
        _quality("UD-Q4_K_XL", "ud.gguf", "candidate", ppl=7.1702, inc=9.73, kld=0.0871, top=88.0, outcome="failed",
                 thresholds=LIMITS),
        _speed("C7", "q4.gguf", 69.0),
    ])
    assert [(r.config, r.verdict) for r in rows] == [
        ("Q8_0", "Reference"), ("Q4_K_M", "RECOMMENDED"), ("UD-Q4_K_XL", "NOT RECOMMENDED")]
    assert rows[2].why == "PPL vs reference 9.73% > 5%"
    text = quality_table.render(rows, markdown=True)
    assert "| Quant | Size | PPL | vs reference | KLD | same top p | Verdict |" in text
    assert "| **Q8_0** | 2.0 GB | 6.5342 ± 0.5000 | baseline | — | — | Reference |" in text
    assert "| Q4_K_M | 2.0 GB | 6.6688 ± 0.5000 | +2.1% | 0.0213 | 93.4% | RECOMMENDED |" in text
    assert "| UD-Q4_K_XL | 2.0 GB | 7.1702 ± 0.5000 | +9.7% | 0.0871 | 88.0% | NOT RECOMMENDED (PPL vs reference 9.73% > 5%) |" in text
    assert "speed WINNER is chosen only among configs whose model is not NOT RECOMMENDED" in text


def test_no_threshold_no_verdict() -> None:
    (row,) = quality_table.build_rows([_quality("Q4", "q4.gguf", "candidate", ppl=7.0, inc=3.0, kld=0.01, top=95.0)])
    assert (row.verdict, row.why) == ("—", "no quality threshold set")


def test_winner_only_among_models_that_pass_quality() -> None:
    results = [
        _quality("Q4_K_M", "q4.gguf", "candidate", ppl=6.7, inc=2.0, kld=0.02, top=93.0, thresholds=LIMITS),
        _quality("UD", "ud.gguf", "candidate", ppl=7.2, inc=9.7, kld=0.09, top=88.0, outcome="failed", thresholds=LIMITS),
        _speed("C7", "q4.gguf", 60.0),
        _speed("FAST", "ud.gguf", 90.0),  # fastest, but its model is NOT RECOMMENDED
        _speed("C5", "q4.gguf", 40.0),
    ]
    exclude = quality_table.excluded(results)
    assert exclude == {"FAST": "quality: NOT RECOMMENDED (UD: PPL vs reference 9.7% > 5%)"}
    speed = [r for r in results if not quality_table.is_quality(r)]
    rows, _, verdict = build_table(speed, partial=None, exclude=exclude)
    assert verdict.best == "C7" and verdict.winner == "C7"
    assert {r.config: r.status for r in rows}["FAST"] == exclude["FAST"]
    _, _, unfiltered = build_table(speed)
    assert unfiltered.best == "FAST"  # without the quality results it would have won


# -- the gate: deterministic metrics are compared exactly --------------------------


def test_exact_comparison_has_no_noise_model() -> None:
    tol = parse_tolerance("ppl:+0.1%").tolerance
    assert compare_exact([6.5342], [6.5350], tol, config="Q4", workload="q", metric="ppl").verdict == NO_CHANGE
    worse = compare_exact([6.5342], [6.5600], tol, config="Q4", workload="q", metric="ppl")
    assert worse.verdict == REGRESSED and "compared exactly" in worse.reason and worse.units == "exact"
    assert compare_exact([6.5342], [6.4], tol, config="Q4", workload="q", metric="ppl").verdict == IMPROVED
    top = parse_tolerance("same_top_p_pct:-0.1").tolerance  # absolute, in percentage points
    assert compare_exact([93.4], [93.2], top, config="Q4", workload="q", metric="same_top_p_pct").verdict == REGRESSED
    assert compare_exact([93.4], [93.35], top, config="Q4", workload="q", metric="same_top_p_pct").verdict == NO_CHANGE


def test_gate_flags_a_one_sample_kld_regression() -> None:
    base = RunReport(results=[_quality("Q4", "q4.gguf", "candidate", ppl=6.70, inc=2.0, kld=0.0200, top=93.0)])
    new = RunReport(results=[_quality("Q4", "q4.gguf", "candidate", ppl=6.70, inc=2.0, kld=0.0230, top=93.0)])
    rows = {r.metric: r for r in compare(base, new, tolerances=Tolerances(), fingerprint="warn").rows}
    assert rows["kld_mean"].verdict == REGRESSED  # one sample per side, and still a verdict
    assert rows["ppl"].verdict == NO_CHANGE and rows["same_top_p_pct"].verdict == NO_CHANGE


def test_the_users_quality_rows(tmp_path: Path) -> None:
    """configs/qwen35-35b-a3b.toml: Q8_0 reference, Q4_K_M and UD-Q4_K_XL run only the quality
    workload, the speed configs only theirs, and the reference logits come from the Q8_0 row's flags."""
    from types import SimpleNamespace

    from pytest_llamabench.plugin.quality import QualityRuns

    matrix = load_matrix([Path(__file__).parents[1] / "configs" / "qwen35-35b-a3b.toml"], models_dir=tmp_path)
    quality = matrix.workloads["quality"]
    assert quality.quality is not None and quality.quality.reference is not None
    assert quality.quality.reference.name == "q8_0" and quality.quality.corpus.endswith("wikitext-2-raw/wiki.test.raw")
    runs = {name: [w.name for w in matrix.workloads.values() if w.applies_to(c)] for name, c in matrix.configs.items()}
    assert runs["Q8_0"] == runs["Q4_K_M"] == runs["UD-Q4_K_XL"] == ["quality"]
    assert "quality" not in runs["C7"] and "short" in runs["C7"]
    assert matrix.configs["UD-Q4_K_XL"].thresholds["*"].limits == {"max_ppl_increase_pct": 5.0}
    chosen = QualityRuns(SimpleNamespace(matrix=matrix))._reference_config(quality)  # type: ignore[arg-type]
    assert chosen is not None and chosen.name == "Q8_0"  # not C1, the first config of that model
