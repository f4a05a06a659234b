"""Shared fixtures: the real llama-server binary and small matrices on the embedded model."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_llamabench.server.build import BuildSpec, resolve_server_bin
from pytest_llamabench.model.files import embedded_model_path

pytest_plugins = ["pytester"]

#: Workloads small enough that a plugin test with a real server takes seconds.
TINY_WORKLOADS = """
[workloads.short]
prompt_tokens = 16
n_predict = 8
repetitions = 2
warmup = 0

[workloads.chat]
kind = "chat"
turns = 3
prompt_tokens = 16
n_predict = 8
repetitions = 1
warmup = 0
"""


@pytest.fixture(scope="session")
def server_bin() -> Path:
    """The llama-server the project resolves (env, PATH, cache; built once if missing)."""
    path, _ = resolve_server_bin(
        [(os.environ.get("LLAMABENCH_SERVER_BIN"), "LLAMABENCH_SERVER_BIN")],
        spec=BuildSpec(),
        build_if_missing=True,
        log=print,
    )
    return path


@pytest.fixture(scope="session")
def model_path() -> Path:
    return embedded_model_path("smollm2-135m-instruct-q4_1")


@pytest.fixture
def write_matrix(tmp_path: Path, model_path: Path) -> Callable[..., Path]:
    """Write a matrix file: the embedded model, tiny workloads, and the given configs."""

    def write(configs: str, *, model: str | None = None, workloads: str = TINY_WORKLOADS, name: str = "matrix.toml") -> Path:
        model_line = model or f'path = "{model_path}"'
        text = textwrap.dedent(
            f"""
            [models.m]
            {model_line}

            [defaults]
            model = "m"
            threads = 2
            ctx = 1024
            """
        )
        path = tmp_path / name
        path.write_text(text + textwrap.dedent(workloads) + textwrap.dedent(configs))
        return path

    return write


@pytest.fixture
def bench_args(server_bin: Path, tmp_path: Path) -> Callable[[Path], list[str]]:
    """Command-line args for an inner pytest run on ``matrix``."""

    def args(matrix: Path) -> list[str]:
        return [
            f"--llamabench-matrix={matrix}",
            f"--llamabench-server-bin={server_bin}",
            f"--llamabench-json={tmp_path / 'report.json'}",
            f"--llamabench-log-dir={tmp_path / 'logs'}",
            # these tests check the pipeline, not the machine: a busy CI host must not turn their
            # measurements into "busy, not ranked" (busy detection has tests of its own)
            "--llamabench-busy-cores=2",
            # the HTML page and its charts (matplotlib, seconds per run) only where a test asks for them
            "--llamabench-html=off",
            "-p", "no:cacheprovider",
            "-p", "no:randomly",
        ]

    return args


MATRIX_TEST = '''
from pytest_llamabench.config import Workload

def test_workload(llama_server, llama_workload, llamabench):
    llamabench(llama_server, llama_workload)
'''
