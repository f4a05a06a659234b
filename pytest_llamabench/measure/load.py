"""``kind = "load"``: one level of a concurrent workload per test (``config_load``); one
repetition sends all of the level's ``requests``.

- Closed loop (``concurrency = N``): N streams at once, each sending its next request when its
  previous one ends, until ``requests`` have been sent.
- Open loop (``rate = R``): requests arrive at R requests/s, exponential gaps (a Poisson
  process) from ``random.Random(seed, repetition)``, whether or not earlier ones have ended.

Per request: time to first token, the gaps between token events, end-to-end time and the
server's ``timings``. Per repetition: aggregate output tok/s (all generated tokens over the
wall time from the first request sent to the last one done), requests/s, percentiles over the
requests, goodput under the workload's ``slo``, and the server's busy slots (``/metrics`` or
``/slots``, polled) next to the client's count of requests generating at once.

Checks, before anything is sent: the server has a slot per stream (``--parallel``) and each
slot's context (``ctx`` is split across the slots) holds a request. After: every request got
exactly ``n_predict`` tokens (stream and server agree), and no prompt cache was shared:
distinct prompts, ``cache_prompt=false``, ``cache_n == 0``; unless ``share_prompt = true``, where
every request sends one prompt with the cache on and ``prompt_n + cache_n`` must be the prompt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from pytest_llamabench.config import Workload
from pytest_llamabench.config_load import LoadLevel
from pytest_llamabench.errors import ConfigError, MeasurementInvalid, StreamDroppedEarly
from pytest_llamabench.measure.sample import Prompts, Sample, check, check_stream_count, where
from pytest_llamabench.metrics import LOAD_METRICS
from pytest_llamabench.server.client import StreamResult
from pytest_llamabench.server.launcher import Server
from pytest_llamabench.server.stream_async import AsyncStreams
from pytest_llamabench.stats import percentile

METRICS = LOAD_METRICS
#: How often the server's busy slots are read during a repetition.
SLOT_POLL_S = 0.1

T = TypeVar("T")


@dataclasses.dataclass
class LoadSample(Sample):
    """One repetition of a load level: the Sample fields (per-request medians, pooled ITL
    percentiles) plus the level's aggregate numbers; the names are ``metrics.LOAD_METRICS``."""

    agg_tok_s: float
    req_s: float
    ttft_p99_ms: float
    e2e_p99_ms: float
    goodput_req_s: float | None
    goodput_pct: float | None
    slots_busy_max: float | None
    slots_busy_mean: float | None
    gen_overlap_max: float
    requests: list[dict[str, float]] = dataclasses.field(default_factory=list)


def endpoint(prompts: Prompts) -> str:
    return prompts.endpoint


def run_once(server: Server, workload: Workload, prompts: Prompts, index: int) -> LoadSample:
    level = workload.load
    if level is None:
        raise ConfigError(f"{workload.source}: kind = \"load\" needs concurrency or rate levels")
    preflight(server, workload, level)
    bodies = request_bodies(workload, level, prompts, index)
    try:
        results = _run(lambda: _repetition(server, workload, level, prompts.endpoint, bodies, index))
    except StreamDroppedEarly:
        if prompts.endpoint != "/completion":
            raise
        server.ensure_alive()  # the native stream broke before its first event (a CUDA build did): use /v1
        prompts.endpoint = "/v1/completions"
        results = _run(lambda: _repetition(server, workload, level, prompts.endpoint, bodies, index))
    stream_results, slots = results
    _check(server, workload, level, stream_results, exact=prompts.endpoint == "/completion")
    return summarize(stream_results, level, slots)


# -- before sending -----------------------------------------------------------------


def preflight(server: Server, workload: Workload, level: LoadLevel) -> None:
    """One clear error before any request: too few slots, or too little context per slot."""
    at = where(server, workload)
    config = server.config
    slots = server.props.get("total_slots")
    if isinstance(slots, int) and level.concurrency is not None and slots < level.concurrency:
        raise ConfigError(
            f"{at}: {level.concurrency} concurrent streams, but the server has {slots} slot(s) "
            f"(parallel = {config.server.get('parallel')} in {config.source}); set parallel >= {level.concurrency} "
            f"in that config, or lower the level in {level.source}"
        )
    need = workload.prompt_tokens + workload.n_predict
    settings = server.props.get("default_generation_settings") or {}
    per_slot = settings.get("n_ctx") if isinstance(settings, dict) else None
    total = _ctx_arg(server.args)
    busy = min(level.in_flight, slots) if isinstance(slots, int) else level.in_flight
    short_slot = isinstance(per_slot, int) and per_slot < need
    short_total = total and total < busy * need
    if short_slot or short_total:
        raise ConfigError(
            f"{at}: a request needs {need} tokens of context (prompt_tokens {workload.prompt_tokens} + n_predict "
            f"{workload.n_predict}) in each of {busy} busy slots, but the server has "
            f"{per_slot if per_slot is not None else '?'} per slot (ctx = {total or '?'} is split across parallel = "
            f"{config.server.get('parallel')}); set ctx >= {busy * need} in {config.source}"
        )


