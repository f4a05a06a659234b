"""The workload kinds, chosen from a table: a new kind is one new module and one line here.

A kind module has ``run_once(server, workload, prompts, index) -> Sample`` (one repetition,
checked) and ``endpoint(prompts) -> str`` (the endpoint its results came from); see
``measure.workload.WorkloadKind``. This table imports nothing, so the config loader can
validate ``kind = ...`` against it.
"""

from __future__ import annotations

KINDS: dict[str, str] = {
    "completion": "pytest_llamabench.measure.completion",
    "chat": "pytest_llamabench.measure.chat",
    "vision": "pytest_llamabench.measure.vision",
    "template": "pytest_llamabench.measure.template_check",
    "load": "pytest_llamabench.measure.load",
    "perplexity": "pytest_llamabench.quality.workload",  # runs llama-perplexity, no server (quality/)
}
