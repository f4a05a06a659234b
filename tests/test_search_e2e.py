"""Sweeps, the memory plan and the auto-fit search end to end, with real llama-servers on the
embedded model: sweep points run as ordinary configs with the plan beside the measurement, and a
ctx search finds the real out-of-memory edge of a container's memory limit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from pytest_llamabench.results import SCHEMA_PATH
from pytest_llamabench.server.image import DEFAULT_TAG

from .conftest import MATRIX_TEST
from .test_container import client, image_id  # noqa: F401 - fixtures

Args = Callable[[Path], list[str]]
Write = Callable[..., Path]

TINY = """
[workloads.w]
prompt_tokens = 16
n_predict = 8
repetitions = 2
warmup = 0
"""
SEARCH_TEST = '''
def test_search(llama_search):
    llama_search()
'''


def plan_table(*args: object) -> str:
    script = Path(__file__).resolve().parent.parent / "scripts" / "plan_table.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def report(tmp_path: Path) -> dict[str, Any]:
    """The inner run's report, checked against the documented schema."""
    data: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))
    return data


def test_sweep_points_are_configs_with_the_plan_beside_what_the_server_reported(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    pytester.makepyfile(MATRIX_TEST)
    matrix = write_matrix('[configs.s]\nload_mode = "none"\nsweep = { ctx = [1024, 4096] }\n', workloads=TINY)
    result = pytester.runpytest_subprocess(*bench_args(matrix), "-s", timeout=300)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*s-ctx1024: needs * of host memory (all on the CPU)*",
                                 "*s-ctx4096: needs * of host memory (all on the CPU)*"])  # fmt: skip
    entries = {e["config"]: e for e in report(tmp_path)["results"]}
    assert set(entries) == {"s-ctx1024", "s-ctx4096"}
    small, big = entries["s-ctx1024"]["memory"], entries["s-ctx4096"]["memory"]
    for memory in (small, big):
        rows = memory["compare"]
        assert rows["host.kv"]["reported_mib"] and abs(rows["host.kv"]["error_pct"]) < 1  # KV: exact
        assert abs(rows["host.weights"]["error_pct"]) < 5, rows  # the model buffer, from the tensor table
        assert rows["host.total"]["measured_mib"] and abs(rows["host.total"]["error_pct"]) < 35, rows
        roof = memory["roofline"]
        assert roof["gpu_mb_per_token"] == 0 and roof["host_mb_per_token"] > 50 and roof["percent_of_ceiling"] > 0
    assert big["compare"]["host.kv"]["reported_mib"] == pytest.approx(4 * small["compare"]["host.kv"]["reported_mib"])
    table = plan_table(tmp_path / "report.json")  # the docs/ table of scripts/plan_table.py
    assert "| s-ctx1024 | — |  | — | — | — |" in table and "| passed |" in table


@pytest.fixture
def boxed(client: Any, image_id: str) -> str:  # noqa: F811 - fixtures from test_container
    return f'image = "{DEFAULT_TAG}"\nload_mode = "none"\n'


def test_a_ctx_search_finds_the_real_oom_edge_of_a_container(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, boxed: str,
    client: Any,  # noqa: F811 - fixture from test_container
) -> None:
    pytester.makepyfile(SEARCH_TEST)
    search = 'search = { ctx = "largest-that-fits", min = 4096, max = 262144, step = 4096 }'
    matrix = write_matrix(f'[configs.S]\n{boxed}memory_limit = "512MiB"\n{search}\n', workloads=TINY)
    result = pytester.runpytest_subprocess(*bench_args(matrix), "-s", timeout=600)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*llamabench searches*", "S: largest-that-fits over ctx: * probe(s), edge ctx = *"])
    (entry,) = report(tmp_path)["results"]
    data = entry["search"]
    outcomes = {p["value"]: p for p in data["probes"]}
    edge = data["edge"]
    assert data["chosen"] == edge and outcomes[edge]["outcome"] == "fits"
    assert outcomes[edge + 4096]["outcome"] == "oom"  # the real edge: the next step ran out of memory
    failure = outcomes[edge + 4096]["failure"]
    assert failure["device"] == "host" and "memory limit" in failure["message"]
    assert outcomes[edge]["rss_mib"] and outcomes[edge]["predicted_host_mib"]
    assert data["launches"] == len(data["probes"]) <= 10 and data["wall_s"] > 0
    assert [c["value"] for c in data["curve"]] == sorted(outcomes)
    assert f"| {edge} | fits |" in plan_table("--search", tmp_path / "report.json")
    probes = {p["config"] for p in data["probes"]}
    assert not [c.name for c in client.containers.list(all=True) if any(f"-{p}-" in c.name for p in probes)]


def test_a_search_where_nothing_fits_is_one_clear_failure(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, boxed: str
) -> None:
    pytester.makepyfile(SEARCH_TEST)
    search = 'search = { ctx = "largest-that-fits", min = 4096, max = 16384, step = 4096 }'
    matrix = write_matrix(f'[configs.S]\n{boxed}memory_limit = "64MiB"\n{search}\n', workloads=TINY)
    result = pytester.runpytest_subprocess(*bench_args(matrix), timeout=300)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*search-nothing-fits: S: nothing fits: even ctx = 4096 (the least memory in the "
                                 "range) ran out of memory*container memory_limit 64 MiB*"])  # fmt: skip
    assert "Traceback" not in result.stdout.str()
    (entry,) = report(tmp_path)["results"]
    assert entry["outcome"] == "failed" and entry["failure"]["kind"] == "search-nothing-fits"
    assert {p["outcome"] for p in entry["search"]["probes"]} == {"oom"}


def test_without_a_search_config_test_search_is_deselected_not_skipped(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args
) -> None:
    pytester.makepyfile(SEARCH_TEST)
    result = pytester.runpytest_subprocess(*bench_args(write_matrix("[configs.plain]\n", workloads=TINY)))
    result.assert_outcomes(deselected=1)
