"""A quality workload on a config: perplexity, and with a ``reference`` the KL divergence against
the reference model's cached logits, as one ResultEntry (pytest-free).

No llama-server may hold the machine meanwhile (the caller makes sure: plugin/quality.py runs
these before a config's server starts). On a GPU the run uses the config's offload flags and,
with a VRAM budget, holds the rest of the card as a server launch would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.errors import ConfigError, CorpusError, QualityRunFailed, ServerExited, VocabularyMismatch
from pytest_llamabench.hardware.device import Device
from pytest_llamabench.metrics import (
    Metric, KLD_MAX, KLD_MEAN, KLD_MEDIAN, KLD_P99, PPL, PPL_ERROR, PPL_INCREASE_PCT, RMS_DP_PCT, SAME_TOP_P_PCT,
)  # fmt: skip
from pytest_llamabench.outputs.kinds import QUALITY_ENDPOINT
from pytest_llamabench.quality.corpus import load_corpus
from pytest_llamabench.quality.perplexity import Mode, Run, environment, perplexity_argv, run_perplexity
from pytest_llamabench.quality.quantize import materialize
from pytest_llamabench.quality.reference import ReferenceLogits, reference_logits
from pytest_llamabench.quality.tools import PERPLEXITY, find_tool
from pytest_llamabench.quality.vocab import vocab_size
from pytest_llamabench.results import ResultEntry
from pytest_llamabench.stats import Summary


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """What a quality run needs from the session: the llama-server in use (its tools sit beside
    it), where caches and logs go, the GPUs and VRAM budget of GPU configs."""

    server_binary: Path
    server_where: str
    cache_dir: Path
    log_dir: Path
    devices: tuple[Device, ...] | None = None
    vram_budget: int | None = None
    log: Callable[[str], None] = print


def run_quality(config: ServerConfig, workload: Workload, settings: QualitySettings, *,
                reference_config: ServerConfig | None = None) -> ResultEntry:  # fmt: skip
    """Score ``config``'s model on the workload's corpus. ``reference_config``: the matrix's config
    of the reference model, whose flags (offload, KV cache) the reference logits are made with;
    without one, the reference runs with ``config``'s flags."""
    from pytest_llamabench.model.files import file_sha256, verify_model

    spec = workload.quality
    if spec is None:
        raise ConfigError(f"{workload.source}: workload {workload.name!r} is not a quality workload")
    tool = find_tool(PERPLEXITY, settings.server_binary, settings.server_where)
    config = materialize(config, settings.server_binary, settings.server_where, settings.log)
    model = config.model.resolve()
    info = verify_model(model, sha256=config.model.sha256, size=config.model.size, where=config.model.source,
                        rehash=config.model.verify == "always")  # fmt: skip
    model_sha = info.sha256
    corpus = load_corpus(spec.corpus, where=f"{spec.source}.corpus", cache_dir=settings.cache_dir)
    env = environment(config, settings.devices if config.gpu else None)
    facts: dict[str, Any] = {"corpus": corpus.as_dict(), "ctx": spec.ctx, "chunks_asked": spec.chunks,
                             "tool": tool.as_dict(), "model_bytes": info.size, "model_sha256": model_sha}  # fmt: skip
    checker = _checker(config, workload)
    if alive := llama_servers():  # this process's own are gone (plugin/quality.py); another worker's or run's?
        settings.log(f"{config.instance}/{workload.name}: {len(alive)} llama-server process(es) of another worker or "
                     f"run are alive ({', '.join(map(str, alive))}); on a GPU they compete for memory with llama-perplexity")  # fmt: skip
        facts["llama_servers_alive"] = alive
    with _budget(config, settings):
        if spec.reference is None:
            argv = perplexity_argv(tool.path, model, corpus.path, config, ctx=spec.ctx, chunks=spec.chunks,
                                   mode=Mode("plain"))  # fmt: skip
            run = run_perplexity(argv, settings.log_dir / f"{config.instance}-{workload.name}.log", env=env, kld=False)
            checker(run, f"the perplexity run of {model.name}")
            assert run.output is not None
            values: dict[Metric, float | None] = {PPL: run.output.ppl, PPL_ERROR: run.output.ppl_error}
            facts.update(role="plain", chunks=run.output.chunks, seconds=round(run.seconds, 3), argv=run.argv,
                         log=str(run.log))  # fmt: skip
        else:
            ref_config = materialize(reference_config or dataclasses.replace(config, model=spec.reference),
                                     settings.server_binary, settings.server_where, settings.log)  # fmt: skip
            ref_model = ref_config.model.resolve()
            _same_vocabulary(model, ref_model, spec.source, config, ref_config)
            ref_sha = file_sha256(ref_model)
            ref_env = environment(ref_config, settings.devices if ref_config.gpu else None)
            reference = reference_logits(ref_config, ref_model, ref_sha, corpus, spec, tool, cache_dir=settings.cache_dir,
                                         log_dir=settings.log_dir, env=ref_env, check=checker, log=settings.log)  # fmt: skip
            facts.update(reference={"model": ref_config.model.name, "config": ref_config.name, "file": ref_model.name,
                                    "sha256": ref_sha, "bytes": ref_model.stat().st_size, **reference.as_dict()})  # fmt: skip
            if model_sha == ref_sha:
                values = _reference_row(reference)
                facts.update(role="reference", chunks=reference.chunks, seconds=round(reference.seconds, 3),
                             log=str(reference.log) if reference.log else None)  # fmt: skip
            else:
                values, run = _against(reference, tool.path, model, corpus.path, config, spec.ctx, env, settings,
                                       workload, checker)  # fmt: skip
                facts.update(role="candidate", chunks=run.output.chunks if run.output else None,
                             seconds=round(run.seconds, 3), argv=run.argv, log=str(run.log))  # fmt: skip
    return ResultEntry(
        test=f"{config.instance}-{workload.name}",
        config=config.name,
        workload=workload.name,
        start=config.start if config.restarts > 1 else None,
        metrics={metric.name: Summary.of([value]) for metric, value in values.items() if value is not None},
        endpoint=QUALITY_ENDPOINT,
        model=info.as_dict(),
        workload_spec={"name": workload.name, "kind": workload.kind, **spec.key()},
        extra={"quality": facts},
    )


