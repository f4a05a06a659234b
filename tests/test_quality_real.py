"""Quant quality on real runs: the pinned llama-quantize makes the ladder from the shipped Q4_1,
the pinned llama-perplexity scores it on the embedded corpus. Bad input gets one clear error."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from pathlib import Path

import pytest

from pytest_llamabench.config import Matrix, load_matrix
from pytest_llamabench.errors import CorpusError, ToolMissing, VocabularyMismatch
from pytest_llamabench.model.synth.writer import gguf_file
from pytest_llamabench.quality.run import QualitySettings, run_quality

QUALITY_MATRIX = Path(__file__).parents[1] / "configs" / "quality.toml"
LADDER = ("Q8_0", "Q4_K_M", "Q3_K_S", "Q2_0")  # more bits first (smaller files: checked)


@pytest.fixture(scope="module")
def settings(server_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> QualitySettings:
    cache = tmp_path_factory.mktemp("quality")
    return QualitySettings(server_binary=server_bin, server_where="the test's llama-server", cache_dir=cache / "cache",
                           log_dir=cache / "logs", log=print)  # fmt: skip


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    """configs/quality.toml, scoring 2 chunks of 256 tokens with 1 thread (steadier on a shared 2-core host)."""
    loaded = load_matrix([QUALITY_MATRIX])
    workload = loaded.workloads["quality"]
    assert workload.quality is not None
    small = dataclasses.replace(workload, quality=dataclasses.replace(workload.quality, ctx=256, chunks=2))
    configs = {n: dataclasses.replace(c, server={**c.server, "threads": 1}) for n, c in loaded.configs.items()}
    return dataclasses.replace(loaded, configs=configs, workloads={"quality": small})


def test_fewer_bits_higher_kld(matrix: Matrix, settings: QualitySettings) -> None:
    workload, ref = matrix.workloads["quality"], matrix.configs["Q4_1"]
    reference = run_quality(ref, workload, settings, reference_config=ref)
    assert reference.extra["quality"]["role"] == "reference"
    rows = {name: run_quality(matrix.configs[name], workload, settings, reference_config=ref) for name in LADDER}
    kld = [rows[n].median("kld_mean") for n in LADDER]
    top = [rows[n].median("same_top_p_pct") for n in LADDER]
    ppl = [rows[n].median("ppl") for n in LADDER]
    print(dict(zip(LADDER, zip(kld, top, ppl))), reference.median("ppl"))
    sizes = [rows[n].extra["quality"]["model_bytes"] for n in LADDER]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), f"the ladder's files do not shrink: {sizes}"
    assert all(k is not None for k in kld)
    assert all(a < b for a, b in zip(kld, kld[1:])), f"KLD not strictly monotone in bits: {dict(zip(LADDER, kld))}"
    assert kld[0] < 0.01  # Q8_0 of the Q4_1 weights is the reference, up to rounding
    assert top[0] > top[-1] and ppl[-1] > ppl[0]
    for name in LADDER:  # each made by llama-quantize, a real file of its own
        facts = rows[name].extra["quality"]
        assert facts["role"] == "candidate" and facts["reference"]["config"] == "Q4_1"
        assert rows[name].model is not None and rows[name].model["file"].split("-")[1] == name  # SHA-TYPE-BUILD.gguf


def test_second_run_reuses_the_reference_logits(matrix: Matrix, settings: QualitySettings) -> None:
    workload, ref = matrix.workloads["quality"], matrix.configs["Q4_1"]
    first = run_quality(ref, workload, settings, reference_config=ref).extra["quality"]["reference"]
    logits = Path(first["logits"])
    stamp = logits.stat().st_mtime_ns
    again = run_quality(matrix.configs["Q2_0"], workload, settings, reference_config=ref).extra["quality"]["reference"]
    assert again["cached"] is True and again["seconds"] == 0.0 and again["logits"] == first["logits"]
    assert logits.stat().st_mtime_ns == stamp  # not written again


def test_corpus_shorter_than_two_contexts(tmp_path: Path, settings: QualitySettings, matrix: Matrix) -> None:
    short = tmp_path / "short.txt"
    short.write_text("A square is a figure of four equal sides. " * 20)
    spec = matrix.workloads["quality"].quality
    assert spec is not None
    workload = dataclasses.replace(matrix.workloads["quality"], quality=dataclasses.replace(spec, corpus=str(short)))
    with pytest.raises(CorpusError) as info:
        run_quality(matrix.configs["Q4_1"], workload, settings)
    message = str(info.value)
    assert message.startswith(f"{QUALITY_MATRIX}:workloads.quality.corpus: the corpus tokenizes to only ")
    assert "needs at least two contexts (512 tokens at ctx = 256)" in message and "lower ctx" in message


def test_reference_with_another_vocabulary(tmp_path: Path, settings: QualitySettings) -> None:
    other = tmp_path / "other-vocab.gguf"  # a real GGUF whose vocabulary has 1000 tokens, not SmolLM2's 49152
    with gguf_file(other, "llama") as writer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(1000)])
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(f"""
        [models.smollm2]
        embedded = "smollm2-135m-instruct-q4_1"
        [models.other]
        path = "{other}"
        [defaults]
        model = "smollm2"
        ctx = 1024
        [workloads.quality]
        kind = "perplexity"
        reference = "other"
        [configs.a]
    """))
    matrix = load_matrix([path])
    with pytest.raises(VocabularyMismatch, match=r"m.toml:workloads.quality.reference: other \(other-vocab.gguf\) has a "
                       r"vocabulary of 1000 tokens, smollm2 \(SmolLM2-135M-Instruct.Q4_1.gguf\) of 49152"):  # fmt: skip
        run_quality(matrix.configs["a"], matrix.workloads["quality"], settings)


def test_build_without_llama_perplexity(tmp_path: Path, server_bin: Path, settings: QualitySettings,
                                        matrix: Matrix) -> None:  # fmt: skip
    lonely = tmp_path / "bin" / "llama-server"  # a user's own llama-server, built alone
    lonely.parent.mkdir()
    shutil.copy2(server_bin, lonely)
    mine = dataclasses.replace(settings, server_binary=lonely, server_where="--llamabench-server-bin")
    with pytest.raises(ToolMissing, match=f"--llamabench-server-bin: no llama-perplexity beside {lonely}; "):
        run_quality(matrix.configs["Q4_1"], matrix.workloads["quality"], mine)
