"""What one repetition measured, and the prompts and checks every workload kind shares.

Every request forces exact work: a prompt of exactly ``prompt_tokens`` tokens (token ids,
measured with the server's tokenizer), ``n_predict`` generated tokens with ``ignore_eos``, and
no prompt-cache reuse between repetitions (``cache_prompt=false``, checked with ``cache_n == 0``)
— except inside one multi-turn conversation, where reuse is the point.

Generation speed comes from the server's ``timings``: ``predicted_per_second`` is
(n - 1) / predicted_ms, because the first token is sampled from the prompt pass; the
client-side rate uses the same n - 1 tokens between the first and the last token event.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pytest_llamabench.config import Workload
from pytest_llamabench.errors import MeasurementInvalid
from pytest_llamabench.stats import percentile
from pytest_llamabench.server.client import StreamResult
from pytest_llamabench.server.launcher import Server

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

#: (sent_at, token arrival times, finished_at, the server's timings) of one request
Request = tuple[float, list[float], float, dict[str, Any]]


@dataclasses.dataclass
class Sample:
    """One repetition; the field names are the per-repetition metrics of ``metrics.py``."""

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


class Prompts:
    """Exact-length token slices of the corpus (tokenized once) and the endpoint in use."""

    def __init__(self, server: Server, needed: int) -> None:
        per_copy = max(len(server.client.tokenize(CORPUS)), 1)
        self.tokens = server.client.tokenize(CORPUS * (needed // per_copy + 2))
        self.endpoint = "/completion"  # switched to /v1/completions if the native stream breaks

    def slice(self, offset: int, length: int) -> list[int]:
        start = offset % max(len(self.tokens) - length, 1)
        return self.tokens[start : start + length]


def aggregate(requests: list[Request]) -> Sample:
    """One repetition (one request, or the turns of one conversation) as a Sample."""
    gen_steps = sum(max(int(t["predicted_n"]) - 1, 0) for *_, t in requests)
    gen_ms = sum(float(t["predicted_ms"]) for *_, t in requests)
    prompt_n = sum(int(t["prompt_n"]) for *_, t in requests)
    prompt_ms = sum(float(t["prompt_ms"]) for *_, t in requests)
    if gen_steps > 0 and gen_ms <= 0:
        raise MeasurementInvalid(f"the server reported predicted_ms = {gen_ms:g} for {gen_steps} generated tokens")
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


def request_of(result: StreamResult) -> Request:
    return (result.sent_at, result.token_times, result.finished_at, result.timings)


def check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise MeasurementInvalid(f"{where}: invalid run: {what}")


def check_stream_count(result: StreamResult, server_count: int, at: str, *, exact: bool, what: str = "") -> None:
    """Client and server token counts agree: never more streamed than generated, and exactly as
    many when the stream carries token ids (``exact``) and its text is ASCII. The server holds back
    tokens that end inside a multi-byte character (byte-fallback tokens, common with random
    weights: seen on the GPU run) and can drop them from the stream, so non-ASCII text is exempt.
    ``what``: which request, for the message."""
    text = (f"{what}: " if what else "") + f"the stream carried {result.client_tokens} tokens, the server counted {server_count}"
    check(result.client_tokens <= server_count, at, text)
    if exact and result.text.isascii():
        check(result.client_tokens == server_count, at, text)


def where(server: Server, workload: Workload) -> str:
    return f"{server.config.name}/{workload.name}"
