"""``python -m pytest_llamabench COMMAND``: the project's commands outside pytest.

build-server   build the pinned llama.cpp (cpu or cuda) into the user cache
which-server   print the llama-server that a run would use, and why
trim-sdist     write the small, still pinned copy of the llama.cpp sdist (for offline machines)
vocab          print the path of a llama.cpp tokenizer GGUF (ggml-vocab-NAME.gguf)
compare        compare two JSON reports (regression gate for CI)
synth-model    write a GGUF with a real model's shapes and random weights
docker-image   build the local llama-server image used by container configs
html           write the HTML report (inline SVG charts) of a JSON report
winner         print the winner as a production config: command line, docker run, compose, TOML
merge          merge the reports of several hosts (--llamabench-shard) into one
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_llamabench.gate.cli import register as _register_compare
from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.server.image import register as _register_docker_image
from pytest_llamabench.model.synth import register as _register_synth_model
from pytest_llamabench.outputs.cli import register as _register_outputs
from pytest_llamabench.shards.cli import register as _register_merge

Command = Callable[[argparse.Namespace], int]


def _build_server(args: argparse.Namespace) -> int:
    from pytest_llamabench.server.build import BuildSpec, build

    spec = BuildSpec(backend=args.backend, cuda_architectures=args.cuda_arch)
    bin_dir = build(spec, sdist=args.sdist, jobs=args.jobs, force=args.force, log=_log)
    print(bin_dir / "llama-server")
    return 0


def _which_server(args: argparse.Namespace) -> int:
    import os

    from pytest_llamabench.server.build import BuildSpec, build_info, resolve_server_bin, server_version

    prefer_cuda = False
    if args.backend is None:  # as a session with GPU configs does: CUDA build if a GPU is usable
        from pytest_llamabench.hardware.gpu import probe_gpu

        prefer_cuda = probe_gpu().available
    path, where = resolve_server_bin(
        [(os.environ.get("LLAMABENCH_SERVER_BIN"), "LLAMABENCH_SERVER_BIN")],
        spec=BuildSpec(backend=args.backend or "cpu"),
        build_if_missing=False,
        log=_log,
        prefer_cuda=prefer_cuda,
    )
    print(f"{path}  (from {where})\n{server_version(path)}")
    source = (build_info(path) or {}).get("source")
    if isinstance(source, dict):
        print(f"source: {source.get('description')}")
    return 0


def _trim_sdist(args: argparse.Namespace) -> int:
    from pytest_llamabench.server.source import write_trimmed

    write_trimmed(args.sdist, args.output, log=_log)
    print(args.output)
    return 0


def _vocab(args: argparse.Namespace) -> int:
    from pytest_llamabench.server.build import vocab_file

    print(vocab_file(args.name, sdist=args.sdist, log=_log))
    return 0


def _log(message: str) -> None:
    print(f"[llamabench] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_llamabench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-server", help="build the pinned llama.cpp into the user cache")
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 (default: the GPU's)")
    p.add_argument("--sdist", type=Path, help="the llama-cpp-python 0.3.36 sdist or its trim-sdist copy, "
                   "verified against the pinned hashes (offline builds)")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.set_defaults(func=_build_server)

    p = sub.add_parser("which-server", help="print the llama-server a run would use")
    p.add_argument("--backend", choices=("cpu", "cuda"), default=None,
                   help="default: a CUDA build when an NVIDIA GPU is usable (as for GPU configs), else cpu")
    p.set_defaults(func=_which_server)

    p = sub.add_parser("trim-sdist", help="write the trimmed, still pinned llama.cpp source tarball")
    p.add_argument("sdist", type=Path, help="llama_cpp_python-0.3.36.tar.gz as downloaded from PyPI")
    p.add_argument("-o", "--output", type=Path, default=Path("llama-cpp-python-0.3.36-trimmed.tar.gz"))
    p.set_defaults(func=_trim_sdist)

    p = sub.add_parser("vocab", help="print the path of llama.cpp's ggml-vocab-NAME.gguf (e.g. qwen2)")
    p.add_argument("name", help="qwen2 or qwen35 (the tokenizers the trimmed source keeps)")
    p.add_argument("--sdist", type=Path, help="the sdist or its trimmed copy (default: kept by a build, else download)")
    p.set_defaults(func=_vocab)

    for register in _EXTRA_COMMANDS:
        register(sub)

    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except LlamabenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


#: Subcommands contributed by other modules: each gets the subparsers object.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    _register_compare,
    _register_synth_model,
    _register_docker_image,
    _register_outputs,
    _register_merge,
]

if __name__ == "__main__":
    sys.exit(main())
