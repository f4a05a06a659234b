"""Interrupt real benchmark runs at random points and check that nothing is left behind.

For each launcher (local process, Docker container) and each signal (SIGINT, SIGTERM,
SIGKILL), ``--runs`` times: start ``pytest`` on a small matrix (two configs × two workloads,
the embedded model), send the signal to the pytest process after a random delay between
0.2 s and the length of an uninterrupted run (measured first, per launcher: so signals land
during start-up, model load, requests and teardown alike), wait for it to exit, give it
``--grace`` seconds, then count what is left:

* llama-server processes of the run (each run's servers get a unique ``--alias``);
* containers of the run (by its run-id label);
* GPU compute processes (nvidia-smi) of the run: its servers or pytest itself, which holds
  the VRAM ballast (in-process ``cuMemAlloc``);
* the ports its servers listened on (each test records its server's URL) that still answer;
* its watchdog processes;

so other processes on the machine are never counted; and checks the report: absent (the run died before its first result) or valid JSON that
matches the schema, with ``finished`` true exactly when pytest exited on its own (exit code
0 or 1) before the signal.

Prints a table and writes every run to ``docs/interruptions/interruptions.json`` (``--out``).
On a quiet machine (the delays are drawn from the length of an uninterrupted run)::

    python benchmarks/interruptions.py --runs 10            # local and docker, ~25 min on 2 cores
    python benchmarks/interruptions.py --runs 10 --launchers local
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "pytest_llamabench" / "schema" / "report.schema.json"
SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}

MATRIX = """
[models.m]
embedded = "smollm2-135m-instruct-q4_1"

[defaults]
model = "m"
threads = 2
ctx = 1024
args = ["--alias", "{tag}"]
{image}

[configs.a]

[configs.b]
ubatch = 64

[workloads.short]
prompt_tokens = 16
n_predict = 32
repetitions = 2
warmup = 0

[workloads.chat]
kind = "chat"
turns = 2
prompt_tokens = 16
n_predict = 16
repetitions = 1
warmup = 0
"""

TEST = """
def test_workload(llama_server, llama_workload, llamabench):
    with open("urls", "a") as fh:
        fh.write(llama_server.base_url + "\\n")
    llamabench(llama_server, llama_workload)
"""

#: Records the inner run's id (for its container labels) as soon as the session starts.
CONFTEST = """
from pytest_llamabench.plugin import STATE

def pytest_sessionstart(session):
    with open("run_id", "w") as fh:
        fh.write(session.config.stash[STATE].bench.settings.run_id)
"""

#: pytest that takes Ctrl-C even when this script runs in the background (SIGINT ignored).
PYTEST = "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main())"


# -- what is running ---------------------------------------------------------------------


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "X"


def llama_servers(tag: str) -> set[int]:
    """This run's servers: ``--alias TAG`` is on their command line."""
    return {pid for pid, cmd in _cmdlines().items()
            if "llama-server" in cmd.split(" ")[0] and f" {tag} " in f"{cmd} " and _state(pid) != "Z"}  # fmt: skip


def watchdogs(owner: int) -> set[int]:
    return {pid for pid, cmd in _cmdlines().items()
            if "pytest_llamabench.server.watchdog" in cmd and f"--owner {owner} " in f"{cmd} " and _state(pid) != "Z"}  # fmt: skip


def answering(urls: list[str]) -> list[str]:
    """The URLs (this run's servers) where something still accepts a connection."""
    out = []
    for url in urls:
        host, _, port = url.removeprefix("http://").partition(":")
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex((host, int(port))) == 0:
                out.append(url)
    return out


