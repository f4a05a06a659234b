"""``kind = "completion"``: one streamed /completion request per repetition."""

from __future__ import annotations

from typing import Any

from pytest_llamabench.config import Workload
from pytest_llamabench.errors import StreamDroppedEarly
from pytest_llamabench.measure.sample import Prompts, Sample, aggregate, check, check_stream_count, request_of, where
from pytest_llamabench.server.client import StreamResult
from pytest_llamabench.server.launcher import Server


def run_once(server: Server, workload: Workload, prompts: Prompts, index: int) -> Sample:
    prompt = prompts.slice(index * 7919, workload.prompt_tokens)
    payload = {"prompt": prompt, "n_predict": workload.n_predict, "max_tokens": workload.n_predict,
               "ignore_eos": True, "cache_prompt": False, "temperature": 0.0, "seed": 42}  # fmt: skip
    result = _stream(server, prompts, payload)
    timings = result.timings
    at = where(server, workload)
    check(timings.get("predicted_n") == workload.n_predict, at,
          f"generated {timings.get('predicted_n')} tokens, asked for {workload.n_predict}")  # fmt: skip
    check_stream_count(result, int(timings.get("predicted_n", -1)), at, exact=prompts.endpoint == "/completion")
    check(timings.get("cache_n") == 0, at,
          f"the prompt cache was reused (cache_n={timings.get('cache_n')}) although cache_prompt=false")  # fmt: skip
    check(timings.get("prompt_n") == workload.prompt_tokens, at,
          f"the server evaluated {timings.get('prompt_n')} prompt tokens, asked for {workload.prompt_tokens}")  # fmt: skip
    return aggregate([request_of(result)])


def endpoint(prompts: Prompts) -> str:
    return prompts.endpoint


def _stream(server: Server, prompts: Prompts, payload: dict[str, Any]) -> StreamResult:
    """Native /completion stream; if it drops before its first event while the server lives
    (seen with a CUDA build on an H100: headers never sent), use /v1/completions from then on."""
    if prompts.endpoint == "/completion":
        try:
            return server.client.stream_completion(payload)
        except StreamDroppedEarly:
            server.ensure_alive()
            prompts.endpoint = "/v1/completions"
    return server.client.stream_oai_completion(payload)
