"""Chat templates: a config's ``chat_template`` as llama-server flags, and what a template can do.

``chat_template = "gguf"`` (default) keeps the template stored in the model
(``tokenizer.chat_template``); ``"file:PATH"`` loads a Jinja file (``--jinja
--chat-template-file``, PATH relative to the matrix file); any other value is one of
llama.cpp's built-in template names (``--chat-template NAME``, e.g. ``chatml``).

Thinking: a model can only think on request if its template reacts to ``enable_thinking``
or emits a reasoning block (``<think>``); ``thinking = "on"`` on a model whose template has
neither is one clear error instead of a silent no-op.
"""

from __future__ import annotations

import re
from pathlib import Path

GGUF = "gguf"
FILE_PREFIX = "file:"
#: What marks a template that can think: the kwarg it reads or the tags it writes.
_REASONING = re.compile(r"enable_thinking|reasoning_content|<think>|<\|think\|>|thinking", re.I)


def chat_template_args(value: str) -> list[str]:
    """llama-server flags for a config's ``chat_template`` (already resolved: ``file:`` absolute)."""
    if value == GGUF:
        return []
    if value.startswith(FILE_PREFIX):
        return ["--jinja", "--chat-template-file", value[len(FILE_PREFIX) :]]
    return ["--chat-template", value]


def resolve_chat_template(value: str, base_dir: Path, where: str) -> str:
    """``file:PATH`` made absolute and checked to exist; other values unchanged."""
    from pytest_llamabench.errors import ConfigError

    if not value.strip():
        raise ConfigError(f"{where}: empty; use \"gguf\", \"file:PATH\" or a llama.cpp built-in template name")
    if not value.startswith(FILE_PREFIX):
        return value
    path = base_dir / Path(value[len(FILE_PREFIX) :]).expanduser()
    if not path.is_file():
        raise ConfigError(f"{where}: chat template file not found: {path}; fix the path (relative to the matrix file)")
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: chat template file {path} is not readable UTF-8 text ({exc}); fix the file") from None
    return f"{FILE_PREFIX}{path.resolve()}"


def template_text(chat_template: str, gguf_template: str | None) -> str | None:
    """The Jinja source the server will use, when it is known here (a file, or the GGUF's)."""
    if chat_template == GGUF:
        return gguf_template
    if chat_template.startswith(FILE_PREFIX):
        return Path(chat_template[len(FILE_PREFIX) :]).read_text(encoding="utf-8")
    return None  # a built-in: only the server knows its text


def can_think(template: str | None) -> bool | None:
    """True when the template has a thinking switch or block, False when it has none, None: unknown."""
    if template is None:
        return None
    return bool(_REASONING.search(template))


__all__ = ["FILE_PREFIX", "GGUF", "can_think", "chat_template_args", "resolve_chat_template", "template_text"]