def _reference_row(reference: ReferenceLogits) -> dict[Metric, float | None]:
    """The reference against itself: by definition no increase, no divergence, the same top token."""
    return {PPL: reference.ppl, PPL_ERROR: reference.ppl_error, PPL_INCREASE_PCT: 0.0, KLD_MEAN: 0.0,
            SAME_TOP_P_PCT: 100.0}  # fmt: skip


def _against(reference: ReferenceLogits, binary: Path, model: Path, corpus: Path, config: ServerConfig, ctx: int,
             env: dict[str, str], settings: QualitySettings, workload: Workload,
             checker: Callable[[Run, str], None]) -> tuple[dict[Metric, float | None], Run]:  # fmt: skip
    argv = perplexity_argv(binary, model, corpus, config, ctx=ctx, chunks=None, mode=Mode("kld", reference.path))
    run = run_perplexity(argv, settings.log_dir / f"{config.instance}-{workload.name}.log", env=env, kld=True)
    checker(run, f"the KL-divergence run of {model.name}")
    out = run.output
    assert out is not None
    return {PPL: out.ppl, PPL_ERROR: out.ppl_error, PPL_INCREASE_PCT: out.ppl_increase_pct, KLD_MEAN: out.kld_mean,
            KLD_MEDIAN: out.kld_median, KLD_P99: out.kld_p99, KLD_MAX: out.kld_max,
            SAME_TOP_P_PCT: out.same_top_p_pct, RMS_DP_PCT: out.rms_dp_pct}, run  # fmt: skip


def _same_vocabulary(model: Path, ref_model: Path, where: str, config: ServerConfig, ref: ServerConfig) -> None:
    ours, theirs = vocab_size(model), vocab_size(ref_model)
    if ours is not None and theirs is not None and ours != theirs:
        raise VocabularyMismatch(
            f"{where}.reference: {ref.model.name} ({ref_model.name}) has a vocabulary of {theirs} tokens, "
            f"{config.model.name} ({model.name}) of {ours}: KL divergence compares the same tokens' "
            "probabilities, so the reference must be the same model family (e.g. its Q8_0 or F16)"
        )


def _checker(config: ServerConfig, workload: Workload) -> Callable[[Run, str], None]:
    spec = workload.quality
    assert spec is not None

    def check(run: Run, what: str) -> None:
        found = run.problem
        if found is not None and found.what == "too-short":
            need, ctx, got = found.numbers
            have = f"tokenizes to only {got} tokens" if got >= 0 else "is too short"
            raise CorpusError(
                f"{spec.source}.corpus: the corpus {have}; llama-perplexity needs at least two contexts "
                f"({need} tokens at ctx = {ctx}): give a longer text, or lower ctx in {spec.source}",
                log_tail=run.tail(),
            )
        if found is not None and found.what == "vocab":
            raise VocabularyMismatch(f"{spec.source}.reference: {found.line}; the reference must share the "
                                     "model's vocabulary", log_tail=run.tail())  # fmt: skip
        if run.returncode != 0 or run.output is None:
            from pytest_llamabench.server.classify import classify_failure

            classified = classify_failure(run.tail(200), run.returncode, what="llama-perplexity")
            if run.returncode != 0 and not isinstance(classified, ServerExited):  # OOM, bad flag, crash, ...
                classified.message = f"{config.name}/{workload.name}: {what}: {classified.message}"
                classified.log_tail = run.tail()
                raise classified
            why = found.line if found is not None else f"exit {run.returncode}, no result printed"
            raise QualityRunFailed(f"{config.name}/{workload.name}: {what} failed ({why}); log: {run.log}",
                                   log_tail=run.tail())  # fmt: skip

    return check


def llama_servers() -> list[int]:
    """PIDs of the llama-server processes on this host (containers' too: they are host processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "llama-server":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


@contextlib.contextmanager
def _budget(config: ServerConfig, settings: QualitySettings) -> Iterator[None]:
    budget = config.budget(settings.vram_budget)
    if not budget:
        yield
        return
    from pytest_llamabench.hardware.ballast import VramBallast

    with VramBallast(budget, devices=settings.devices):
        yield


__all__ = ["QualitySettings", "llama_servers", "run_quality"]
