"""``kind = "template"``: is the config's chat template the GGUF's, as the server renders them?

Once per server, the same conversation (system, user, assistant, user; with a generation
prompt) is rendered through ``POST /apply-template`` twice: by the config's server (its
``chat_template``: a file, a built-in name, or the GGUF's) and by a reference server of the same
binary and model that uses the GGUF's own template (started for a moment on the CPU with a small
context, memory-mapped, no warm-up, then stopped). The report's ``details.template_check`` says
whether the two prompts match and holds their unified diff. A difference is reported, not failed:
an explicit template is often a deliberate fix. Each repetition then measures one chat turn
through the config's template, like ``kind = "chat"`` with one turn.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import weakref
from typing import Any

from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.errors import ConfigError, LlamabenchError
from pytest_llamabench.measure import chat
from pytest_llamabench.measure.sample import Prompts, Sample
from pytest_llamabench.server.launcher import LocalServer, Server

METRICS = chat.METRICS
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word."},
]
_CHECKS: weakref.WeakKeyDictionary[Server, dict[str, Any]] = weakref.WeakKeyDictionary()  # once per server
_DIFF_LINES = 80


def run_once(server: Server, workload: Workload, prompts: Prompts, index: int) -> Sample:
    template_check(server)
    return chat.run_once(server, dataclasses.replace(workload, turns=1), prompts, index)


def endpoint(prompts: Prompts) -> str:
    return "/v1/chat/completions"


def facts(server: Server, workload: Workload) -> dict[str, Any]:
    return {**chat.facts(server, workload), "template_check": template_check(server)}


def template_check(server: Server) -> dict[str, Any]:
    if server not in _CHECKS:
        _CHECKS[server] = compare_templates(server)
    return _CHECKS[server]


def compare_templates(server: Server) -> dict[str, Any]:
    """Render CONVERSATION with the server's template and with the GGUF's; match and diff."""
    config = server.config
    explicit = server.client.apply_template(CONVERSATION)
    if config.chat_template == "gguf":
        gguf = explicit
    else:
        gguf = _render_with_gguf_template(server)
    diff = list(difflib.unified_diff(gguf.splitlines(), explicit.splitlines(), "gguf", config.chat_template,
                                     lineterm=""))  # fmt: skip
    return {
        "template": config.chat_template,
        "match": gguf == explicit,
        "gguf_sha256": _sha(gguf),
        "rendered_sha256": _sha(explicit),
        "diff": "\n".join(diff[:_DIFF_LINES]) + ("\n…" if len(diff) > _DIFF_LINES else ""),
        "conversation_messages": len(CONVERSATION),
    }


def _render_with_gguf_template(server: Server) -> str:
    if not isinstance(server, LocalServer):
        raise ConfigError(
            f"{server.config.source}: the template check starts a reference server with the GGUF's template, "
            "which needs a local llama-server (not a container image); run it on a local config"
        )
    reference = LocalServer(_reference_config(server.config), binary=server.binary,
                            log_dir=server.log_path.parent, api_key=server.api_key)  # fmt: skip
    try:
        with reference:
            return reference.client.apply_template(CONVERSATION)
    except LlamabenchError as exc:
        raise type(exc)(f"{server.config.name}: the reference server with the GGUF's chat template failed: "
                        f"{exc.message}", log_tail=exc.log_tail) from None  # fmt: skip


def _reference_config(config: ServerConfig) -> ServerConfig:
    """The same model with its own template, as cheap as a server gets: CPU, small context, mmap."""
    server: dict[str, Any] = {"ctx": 512, "parallel": 1, "fit": "off", "n_gpu_layers": 0, "load_mode": "mmap"}
    if "threads" in config.server:
        server["threads"] = config.server["threads"]
    return dataclasses.replace(
        config, name=f"{config.name}-gguf-template", server=server, override_tensor=(), chat_template="gguf",
        args=("--no-warmup",), gpu=False, image=None, restarts=1, start=0,
        model=dataclasses.replace(config.model, mmproj=None),
    )  # fmt: skip


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
