"""Start a report's winner exactly as `python -m pytest_llamabench winner` prints it, on a free port,
and check that it serves: /health, then one completion of N tokens. Stops it again.

    python scripts/production_check.py REPORT.json [--config NAME] [--format cmd|docker] [--tokens 32]

Exit 0 when the production command served; the evidence line goes to stdout. For docker, the
winner must have run in a container (its image on this machine).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx

from pytest_llamabench.outputs.production import production_config
from pytest_llamabench.results import RunReport


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report")
    parser.add_argument("--config")
    parser.add_argument("--format", choices=("cmd", "docker"), default="cmd")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the model to load")
    args = parser.parse_args()
    production = production_config(RunReport.load(args.report), args.config)
    port = _free_port()
    if args.format == "docker":
        argv = shlex.split(production.docker(port=port))
        name = argv[argv.index("--name") + 1]
        argv[argv.index("--name") + 1] = name = f"{name}-check-{os.getpid()}"
    else:
        argv = production.argv(port=port)
        name = ""
    print("$", shlex.join(argv), flush=True)
    log = open(f"production-check-{production.config}.log", "wb")  # noqa: SIM115 - closed with the server
    proc = subprocess.Popen(argv, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        while True:
            if args.format == "cmd" and proc.poll() is not None:
                print(f"the production command exited with {proc.returncode}", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > args.timeout:
                print(f"not ready within {args.timeout:g} s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        loaded = time.monotonic() - started
        reply = httpx.post(f"http://127.0.0.1:{port}/completion", timeout=300, json={
            "prompt": "The river bends twice before", "n_predict": args.tokens, "ignore_eos": True})  # fmt: skip
        reply.raise_for_status()
        timings = reply.json().get("timings", {})
        print(f"production config {production.config} ({args.format}) served: ready in {loaded:.1f} s, "
              f"{timings.get('predicted_n')} tokens at {timings.get('predicted_per_second', 0):.1f} tok/s")  # fmt: skip
        return 0
    finally:
        if args.format == "docker":
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        print(f"server log: {log.name}")


if __name__ == "__main__":
    sys.exit(main())
