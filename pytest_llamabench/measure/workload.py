"""Run a workload against a server and measure it honestly.

Every request forces exact work: a prompt of exactly ``prompt_tokens`` tokens
(token ids, measured with the server's tokenizer), ``n_predict`` generated
tokens with ``ignore_eos``, and no prompt-cache reuse between repetitions
(``cache_prompt=false``, checked with ``cache_n == 0``) — except inside one
multi-turn conversation, where reuse is the point (checked: ``cache_n > 0``
from the second turn on).

Generation speed comes from the server's ``timings``: ``predicted_per_second``
is (n - 1) / predicted_ms, because the first token is sampled from the prompt
pass; the client-side rate uses the same n - 1 tokens between the first and
the last token event, so the two are comparable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pytest_llamabench.server.client import StreamResult
from pytest_llamabench.config import Workload
from pytest_llamabench.errors import MeasurementInvalid, RequestFailed
from pytest_llamabench.server.launcher import Server
from pytest_llamabench.measure.stats import percentile, summarize

#: Deterministic source text for prompts; repeated as needed, then cut to exact token counts.
CORPUS = (
    "The river bends twice before it reaches the old mill, and in late autumn the water runs "
    "clear enough to count the stones. Farmers from the valley bring their grain in carts, "
    "trading news about the weather, the price of salt and the new bridge at the northern ford. "
    "A schoolteacher keeps a ledger of every flood since the mill was built, noting the height "
    "of the water, the damage to the fields and the names of the families who helped rebuild. "
    "In the evenings the miller's daughter reads the ledger aloud, and the children argue about "
    "which winter was the coldest and which summer brought the most fish to the shallow pools. "
)

#: One repetition's numbers; lists of these become the report's samples.
SAMPLE_METRICS = (
    "gen_tok_s", "prompt_tok_s", "client_gen_tok_s", "ttft_ms", "e2e_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms",
)  # fmt: skip

Runner = Callable[[Callable[[], None], int, int], None]
"""``runner(one_round, rounds, warmup_rounds)``: e.g. pytest-benchmark's pedantic."""


@dataclasses.dataclass
class Sample:
    gen_tok_s: float
    prompt_tok_s: float
    client_gen_tok_s: float
    ttft_ms: float
    e2e_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    itl_p99_ms: float
    predicted_n: int
    prompt_n: int
    cache_n: int


@dataclasses.dataclass
class Measurement:
    """All repetitions of one workload on one server (warmups excluded)."""

    config: str
    workload: str
    samples: list[Sample]
    warmups: int
    rss_peak_mib: float | None = None
    vram_peak_mib: float | None = None
    endpoint: str = "/completion"

    def metrics(self) -> dict[str, dict[str, Any]]:
        out = {name: summarize([getattr(s, name) for s in self.samples]) for name in SAMPLE_METRICS}
        if self.rss_peak_mib is not None:
            out["rss_peak_mib"] = summarize([self.rss_peak_mib])
        if self.vram_peak_mib is not None:
            out["vram_peak_mib"] = summarize([self.vram_peak_mib])
        return out

    def median(self, metric: str) -> float | None:
        value = self.metrics().get(metric, {}).get("median")
        return float(value) if value is not None else None


class _RunState:
    """Exact-length token slices of the corpus (tokenized once) and the endpoint in use."""

    def __init__(self, server: Server, needed: int) -> None:
        self.server = server
        text = CORPUS
        tokens = server.client.tokenize(text)
        per_copy = max(len(tokens), 1)
        copies = needed // per_copy + 2
        self.tokens = server.client.tokenize(CORPUS * copies)

        self.endpoint = "/completion"  # switched to /v1/completions if the native stream breaks

    def slice(self, offset: int, length: int) -> list[int]:
        start = offset % max(len(self.tokens) - length, 1)
        return self.tokens[start : start + length]


def run_workload(server: Server, workload: Workload, *, runner: Runner | None = None) -> Measurement:
    """Warm up, repeat, and collect one Sample per repetition."""
    rounds_done = 0
    samples: list[Sample] = []
    per_round = workload.prompt_tokens * workload.turns
    prompts = _RunState(server, per_round * 4)

    def one_round() -> None:
        nonlocal rounds_done
        index = rounds_done
        rounds_done += 1
        sample = _guarded(server, lambda: _run_once(server, workload, prompts, index))
        if index >= workload.warmup:
            samples.append(sample)

    if runner is not None:
        runner(one_round, workload.repetitions, workload.warmup)
    # pytest-benchmark runs a round only once when it is disabled (e.g. under xdist):
    # finish the warmups and repetitions ourselves so the numbers are the same either way.
    while len(samples) < workload.repetitions:
        one_round()
    endpoint = "/v1/chat/completions" if workload.kind == "chat" else prompts.endpoint
    return Measurement(server.config.name, workload.name, samples, workload.warmup, endpoint=endpoint)


def _guarded(server: Server, fn: Callable[[], Sample]) -> Sample:
    try:
        return fn()
    except RequestFailed:
        server.ensure_alive()  # a dead server is the real cause: say that instead
        raise


