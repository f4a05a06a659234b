"""Sweeps expand into ordinary named configs; searches are validated; bad input is one clear error each."""

from __future__ import annotations

from pathlib import Path

import pytest


from tests.matrices import config_error as error
from tests.matrices import load_text as load


def test_sweep_expands_into_named_configs_with_per_point_expected_oom(tmp_path: Path) -> None:
    matrix = load(tmp_path, """
[configs.C2]
gpu = true
n_gpu_layers = 99
sweep = { n_cpu_moe = [16, 24, 32] }
expect_oom = [16]
thresholds = { min_gen_tok_s = 30 }
description = "Q8_0 sweep"
""")  # fmt: skip
    assert list(matrix.configs) == ["C2-ncm16", "C2-ncm24", "C2-ncm32"]
    c16, c24 = matrix.configs["C2-ncm16"], matrix.configs["C2-ncm24"]
    assert c16.expect == "oom" and c24.expect is None
    assert c24.server["n_cpu_moe"] == 24 and c24.server["n_gpu_layers"] == 99
    assert c24.thresholds_for("short").limits == {"min_gen_tok_s": 30.0}
    assert c24.sweep is not None and c24.sweep.sweep == "C2" and dict(c24.sweep.values) == {"n_cpu_moe": 24}
    args = c24.server_args()
    assert args[args.index("--n-cpu-moe") + 1] == "24"


def test_sweep_of_several_keys_is_their_product_and_a_config_can_extend_a_swept_one(tmp_path: Path) -> None:
    matrix = load(tmp_path, """
[configs.base]
threads = 2
sweep = { ctx = [1024, 2048], cache_type = ["f16", "q8_0"] }
expect_oom = ["ctx2048-kvq8_0"]
[configs.child]
extends = "base"
ubatch = 64
""")  # fmt: skip
    assert list(matrix.configs) == ["base-ctx1024-kvf16", "base-ctx1024-kvq8_0", "base-ctx2048-kvf16",
                                    "base-ctx2048-kvq8_0", "child"]  # fmt: skip
    point = matrix.configs["base-ctx1024-kvq8_0"]
    assert point.server["cache_type_k"] == point.server["cache_type_v"] == "q8_0"
    assert matrix.configs["base-ctx2048-kvq8_0"].expect == "oom"
    child = matrix.configs["child"]  # extends the table: inherits threads, not the sweep
    assert child.sweep is None and child.server["threads"] == 2 and child.server["ubatch"] == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sweep = { n_ctx = [1, 2] }", "configs.C.sweep.n_ctx: cannot sweep 'n_ctx'; sweepable keys: n_cpu_moe"),
        ("sweep = { ctx = [] }", "configs.C.sweep.ctx: expected a non-empty list of values"),
        ("sweep = {}", "configs.C.sweep: expected a table of key = [values]"),
        ("sweep = { ctx = [1024, 1024] }", "listed twice"),
        ("ubatch = 64\nsweep = { ubatch = [32, 64] }", "configs.C.ubatch: also swept in "),
        ("sweep = { ctx = [1024] }\nexpect_oom = [4096]", "configs.C.expect_oom: 4096 is not a point of the sweep; points: ctx1024"),
        ("expect_oom = [16]", "configs.C.expect_oom: only a config with a sweep has points"),
        ("sweep = { ctx = ['x'] }", "configs.C.ctx: expected int or dict, got str 'x'"),
        ("search = { n_cpu_moe = 'fastest-that-fits' }", "searching n_cpu_moe needs gpu = true"),
        ("gpu = true\nsearch = { n_cpu_moe = 'fastest' }", "'fastest' is not a goal for n_cpu_moe; use 'fastest-that-fits'"),
        ("search = { threads = 'fastest-that-fits' }", "cannot search 'threads'; searchable keys"),
        ("search = { ctx = 'largest-that-fits' }", "the kernel's OOM killer would pick any process"),
        ("memory_limit = '1GiB'\nsearch = { ctx = 'largest-that-fits' }", "searching ctx needs min and max"),
        ("memory_limit = '1GiB'\nsearch = { ctx = 'largest-that-fits', min = 10, max = 5 }", "min (10) must be below max (5)"),
        ("search = { ctx = 'largest-that-fits', n_cpu_moe = 'fastest-that-fits' }", "name exactly one key"),
        ("sweep = { ctx = [1024] }\nsearch = { ctx = 'largest-that-fits', min = 1, max = 9 }", "a sweep or a search, not both"),
    ],
)
def test_bad_sweeps_and_searches_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    assert message in error(tmp_path, f"[configs.C]\n{text}\n")


def test_a_sweep_point_may_not_shadow_a_hand_written_config(tmp_path: Path) -> None:
    assert "configs.C-ctx1024: also a point of the sweep in " in error(
        tmp_path, "[configs.C]\nsweep = { ctx = [1024] }\n[configs.C-ctx1024]\nthreads = 1\n"
    )


def test_a_search_config_is_validated_and_keeps_its_spec(tmp_path: Path) -> None:
    matrix = load(tmp_path, """
[configs.S]
gpu = true
n_gpu_layers = 99
search = { n_cpu_moe = "fastest-that-fits", neighbours = 1 }
[configs.H]
memory_limit = "1GiB"
search = { ctx = "largest-that-fits", min = 1024, max = 65536, step = 1024 }
""")  # fmt: skip
    spec = matrix.configs["S"].search
    assert (spec.key, spec.goal, spec.neighbours, spec.compare_fit, spec.memory_direction) == (
        "n_cpu_moe", "fastest-that-fits", 1, True, -1)
    host = matrix.configs["H"].search
    assert (host.low, host.high, host.step, host.compare_fit) == (1024, 65536, 1024, False)