def gpu_processes() -> set[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {int(line) for line in out.stdout.split() if line.strip().isdigit()}


def containers_of(run_id: str | None) -> list[str]:
    if not run_id:
        return []
    from pytest_llamabench.server.docker import LABEL_RUN_ID, docker_client

    client = docker_client()
    try:
        return [c.name for c in client.containers.list(all=True, filters={"label": [f"{LABEL_RUN_ID}={run_id}"]})]
    finally:
        client.close()


# -- one run -----------------------------------------------------------------------------


def prepare(work: Path, launcher: str, tag: str = "llamabench-interrupt") -> list[str]:
    from pytest_llamabench.server.build import BuildSpec, resolve_server_bin
    from pytest_llamabench.server.image import DEFAULT_TAG

    image = f'image = "{DEFAULT_TAG}"' if launcher == "docker" else ""
    (work / "matrix.toml").write_text(MATRIX.format(image=image, tag=tag))
    (work / "test_matrix.py").write_text(TEST)
    (work / "conftest.py").write_text(CONFTEST)
    binary, _ = resolve_server_bin([(os.environ.get("LLAMABENCH_SERVER_BIN"), "LLAMABENCH_SERVER_BIN")],
                                   spec=BuildSpec(), build_if_missing=False, log=print)  # fmt: skip
    return [sys.executable, "-c", PYTEST, "test_matrix.py", "--llamabench-matrix=matrix.toml",
            f"--llamabench-server-bin={binary}", "--llamabench-json=report.json", "--llamabench-log-dir=logs",
            "--llamabench-busy-cores=2", "-p", "no:cacheprovider", "-p", "no:randomly", "-q"]  # fmt: skip


#: Tests in a whole run: 2 configs x 2 workloads.
EXPECTED_RESULTS = 4


def check_report(path: Path, exited_on_its_own: bool) -> dict[str, Any]:
    """``finished`` is right when it is true exactly for a run that got all its results without an
    interruption (a signal that lands after the final report was written leaves it finished)."""
    if not path.exists():
        return {"report": "absent", "valid": True, "finished": None, "finished_right": not exited_on_its_own}
    try:
        data = json.loads(path.read_text())
        jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    except (ValueError, jsonschema.ValidationError) as exc:
        return {"report": f"invalid: {str(exc).splitlines()[0][:200]}", "valid": False, "finished": None,
                "finished_right": False}  # fmt: skip
    finished, results = data.get("finished"), len(data.get("results") or [])
    complete = results == EXPECTED_RESULTS and not data.get("interrupted")
    right = finished is True if exited_on_its_own else (finished is False or (finished is True and complete))
    return {"report": "valid", "valid": True, "finished": finished, "results": results,
            "interrupted": data.get("interrupted"), "finished_right": right}  # fmt: skip


def one_run(cmd: list[str], launcher: str, sig: str, delay: float, grace: float) -> dict[str, Any]:
    tag = f"llamabench-interrupt-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="llamabench-interrupt-") as tmp:
        work = Path(tmp)
        prepare(work, launcher, tag)
        started = time.monotonic()
        with (work / "out.txt").open("w") as out:
            proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=delay)
                exited_on_its_own = True
            except subprocess.TimeoutExpired:
                exited_on_its_own = False
                proc.send_signal(SIGNALS[sig])
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        exit_s = time.monotonic() - started
        run_id = (work / "run_id").read_text() if (work / "run_id").exists() else None
        urls = (work / "urls").read_text().split() if (work / "urls").exists() else []
        deadline = time.monotonic() + grace
        while True:  # what is left once the grace period is over (or earlier, when nothing is)
            servers = llama_servers(tag)
            left = {
                "servers": sorted(servers),
                "containers": containers_of(run_id) if launcher == "docker" else [],
                "gpu_processes": sorted(gpu_processes() & (servers | {proc.pid})),
                "ports": answering(urls),
                "watchdogs": sorted(watchdogs(proc.pid)),
            }
            if not any(left.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        clean_s = time.monotonic() - started - exit_s
        record = {"launcher": launcher, "signal": sig, "delay_s": round(delay, 2), "exit_code": proc.returncode,
                  "exited_on_its_own": exited_on_its_own, "exit_s": round(exit_s, 2), "clean_after_s": round(clean_s, 2),
                  "run_id": run_id, "left": left, **check_report(work / "report.json", exited_on_its_own)}  # fmt: skip
        if any(left.values()) or not record["valid"] or not record["finished_right"]:
            record["output_tail"] = (work / "out.txt").read_text(errors="replace")[-3000:]
    for pid in record["left"]["servers"]:  # leave the machine clean for the next run
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if record["left"]["containers"]:
        from pytest_llamabench.server.docker import docker_client, remove_run_containers

        remove_run_containers(docker_client(), str(run_id))
    return record


def calibrate(cmd: list[str], launcher: str) -> float:
    """Seconds an uninterrupted run takes (the upper end of the random delays)."""
    record = one_run(cmd, launcher, "KILL", delay=600, grace=5)
    if record["exit_code"] not in (0, 1) or not record["exited_on_its_own"]:
        raise SystemExit(f"the uninterrupted {launcher} run failed (exit {record['exit_code']}):\n{record.get('output_tail', '')}")
    return float(record["exit_s"])


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| launcher | signal | runs | finished before the signal | servers left | containers left | GPU processes left "
            "| ports left | watchdogs left | reports valid | `finished` right | longest clean-up (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for launcher in sorted({r["launcher"] for r in records}):
        for sig in SIGNALS:
            rs = [r for r in records if r["launcher"] == launcher and r["signal"] == sig]
            if not rs:
                continue

            def count(key: str, rs: list[dict[str, Any]] = rs) -> int:
                return sum(len(r["left"][key]) for r in rs)

            rows.append(
                f"| {launcher} | SIG{sig} | {len(rs)} | {sum(r['exited_on_its_own'] for r in rs)} | {count('servers')} "
                f"| {count('containers')} | {count('gpu_processes')} | {count('ports')} | {count('watchdogs')} "
                f"| {sum(r['valid'] for r in rs)}/{len(rs)} | {sum(r['finished_right'] for r in rs)}/{len(rs)} "
                f"| {max(r['clean_after_s'] for r in rs):.1f} |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs per launcher and signal (default 10)")
    parser.add_argument("--launchers", default="local,docker")
    parser.add_argument("--signals", default="INT,TERM,KILL")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds things may take to go away (default 10)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "interruptions" / "interruptions.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    launchers = args.launchers.split(",")
    if "docker" in launchers:
        from pytest_llamabench.server.image import build_local_image, default_binary

        build_local_image(default_binary(), log=print)
    records: list[dict[str, Any]] = []
    for launcher in launchers:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = prepare(Path(tmp), launcher)
        full = calibrate(cmd, launcher)
        print(f"{launcher}: an uninterrupted run takes {full:.1f} s", flush=True)
        plan = [(sig, rng.uniform(0.2, full)) for sig in args.signals.split(",") for _ in range(args.runs)]
        rng.shuffle(plan)  # signals interleaved, so drift hits all alike
        for i, (sig, delay) in enumerate(plan, 1):
            record = one_run(cmd, launcher, sig, delay, args.grace)
            records.append(record)
            left = sum(len(v) for v in record["left"].values())
            print(f"{launcher} {i}/{len(plan)} SIG{sig} at {delay:5.1f} s: exit {record['exit_code']}, "
                  f"report {record['report']}, finished {record['finished']}, left {left}", flush=True)  # fmt: skip
    text = table(records)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs_per_cell": args.runs, "grace_s": args.grace, "seed": args.seed,
                                    "table": text, "records": records}, indent=1) + "\n")  # fmt: skip
    print(f"wrote {args.out}")
    bad = [r for r in records if any(r["left"].values()) or not r["valid"] or not r["finished_right"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