def _ctx_arg(args: list[str]) -> int | None:
    for flag, value in zip(args, args[1:]):
        if flag in ("--ctx-size", "-c") and value.isdigit():
            return int(value) or None
    return None


def request_bodies(workload: Workload, level: LoadLevel, prompts: Prompts, index: int) -> list[dict[str, Any]]:
    """The repetition's request bodies: distinct prompts without the prompt cache, or one shared
    prompt with it (``share_prompt``)."""
    base = {"n_predict": workload.n_predict, "max_tokens": workload.n_predict, "ignore_eos": True,
            "temperature": 0.0, "seed": 42, "cache_prompt": level.share_prompt}  # fmt: skip
    if level.share_prompt:
        shared = prompts.slice(index * 7919, workload.prompt_tokens)
        return [{**base, "prompt": shared} for _ in range(level.requests)]
    return [{**base, "prompt": p} for p in distinct_prompts(prompts, index * level.requests, level.requests,
                                                                workload.prompt_tokens, level.source)]  # fmt: skip


def distinct_prompts(prompts: Prompts, offset: int, count: int, length: int, where_set: str) -> list[list[int]]:
    """``count`` different prompts of ``length`` tokens: windows of the corpus one token apart
    (it repeats, so windows come back), a repeated one made new by a different first token."""
    alphabet = sorted(set(prompts.tokens))
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    for i in range(count):
        prompt = prompts.slice(offset + i, length)
        for first in [prompt[0], *alphabet]:
            candidate = (first, *prompt[1:])
            if candidate not in seen:
                break
        else:
            raise ConfigError(f"{where_set}: cannot make {count} different prompts of {length} token(s); "
                              "send fewer requests or longer prompts")  # fmt: skip
        seen.add(candidate)
        out.append(list(candidate))
    return out


