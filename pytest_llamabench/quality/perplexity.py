"""One run of llama-perplexity with a config's flags: plain, saving the reference logits
(``--kl-divergence-base FILE``), or against them (``--kl-divergence``).

The process gets its own session and log file, is killed with its group on any exit (Ctrl-C
included), and sees the same environment as the config's llama-server would (``LLAMA_ARG_*``
stripped, the session's GPUs)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from pytest_llamabench.config import SERVER_FLAGS, ServerConfig
from pytest_llamabench.hardware.device import Device
from pytest_llamabench.quality.output import PerplexityOutput, Problem, parse, problem

#: The config's server keys that mean the same to llama-perplexity. Not ``ctx`` (there -c is the
#: chunk size, the workload's ``ctx``) nor ``parallel`` (it runs batch/ctx sequences itself), nor
#: raw ``args`` (server flags such as --host or --api-key that llama-perplexity refuses).
PERPLEXITY_KEYS = ("threads", "threads_batch", "n_gpu_layers", "n_cpu_moe", "fit", "flash_attn",
                   "cache_type_k", "cache_type_v", "batch", "ubatch", "load_mode")  # fmt: skip


def config_flags(config: ServerConfig) -> list[str]:
    """The config's offload, thread, batch and KV-cache flags, as llama-perplexity takes them."""
    argv: list[str] = []
    for key in PERPLEXITY_KEYS:
        if key in config.server:
            argv += [SERVER_FLAGS[key], str(config.server[key])]
    for pattern in config.override_tensor:
        argv += ["--override-tensor", pattern]
    return argv


@dataclasses.dataclass(frozen=True)
class Mode:
    """``plain``; ``base`` (save logits to ``logits``); ``kld`` (score against ``logits``)."""

    name: str
    logits: Path | None = None

    def argv(self) -> list[str]:
        if self.name == "base":
            return ["--kl-divergence-base", str(self.logits)]
        if self.name == "kld":
            return ["--kl-divergence-base", str(self.logits), "--kl-divergence"]
        return []


@dataclasses.dataclass
class Run:
    """A finished run: what it printed, parsed, and what it cost."""

    argv: list[str]
    log: Path
    returncode: int
    seconds: float
    output: PerplexityOutput | None
    problem: Problem | None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").rstrip().splitlines()[-lines:])
        except OSError:
            return ""


def perplexity_argv(binary: Path, model: Path, corpus: Path, config: ServerConfig, *, ctx: int,
                    chunks: int | None, mode: Mode) -> list[str]:  # fmt: skip
    argv = [str(binary), "--model", str(model), "--file", str(corpus), "--ctx-size", str(ctx)]
    if chunks is not None:
        argv += ["--chunks", str(chunks)]
    return argv + config_flags(config) + mode.argv()


def run_perplexity(argv: Sequence[str], log: Path, *, env: dict[str, str], kld: bool) -> Run:
    """Run to completion, then parse; the process group never outlives this call."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # fmt: skip
        try:
            returncode = proc.wait()
        finally:
            _kill_group(proc)
    text = log.read_text(errors="replace")
    return Run(list(argv), log, returncode, time.monotonic() - started, parse(text, kld=kld), problem(text))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its session
        return
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def environment(config: ServerConfig, devices: Sequence[Device] | None) -> dict[str, str]:
    """What the config's llama-server would see, without an API key (llama-perplexity serves nothing)."""
    from pytest_llamabench.server.launcher import server_environment

    return server_environment(config.env, None, devices)


__all__ = ["Mode", "PERPLEXITY_KEYS", "Run", "config_flags", "environment", "perplexity_argv", "run_perplexity"]
