"""What chat kinds (chat, vision, template) add to a request: thinking and sampling; and what
they read back: reasoning vs answer tokens, and the sampling the server actually used.

- ``thinking = "on"|"off"`` → ``chat_template_kwargs.enable_thinking`` and
  ``reasoning_format = "deepseek"`` (thoughts come back in ``reasoning_content``);
  ``reasoning_budget`` → ``reasoning_budget_tokens``. ``thinking = "on"`` on a model whose
  chat template (the one the server uses: ``/props`` ``chat_template``) has no thinking switch
  or block is a ``ConfigError``, not a silent no-op.
- Sampling keys go as they are; unset, requests are greedy (``temperature = 0``, seed 42).
- Every streamed delta counts as a token, reasoning or answer, so the client's tok/s and
  TTFT cover the thinking too; ``reasoning_tokens``/``answer_tokens`` split them.
- After the run, ``GET /slots`` gives the parameters of the slot's last task: what the server
  used, recorded in the report (``details.sampling``).
"""

from __future__ import annotations

from typing import Any

from pytest_llamabench.config import Workload
from pytest_llamabench.errors import ConfigError, RequestFailed
from pytest_llamabench.model.template import can_think
from pytest_llamabench.server.launcher import Server

#: What /slots reports of a task's parameters that the report keeps.
USED_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
             "frequency_penalty", "seed", "n_predict", "ignore_eos", "samplers", "chat_format", "reasoning_format",
             "reasoning_in_content", "dry_multiplier", "typical_p", "mirostat")  # fmt: skip


def request_options(server: Server, workload: Workload) -> dict[str, Any]:
    """Sampling and thinking fields for a chat request of ``workload``."""
    check_thinking(server, workload)
    options: dict[str, Any] = {"temperature": 0.0, "seed": 42, **workload.sampling}
    if workload.thinking is not None:
        options["chat_template_kwargs"] = {"enable_thinking": workload.thinking == "on"}
        options["reasoning_format"] = "deepseek"
    if workload.reasoning_budget is not None:
        options["reasoning_budget_tokens"] = workload.reasoning_budget
    return options


def check_thinking(server: Server, workload: Workload) -> None:
    if workload.thinking != "on":
        return
    template = server.props.get("chat_template")
    if can_think(template if isinstance(template, str) else None) is False:
        model = server.model_info.path.name if server.model_info else "the model"
        source = "the GGUF's" if server.config.chat_template == "gguf" else f"chat_template = {server.config.chat_template!r}'s"
        raise ConfigError(
            f"{workload.source}.thinking: \"on\", but {source} chat template of {model} (config "
            f"{server.config.name}) has no thinking switch (enable_thinking) or <think> block, so the model "
            "cannot think on request; remove thinking (or set \"off\"), or give the config a chat_template "
            "with reasoning (e.g. the model's official template as file:...)"
        )


class TokenSplit:
    """A stream counter: one token per delta of ``content`` or ``reasoning_content``."""

    def __init__(self) -> None:
        self.reasoning = 0
        self.answer = 0

    def __call__(self, event: dict[str, Any]) -> tuple[int, str]:
        choices = event.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        if delta.get("reasoning_content"):
            self.reasoning += 1
            return 1, ""
        content = delta.get("content")
        if content:
            self.answer += 1
            return 1, str(content)
        return 0, ""


def used_sampling(server: Server) -> dict[str, Any]:
    """The parameters of the last task on the server's slot, as ``/slots`` reports them."""
    try:
        slots = server.client.slots()
    except RequestFailed as exc:  # --no-slots: say so in the report instead of failing the run
        return {"unavailable": str(exc)[:200]}
    params = next((s.get("params") for s in slots if isinstance(s.get("params"), dict)), None)
    if not isinstance(params, dict):
        return {"unavailable": "no slot has run a task"}
    return {k: params[k] for k in USED_KEYS if k in params}


__all__ = ["TokenSplit", "check_thinking", "request_options", "used_sampling"]