# -- sending ------------------------------------------------------------------------


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine on a fresh event loop (in a thread if this one already has a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()


async def _repetition(server: Server, workload: Workload, level: LoadLevel, path: str,
                      bodies: list[dict[str, Any]], index: int) -> tuple[list[StreamResult], list[int]]:  # fmt: skip
    client = server.client  # its timeout and hint are set for this workload by run_workload
    base_url = server.base_url
    assert base_url is not None
    slot_source = _slot_source(server.props)
    polled: list[int] = []
    async with AsyncStreams(base_url, api_key=server.api_key, timeout_s=client.request_timeout_s,
                            timeout_hint=client.timeout_hint, connections=level.in_flight) as streams:  # fmt: skip

        stop = asyncio.Event()

        async def poll() -> None:
            # never cancelled mid-request: a cancelled GET leaves its socket to the garbage
            # collector (an "unclosed transport" ResourceWarning on Python 3.12); it is told to stop
            while slot_source is not None and not stop.is_set():
                busy = await streams.busy_slots(slot_source)
                if busy is not None:
                    polled.append(busy)
                try:
                    await asyncio.wait_for(stop.wait(), SLOT_POLL_S)
                except TimeoutError:
                    pass

        def send(i: int) -> Awaitable[StreamResult]:
            return streams.completion(path, bodies[i])

        poller = asyncio.create_task(poll())
        try:
            if level.concurrency is not None:
                results = await _closed_loop(send, len(bodies), level.concurrency)
            else:
                results = await _open_loop(send, arrivals(level, index))
        finally:
            stop.set()
            await poller
    return results, polled


async def _closed_loop(send: Callable[[int], Awaitable[StreamResult]], count: int, streams: int) -> list[StreamResult]:
    queue = iter(range(count))

    async def stream() -> list[tuple[int, StreamResult]]:
        # shared iterator: each stream takes the next request when its last one ends
        return [(i, await send(i)) for i in queue]

    done = sorted((pair for pairs in await _all([stream() for _ in range(streams)]) for pair in pairs), key=lambda p: p[0])
    return [result for _, result in done]


async def _open_loop(send: Callable[[int], Awaitable[StreamResult]], at: list[float]) -> list[StreamResult]:
    start = time.perf_counter()

    async def arrive(i: int) -> StreamResult:
        await asyncio.sleep(max(0.0, start + at[i] - time.perf_counter()))
        return await send(i)

    return await _all([arrive(i) for i in range(len(at))])


def arrivals(level: LoadLevel, index: int) -> list[float]:
    """Seconds after the start at which each request of an open-loop repetition is sent: a
    Poisson process at ``level.rate``, the same for a given seed and repetition."""
    rng = random.Random(f"{level.seed}/{index}")
    t, out = 0.0, []
    for _ in range(level.requests):
        out.append(t)
        t += rng.expovariate(level.rate or 1.0)
    return out


async def _all(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run them together and return their results in order; the first failure cancels the rest
    and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
        return [task.result() for task in tasks]
    except BaseExceptionGroup as group_error:
        first = group_error.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _slot_source(props: dict[str, Any]) -> str | None:
    if props.get("endpoint_metrics"):
        return "/metrics"
    return "/slots" if props.get("endpoint_slots", True) else None


# -- after ----------------------------------------------------------------------------


def _check(server: Server, workload: Workload, level: LoadLevel, results: list[StreamResult], *, exact: bool) -> None:
    at = where(server, workload)
    for i, result in enumerate(results):
        timings = result.timings
        predicted = timings.get("predicted_n")
        what = f"request {i + 1} of {level.requests}"
        check(predicted == workload.n_predict, at, f"{what} generated {predicted} tokens, asked for {workload.n_predict}")
        check_stream_count(result, int(predicted or 0), at, exact=exact, what=what)
        prompt_n, cache_n = int(timings.get("prompt_n", -1)), int(timings.get("cache_n", 0))
        if level.share_prompt:
            check(prompt_n + cache_n == workload.prompt_tokens, at,
                  f"{what}: the server evaluated {prompt_n} + {cache_n} cached prompt tokens, the prompt has "
                  f"{workload.prompt_tokens}")  # fmt: skip
        else:
            check(cache_n == 0, at, f"{what} reused the prompt cache (cache_n={cache_n}): streams must not share it "
                                    "(set share_prompt = true to measure a shared prompt)")  # fmt: skip
            check(prompt_n == workload.prompt_tokens, at,
                  f"{what}: the server evaluated {prompt_n} prompt tokens, asked for {workload.prompt_tokens}")  # fmt: skip


def summarize(results: list[StreamResult], level: LoadLevel, slots: list[int]) -> LoadSample:
    """One repetition's numbers from its requests (pure: tested without a server)."""
    if not results:
        raise MeasurementInvalid("a load repetition finished no request")
    start = min(r.sent_at for r in results)
    wall = max(r.finished_at for r in results) - start
    if wall <= 0:
        raise MeasurementInvalid("a load repetition took no time")
    rows: list[dict[str, float]] = []
    gaps: list[float] = []
    for r in results:
        if not r.token_times:
            raise MeasurementInvalid("a request produced no tokens")
        t = r.timings
        steps = max(int(t["predicted_n"]) - 1, 0)
        predicted_ms, prompt_ms = float(t["predicted_ms"]), float(t.get("prompt_ms") or 0.0)
        span = r.token_times[-1] - r.token_times[0]
        gaps += [(b - a) * 1000 for a, b in zip(r.token_times, r.token_times[1:])]
        rows.append({
            "sent_s": r.sent_at - start,
            "ttft_ms": (r.token_times[0] - r.sent_at) * 1000,
            "e2e_ms": (r.finished_at - r.sent_at) * 1000,
            "itl_ms": span / (r.client_tokens - 1) * 1000 if r.client_tokens > 1 else 0.0,
            "gen_tok_s": steps / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
            "client_gen_tok_s": (r.client_tokens - 1) / span if span > 0 else 0.0,
            "prompt_tok_s": int(t.get("prompt_n", 0)) / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
            "predicted_n": float(t["predicted_n"]), "prompt_n": float(t.get("prompt_n", 0)),
            "cache_n": float(t.get("cache_n", 0)),
        })  # fmt: skip
    gaps = gaps or [0.0]

    def col(name: str) -> list[float]:
        return [row[name] for row in rows]

    good = sum(level.slo.met(row["ttft_ms"], row["itl_ms"], row["e2e_ms"]) for row in rows) if level.slo.given else None
    generated = sum(col("predicted_n"))
    return LoadSample(
        gen_tok_s=statistics.median(col("gen_tok_s")),
        prompt_tok_s=statistics.median(col("prompt_tok_s")),
        client_gen_tok_s=statistics.median(col("client_gen_tok_s")),
        ttft_ms=statistics.median(col("ttft_ms")),
        e2e_ms=statistics.median(col("e2e_ms")),
        itl_p50_ms=percentile(gaps, 50),
        itl_p90_ms=percentile(gaps, 90),
        itl_p99_ms=percentile(gaps, 99),
        predicted_n=int(generated),
        prompt_n=int(sum(col("prompt_n"))),
        cache_n=int(sum(col("cache_n"))),
        agg_tok_s=generated / wall,
        req_s=len(rows) / wall,
        ttft_p99_ms=percentile(col("ttft_ms"), 99),
        e2e_p99_ms=percentile(col("e2e_ms"), 99),
        goodput_req_s=good / wall if good is not None else None,
        goodput_pct=good / len(rows) * 100 if good is not None else None,
        slots_busy_max=float(max(slots)) if slots else None,
        slots_busy_mean=statistics.fmean(slots) if slots else None,
        gen_overlap_max=float(overlap_max([(r.token_times[0], r.token_times[-1]) for r in results])),
        requests=rows,
    )


def overlap_max(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (a request generating, from its first token to its last)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


__all__ = ["LoadSample", "METRICS", "arrivals", "endpoint", "overlap_max", "run_once", "summarize"]
