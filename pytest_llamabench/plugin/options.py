"""The plugin's options. Each ``--llamabench-<noun>`` has an ini key ``llamabench_<noun>``
and an env var ``LLAMABENCH_<NOUN>``; precedence: marker > command line > env > ini.
Values are parsed and validated by argparse ``type=`` functions, so a bad value is
a clean usage error that names the flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.config import parse_size
from pytest_llamabench.errors import ConfigError


def _size(value: str) -> int:
    try:
        return parse_size(value, "--llamabench-vram-budget")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tolerance(value: str) -> Any:
    from pytest_llamabench.gate.tolerances import parse_tolerance

    return parse_tolerance(value)


def _shard(value: str) -> Any:
    from pytest_llamabench.shards.spec import Shard

    try:
        return Shard.parse(value, "shard")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("shard: ")) from None


def _number(convert: Callable[[str], float], ok: Callable[[float], bool], problem: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that converts, checks the range, and says what is wrong."""

    def parse(value: str) -> Any:
        try:
            number = convert(value)
        except ValueError:
            number = None
        if number is None or not ok(number):
            raise argparse.ArgumentTypeError(f"{value!r} {problem}")
        return number

    return parse


_alpha = _number(float, lambda a: 0 < a < 1, "is not a significance level; use a number in (0, 1), e.g. 0.05")
_cores = _number(float, lambda c: 0 < c <= 1024, "is not a number of cores; give the CPU cores other processes may use, e.g. 0.2")
_restarts = _number(int, lambda n: n >= 1, "is not a number of restarts; use a whole number >= 1")
_retries = _number(int, lambda n: n >= 0, "is not a number of retries; use a whole number >= 0")
_seconds = _number(float, lambda s: s > 0, "is not a number of seconds; use e.g. 120")


@dataclasses.dataclass(frozen=True)
class Option:
    noun: str
    help: str
    multiple: bool = False  # append on the command line; comma/os.pathsep-separated in env/ini
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    flag: bool = False
    default: Any = None

    @property
    def cli(self) -> str:
        return f"--llamabench-{self.noun}"

    @property
    def dest(self) -> str:
        return f"llamabench_{self.noun.replace('-', '_')}"

    @property
    def env(self) -> str:
        return f"LLAMABENCH_{self.noun.replace('-', '_').upper()}"


OPTIONS = (
    Option("matrix", "matrix TOML file(s) of configs and workloads", multiple=True),
    Option("config", "run only these configs (shell-style globs, repeatable)", multiple=True),
    Option("workload", "run only these workloads (globs, repeatable)", multiple=True),
    Option("models-dir", "directory for models declared with file = ... in the matrix"),
    Option("server-bin", "the llama-server binary to use (wins over PATH and the cached build)"),
    Option("no-build", "never build llama-server on demand; fail if none is found", flag=True),
    Option("backend", "backend of an on-demand build", choices=("cpu", "cuda"), default="cpu"),
    Option("json", "JSON report path (default .llamabench/report.json)"),
    Option("log-dir", "directory for per-config server logs (default .llamabench/logs)"),
    Option("require-gpu", "fail, instead of skip, tests that need a GPU when none is usable", flag=True),
    Option("vram-budget", "behave as if the GPU had only this much memory, e.g. 16GiB", type=_size),
    Option("baseline", "compare this run with a baseline report (ours or pytest-benchmark's JSON)"),
    Option("tolerance", "per-metric tolerance, e.g. gen_tok_s:-5%, C7/ttft_ms:+10%", multiple=True, type=_tolerance),
    Option("fingerprint", "on a baseline with another GPU/build/model/threads: refuse or warn",
           choices=("refuse", "warn"), default="refuse"),  # fmt: skip
    Option("alpha", "significance level of the regression gate", type=_alpha, default=0.05),
    Option("restarts", "fresh servers per config, interleaved across configs (the server start is the unit)",
           type=_restarts),  # fmt: skip
    Option("retry-busy", "measure a workload again, up to N times, when other processes kept the host busy",
           type=_retries, default=0),  # fmt: skip
    Option("request-timeout", "longest silence of llama-server during a request, in seconds (default: from "
           "each workload's timeout_s or its size)", type=_seconds),  # fmt: skip
    Option("shard", "run shard i of N of the selected configs (sorted names dealt round robin), e.g. 1/2; "
           "merge the hosts' reports with python -m pytest_llamabench merge", type=_shard),  # fmt: skip
    Option("html", "HTML report path (default: the JSON report's, with .html); 'off': no page and no chart files"),
    Option("progress", "progress lines (config, workload, repetition, server load time, ETA): auto or off",
           choices=("auto", "off"), default="auto"),  # fmt: skip
    Option("busy-cores", "a measurement is 'busy' when other processes used more than this many cores",
           type=_cores, default=0.25),  # fmt: skip
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("llamabench", "llama-server benchmarks (pytest-llamabench)")
    for opt in OPTIONS:
        help_text = f"{opt.help} [env {opt.env}, ini {opt.dest}]"
        if opt.flag:
            group.addoption(opt.cli, action="store_true", default=None, dest=opt.dest, help=help_text)
        else:
            kwargs: dict[str, Any] = {"type": opt.type, "choices": opt.choices}
            group.addoption(opt.cli, action="append" if opt.multiple else "store", dest=opt.dest,
                            default=None, help=help_text, **kwargs)  # fmt: skip
        if opt.multiple:
            parser.addini(opt.dest, help_text, type="linelist", default=None)
        else:
            parser.addini(opt.dest, help_text, type="string", default=None)


def _from_text(opt: Option, text: str, where: str) -> Any:
    try:
        return opt.type(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def value(config: pytest.Config, noun: str) -> tuple[Any, str]:
    """(value, where it came from): command line > env > ini > default."""
    opt = next(o for o in OPTIONS if o.noun == noun)
    cli = config.getoption(opt.dest, None)
    if cli is not None:
        return cli, opt.cli
    env = os.environ.get(opt.env)
    if env:
        if opt.flag:
            return env.lower() not in ("0", "false", "no", ""), opt.env
        if opt.multiple:
            sep = os.pathsep if noun == "matrix" else ","
            return [_from_text(opt, part.strip(), opt.env) for part in env.split(sep) if part.strip()], opt.env
        return _from_text(opt, env, opt.env), opt.env
    ini = config.getini(opt.dest)
    if ini:
        where = f"{config.inipath or 'ini'}:{opt.dest}"
        if opt.flag:
            return str(ini).lower() in ("1", "true", "yes"), where
        if opt.multiple:
            return [_from_text(opt, line, where) for line in ini], where
        return _from_text(opt, str(ini), where), where
    return opt.default, "default"


def path_value(config: pytest.Config, noun: str) -> tuple[Path | None, str]:
    """A path option; ini paths are relative to the ini file, others to the current dir."""
    raw, where = value(config, noun)
    if raw is None:
        return None, where
    base = config.inipath.parent if (config.inipath and ":" in where and where != "default") else Path.cwd()
    return base / os.path.expanduser(raw), where