def _run_once(server: Server, workload: Workload, prompts: _RunState, index: int) -> Sample:
    if workload.kind == "chat":
        return _run_chat(server, workload, prompts, index)
    prompt = prompts.slice(index * 7919, workload.prompt_tokens)
    payload = {"prompt": prompt, "n_predict": workload.n_predict, "max_tokens": workload.n_predict,
               "ignore_eos": True, "cache_prompt": False, "temperature": 0.0, "seed": 42}  # fmt: skip
    result = _stream_completion(server, prompts, payload)
    timings = result.timings
    where = f"{server.config.name}/{workload.name}"
    _check(timings.get("predicted_n") == workload.n_predict, where,
           f"generated {timings.get('predicted_n')} tokens, asked for {workload.n_predict}")  # fmt: skip
    _check_stream_count(result, int(timings.get("predicted_n", -1)), where, exact=prompts.endpoint == "/completion")
    _check(timings.get("cache_n") == 0, where,
           f"the prompt cache was reused (cache_n={timings.get('cache_n')}) although cache_prompt=false")  # fmt: skip
    _check(timings.get("prompt_n") == workload.prompt_tokens, where,
           f"the server evaluated {timings.get('prompt_n')} prompt tokens, asked for {workload.prompt_tokens}")  # fmt: skip
    return _sample([(result.sent_at, result.token_times, result.finished_at, timings)])


def _stream_completion(server: Server, prompts: _RunState, payload: dict[str, Any]) -> StreamResult:
    """Native /completion stream; if it drops before its first event while the server lives
    (seen with a CUDA build on an H100: headers never sent), use /v1/completions from then on."""
    if prompts.endpoint == "/completion":
        try:
            return server.client.stream_completion(payload)
        except RequestFailed as exc:
            server.ensure_alive()
            if exc.context.get("events_received"):
                raise
            prompts.endpoint = "/v1/completions"
    return server.client.stream_oai_completion(payload)


def _run_chat(server: Server, workload: Workload, prompts: _RunState, index: int) -> Sample:
    """One conversation of ``turns`` turns; the history is resent and the cache reused."""
    where = f"{server.config.name}/{workload.name}"
    messages: list[dict[str, str]] = []
    turns = []
    for turn in range(workload.turns):
        user = server.client.detokenize(prompts.slice((index * workload.turns + turn) * 7919, workload.prompt_tokens))
        messages.append({"role": "user", "content": user})
        result = server.client.stream_chat(
            {"messages": messages, "max_tokens": workload.n_predict, "ignore_eos": True, "cache_prompt": True,
             "temperature": 0.0, "seed": 42}  # fmt: skip
        )
        timings = result.timings
        usage = result.final.get("usage") or {}
        _check(timings.get("predicted_n") == workload.n_predict, where,
               f"turn {turn + 1} generated {timings.get('predicted_n')} tokens, asked for {workload.n_predict}")  # fmt: skip
        _check(usage.get("completion_tokens") == timings.get("predicted_n"), where,
               f"turn {turn + 1}: usage says {usage.get('completion_tokens')} tokens, timings {timings.get('predicted_n')}")  # fmt: skip
        _check(result.client_tokens <= workload.n_predict, where,
               f"turn {turn + 1}: the stream carried {result.client_tokens} tokens for {workload.n_predict}")  # fmt: skip
        if turn > 0:
            _check(timings.get("cache_n", 0) > 0, where,
                   f"turn {turn + 1} reused no prompt cache: the conversation history was re-evaluated")  # fmt: skip
        messages.append({"role": "assistant", "content": result.text})
        turns.append((result.sent_at, result.token_times, result.finished_at, timings))
    return _sample(turns)


def _sample(requests: list[tuple[float, list[float], float, dict[str, Any]]]) -> Sample:
    """Aggregate one repetition (one request, or the turns of one conversation)."""
    gen_steps = sum(max(int(t["predicted_n"]) - 1, 0) for *_, t in requests)
    gen_ms = sum(float(t["predicted_ms"]) for *_, t in requests)
    prompt_n = sum(int(t["prompt_n"]) for *_, t in requests)
    prompt_ms = sum(float(t["prompt_ms"]) for *_, t in requests)
    itl: list[float] = []
    client_span = 0.0
    ttfts: list[float] = []
    for sent_at, times, _, _ in requests:
        if not times:
            raise MeasurementInvalid("a request produced no tokens")
        ttfts.append((times[0] - sent_at) * 1000)
        client_span += times[-1] - times[0]
        itl += [(b - a) * 1000 for a, b in zip(times, times[1:])]
    itl = itl or [0.0]
    return Sample(
        gen_tok_s=gen_steps / gen_ms * 1000 if gen_ms > 0 else 0.0,
        prompt_tok_s=prompt_n / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
        client_gen_tok_s=gen_steps / client_span if client_span > 0 else 0.0,
        ttft_ms=sum(ttfts) / len(ttfts),
        e2e_ms=(requests[-1][2] - requests[0][0]) * 1000,
        itl_p50_ms=percentile(itl, 50),
        itl_p90_ms=percentile(itl, 90),
        itl_p99_ms=percentile(itl, 99),
        predicted_n=sum(int(t["predicted_n"]) for *_, t in requests),
        prompt_n=prompt_n,
        cache_n=sum(int(t.get("cache_n", 0)) for *_, t in requests),
    )


def _check_stream_count(result: StreamResult, server_count: int, where: str, *, exact: bool) -> None:
    """Client and server token counts agree: never more streamed than generated, and exactly as
    many when the stream carries token ids (``exact``) and its text is ASCII. The server holds back
    tokens that end inside a multi-byte character (byte-fallback tokens, common with random
    weights: seen on the GPU run) and can drop them from the stream, so non-ASCII text is exempt."""
    what = f"the stream carried {result.client_tokens} tokens, the server counted {server_count}"
    _check(result.client_tokens <= server_count, where, what)
    if exact and result.text.isascii():
        _check(result.client_tokens == server_count, where, what)


def _check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise MeasurementInvalid(f"{where}: invalid run: {what}")


__all__ = ["Measurement", "Sample", "run_workload"]
