"""The benchmark matrix: every selected config x workload of the loaded matrix file(s).

``llama_server`` is one real llama-server per config (session-scoped, shared by
that config's workloads); ``llamabench`` measures the workload, records it in
the JSON report (and pytest-benchmark, when active) and checks thresholds.
"""

from __future__ import annotations

from typing import Any

from pytest_llamabench.config import Workload


def test_workload(llama_server: Any, llama_workload: Workload, llamabench: Any) -> None:
    result = llamabench(llama_server, llama_workload)
    if llama_workload.kind != "perplexity":  # quant quality: llama-perplexity's figures, no repetitions
        assert result.samples("gen_tok_s"), "no repetitions were measured"
