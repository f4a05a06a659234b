"""Quality workloads through the plugin, with the real llama-perplexity and llama-server: run before
their config's server, no server at all for quality-only configs, the quality table in the
terminal, markdown and JSON, thresholds as verdicts, and a NOT RECOMMENDED model never winning."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

ORDER_TEST = """
import os
import time
from pathlib import Path


def _started(pid):
    \"\"\"When a process started, in epoch seconds (10 ms resolution, from /proc).\"\"\"
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def test_workload(llama_server, llama_workload, llamabench):
    entry = llamabench(llama_server, llama_workload)
    if llama_workload.kind == "perplexity" and hasattr(llama_server, "server"):  # a config that also has a server
        finished = Path(entry.extra["quality"]["log"]).stat().st_mtime
        started = min(_started(pid) for pid in llama_server.pids())
        print(f"ORDER {llama_server.config.name}: llama-perplexity finished {started - finished:.2f} s before the server started")
        assert finished < started
"""

WORKLOADS = """
[workloads.quality]
kind = "perplexity"
reference = "m"
ctx = 256
chunks = 2
configs = ["ref", "q2", "mixed"]

[workloads.short]
configs = ["mixed"]
prompt_tokens = 16
n_predict = 8
repetitions = 2
warmup = 0
"""

CONFIGS = """
[models.q2]
quantize = { from = "m", type = "Q2_K" }

[configs.ref]
description = "the reference, quality only"

[configs.q2]
model = "q2"
thresholds = { max_kld_mean = 0.001, min_same_top_p = 99.9 }   # Q2_K cannot meet these

[configs.mixed]
model = "q2"
description = "the Q2_K, quality and speed: llama-perplexity first, then the server; it may not win"
"""


def test_quality_workloads_in_a_run(pytester: pytest.Pytester, write_matrix: Callable[..., Path],
                                    bench_args: Callable[[Path], list[str]], tmp_path: Path) -> None:  # fmt: skip
    matrix = write_matrix(CONFIGS, workloads=WORKLOADS)
    pytester.makepyfile(test_matrix=ORDER_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix), "-v", "-s")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*test_workload?ref-quality? PASSED*",
        "*test_workload?q2-quality? FAILED*",
        "*== llamabench quant quality ==*",
        "Quant*Size*PPL*vs reference*KLD*same top p*Verdict*",
        "ref *baseline*Reference*",
        "q2 *NOT RECOMMENDED (mean KL divergence * > 0.001; same top token *% < 99.9%)*",
        "mixed *+*%*—*",
    ])
    out = result.stdout.str()
    assert "q2/quality: threshold not met: kld_mean median" in out  # the failure says what and where
    # the speed table: mixed passed, but its model is NOT RECOMMENDED, so it is not ranked
    assert any(line.startswith("mixed ") and "quality: NOT RECOMMENDED (q2:" in line for line in out.splitlines())
    # llama-perplexity for "mixed" ran before its server started, and quality-only configs started none
    logs = tmp_path / "logs"
    assert (logs / "mixed.log").is_file()
    assert not (logs / "ref.log").exists() and not (logs / "q2.log").exists()
    assert "ORDER mixed: llama-perplexity finished" in out  # checked inside the run: before the server started
    perplexity_log = (logs / "mixed-quality.log").read_text()
    assert "llama-perplexity" in perplexity_log.splitlines()[0] and "--kl-divergence" in perplexity_log.splitlines()[0]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["config"]: r for r in report["quality"]["rows"]}
    assert rows["ref"]["verdict"] == "Reference" and rows["q2"]["verdict"] == "NOT RECOMMENDED"
    q2 = next(r for r in report["results"] if r["config"] == "q2")
    assert q2["failure"]["kind"] == "threshold" and q2["metrics"]["kld_mean"]["median"] > 0.001
    assert q2["quality"]["reference"]["config"] == "ref" and q2["endpoint"] == "llama-perplexity"
    markdown = (tmp_path / "report.md").read_text()
    assert "| Quant | Size | PPL | vs reference | KLD | same top p | Verdict |" in markdown
