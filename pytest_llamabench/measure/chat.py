"""``kind = "chat"``: one conversation of ``turns`` turns per repetition; the history is resent
through /v1/chat/completions and the prompt cache reused (checked from the second turn on).

Thinking and sampling (``thinking``, ``temperature``, ...) as in ``measure.chat_options``:
reasoning and answer tokens are counted apart (``reasoning_tokens``, ``answer_tokens``), both
count for tok/s, and the sampling the server used is recorded."""

from __future__ import annotations

import dataclasses
from typing import Any

from pytest_llamabench.config import Workload
from pytest_llamabench.measure.chat_options import TokenSplit, request_options, used_sampling
from pytest_llamabench.measure.sample import Prompts, Request, Sample, aggregate, check, request_of, where
from pytest_llamabench.metrics import ANSWER_TOKENS, REASONING_TOKENS, SAMPLE_METRICS
from pytest_llamabench.server.launcher import Server

METRICS = (*SAMPLE_METRICS, REASONING_TOKENS, ANSWER_TOKENS)


@dataclasses.dataclass
class ChatSample(Sample):
    reasoning_tokens: float | None = None
    answer_tokens: float | None = None


def run_once(server: Server, workload: Workload, prompts: Prompts, index: int) -> Sample:
    at = where(server, workload)
    messages: list[dict[str, str]] = []
    turns: list[Request] = []
    options = request_options(server, workload)
    split = TokenSplit()
    for turn in range(workload.turns):
        user = server.client.detokenize(prompts.slice((index * workload.turns + turn) * 7919, workload.prompt_tokens))
        messages.append({"role": "user", "content": user})
        result = server.client.stream_chat(
            {"messages": messages, "max_tokens": workload.n_predict, "ignore_eos": True, "cache_prompt": True,
             **options}, split  # fmt: skip
        )
        timings = result.timings
        usage = result.final.get("usage") or {}
        check(timings.get("predicted_n") == workload.n_predict, at,
              f"turn {turn + 1} generated {timings.get('predicted_n')} tokens, asked for {workload.n_predict}")  # fmt: skip
        check(usage.get("completion_tokens") == timings.get("predicted_n"), at,
              f"turn {turn + 1}: usage says {usage.get('completion_tokens')} tokens, timings {timings.get('predicted_n')}")  # fmt: skip
        check(result.client_tokens <= workload.n_predict, at,
              f"turn {turn + 1}: the stream carried {result.client_tokens} tokens for {workload.n_predict}")  # fmt: skip
        if turn > 0:
            check(timings.get("cache_n", 0) > 0, at,
                  f"turn {turn + 1} reused no prompt cache: the conversation history was re-evaluated")  # fmt: skip
        messages.append({"role": "assistant", "content": result.text})
        turns.append(request_of(result))
    sample = aggregate(turns)
    return ChatSample(**dataclasses.asdict(sample), reasoning_tokens=split.reasoning, answer_tokens=split.answer)


def facts(server: Server, workload: Workload) -> dict[str, Any]:
    return {"sampling": used_sampling(server), "thinking": workload.thinking, "chat_template": server.config.chat_template}


def endpoint(prompts: Prompts) -> str:
    return "/v1/chat/completions"
