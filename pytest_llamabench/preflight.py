"""Before a long matrix: does the llama-server build know every selected model's architecture?

Each launch checks its own model again (``server.arch``); this reads every local config's
``general.architecture`` at session start, so a model the build cannot load is named before the
first server of a two-hour matrix starts, not when its turn comes. Nothing is built here: with no
llama-server found yet, the launches check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_llamabench.config import ServerConfig
from pytest_llamabench.errors import LlamabenchError, UnsupportedArchitecture
from pytest_llamabench.model.files import verify_model
from pytest_llamabench.server.arch import check_architecture


def architecture_problems(configs: Sequence[ServerConfig], binary: Callable[[], Path | None]) -> list[str]:
    """One line per config whose model's architecture the build lacks (``binary()``: the local
    llama-server if it is already there, else None)."""
    local = [c for c in configs if not c.image]
    path = binary() if local else None
    if path is None:
        return []
    problems: list[str] = []
    seen: dict[Path, str | None] = {}
    for config in local:
        try:
            model = config.model.resolve()
        except LlamabenchError:
            continue  # the launch says why
        if model not in seen:
            seen[model] = None
            where = f"{config.source} (model)"
            try:
                info = verify_model(model, where=where, hash_file=False)
                check_architecture(path, info.architecture, model=model, where=where)
            except UnsupportedArchitecture as exc:
                seen[model] = exc.message
            except LlamabenchError:
                pass  # a missing or broken file: the launch says so, with its own error
        if seen[model]:
            problems.append(f"config {config.name} will fail: {seen[model]}")
    return problems


__all__ = ["architecture_problems"]
