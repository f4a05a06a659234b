"""``kind = "perplexity"`` in the kinds table (measure/kinds.py): a quality workload runs
llama-perplexity before its config's server starts (quality/run.py, plugin/quality.py), never
through a running server, so it has no ``run_once``."""

from __future__ import annotations

from typing import Any, NoReturn

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.outputs.kinds import QUALITY_ENDPOINT


def run_once(server: Any, workload: Any, prompts: Any, index: int) -> NoReturn:
    raise ConfigError(
        f"{getattr(workload, 'source', '')}: workload {getattr(workload, 'name', '?')!r} is a quality workload "
        '(kind = "perplexity"): it runs llama-perplexity without a server; run it through the llamabench '
        "fixture (llamabench(llama_server, llama_workload)), not against a running server"
    )


def endpoint(prompts: Any) -> str:
    return QUALITY_ENDPOINT
