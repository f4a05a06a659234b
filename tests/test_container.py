"""ContainerServer and the local image against the real Docker engine: no mocks.

Skipped only when the daemon cannot be reached; ``LLAMABENCH_REQUIRE_DOCKER=1``
(CI) turns that skip into a failure. The image is built from the project's
llama-server (cached build, else ``$LLAMABENCH_SERVER_BIN``) without a registry.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.server import docker as dk
from pytest_llamabench.config import Matrix, ServerConfig, load_matrix
from pytest_llamabench.server.container import ContainerServer, resolve_image
from pytest_llamabench.server.docker import docker_client, remove_run_containers, sweep_leftovers
from pytest_llamabench.errors import BuildError, ConfigError, DockerUnavailable, GpuUnavailable, ServerOutOfMemory
from pytest_llamabench.server.image import DEFAULT_TAG, build_local_image, default_binary, parse_ldd

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def containers_with_label(run_id: str, client: Any = None) -> list[Any]:
    """Every container (running or not) of pytest-llamabench run ``run_id``."""
    client = client or docker_client()
    for _ in range(10):
        try:
            return list(client.containers.list(all=True, filters={"label": [f"{dk.LABEL_RUN_ID}={run_id}"]}))
        except dk.docker_sdk().errors.NotFound:  # one was removed between listing and inspecting it
            time.sleep(0.1)
    return list(client.containers.list(all=True, filters={"label": [f"{dk.LABEL_RUN_ID}={run_id}"]}))


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def client() -> Any:
    try:
        return docker_client()
    except DockerUnavailable as exc:
        if os.environ.get("LLAMABENCH_REQUIRE_DOCKER") == "1":
            pytest.fail(f"LLAMABENCH_REQUIRE_DOCKER=1 but the Docker daemon is unreachable: {exc}")
        pytest.skip(f"Docker daemon unreachable (set LLAMABENCH_REQUIRE_DOCKER=1 to fail instead): {exc}")


@pytest.fixture(scope="session")
def image_id(client: Any) -> str:
    try:
        binary = default_binary()
    except ConfigError as exc:
        pytest.fail(str(exc))
    return build_local_image(binary, tag=DEFAULT_TAG, client=client, log=lambda m: None)


@pytest.fixture(scope="session")
def run_id(client: Any) -> Iterator[str]:
    run = uuid.uuid4().hex[:12]
    yield run
    remove_run_containers(client, run)


@pytest.fixture(scope="session")
def matrix() -> Matrix:
    return load_matrix([REPO / "configs" / "default.toml"])


def boxed(matrix: Matrix, name: str = "base", **changes: Any) -> ServerConfig:
    """A config of the default matrix, run from the local image."""
    return dataclasses.replace(matrix.configs[name], image=DEFAULT_TAG, **changes)


@pytest.fixture(scope="module")
def base_server(
    client: Any, image_id: str, run_id: str, matrix: Matrix, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerServer]:
    server = ContainerServer(boxed(matrix), run_id=run_id, log_dir=tmp_path_factory.mktemp("logs"), client=client)
    with server:
        yield server


# -- a healthy server ------------------------------------------------------------------


def test_streams_a_real_completion(base_server: ContainerServer) -> None:
    assert base_server.client.health_status() == 200
    result = base_server.client.stream_completion(
        {"prompt": "The quick brown fox", "n_predict": 16, "ignore_eos": True, "cache_prompt": False}
    )
    assert result.timings["predicted_n"] == 16
    assert result.client_tokens == 16
    assert result.timings["predicted_per_second"] > 0
    base_server.ensure_alive()


def test_describe_records_what_ran(base_server: ContainerServer, image_id: str) -> None:
    info = base_server.describe()
    assert info["launcher"] == "docker"
    assert info["image"] == DEFAULT_TAG
    assert info["image_id"] == image_id
    assert info["image_digest"] == image_id  # built locally: no registry digest, so the image ID
    assert info["container_id"] == base_server.container_id
    assert info["build_info"]  # /props answered through the published port
    assert "--load-mode" in info["args"] and "--model" not in info["args"]


def test_published_on_loopback_only(base_server: ContainerServer, client: Any, run_id: str) -> None:
    (found,) = [c for c in containers_with_label(run_id, client) if c.id == base_server.container_id]
    bindings = found.attrs["HostConfig"]["PortBindings"]["8080/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
    assert found.labels[dk.LABEL_CONFIG] == "base"
    assert found.labels[dk.LABEL_OWNER_PID] == str(os.getpid())
    assert base_server.base_url is not None and base_server.base_url.startswith("http://127.0.0.1:")
    mounts = found.attrs["Mounts"]
    assert [(m["Destination"], m["RW"]) for m in mounts] == [("/models/SmolLM2-135M-Instruct.Q4_1.gguf", False)]  # the file only
    assert not any(e.startswith(("HOME=", "PYTEST_")) for e in found.attrs["Config"]["Env"])  # host env stays out


def test_pids_and_peak_memory(base_server: ContainerServer) -> None:
    pids = base_server.pids()
    assert pids and all(Path(f"/proc/{pid}").exists() for pid in pids)
    peak = base_server.peak_rss_mib()
    assert peak is not None and 50 < peak < 2048  # the ~94 MB model is read into memory


def test_stop_removes_the_container(client: Any, image_id: str, matrix: Matrix, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:12]
    server = ContainerServer(boxed(matrix, ready_timeout_s=180), run_id=run, log_dir=tmp_path, client=client)
    server.start()
    try:
        assert [c.id for c in containers_with_label(run, client)] == [server.container_id]
    finally:
        server.stop()
    assert containers_with_label(run, client) == []
    server.stop()  # idempotent
    assert "listening on" in server.log_path.read_text()  # the log streamed from the container


# -- failures ----------------------------------------------------------------------------


def test_memory_limit_gives_a_real_oom(client: Any, image_id: str, matrix: Matrix, tmp_path: Path) -> None:
    """64 MiB limit, the ~94 MB model read into memory (load_mode none): the kernel OOM-kills it."""
    run = uuid.uuid4().hex[:12]
    config = boxed(matrix, memory_limit=64 * MIB)
    assert config.server["load_mode"] == "none"
    server = ContainerServer(config, run_id=run, log_dir=tmp_path, client=client)
    with pytest.raises(ServerOutOfMemory) as caught:
        server.start()
    assert caught.value.device == "host"
    assert "OOM-killed" in caught.value.message and "64 MiB" in caught.value.message
    assert "loading model" in caught.value.log_tail
    assert containers_with_label(run, client) == []  # removed after the failed start


def test_gpu_request_without_gpu_runtime(client: Any, image_id: str, matrix: Matrix, tmp_path: Path) -> None:
    if "nvidia" in (client.info().get("Runtimes") or {}):
        pytest.skip("this Docker engine has an NVIDIA runtime: a GPU request would succeed")
    run = uuid.uuid4().hex[:12]
    server = ContainerServer(boxed(matrix, gpu=True), run_id=run, log_dir=tmp_path, client=client)
    with pytest.raises(GpuUnavailable, match="could not select device driver"):
        server.start()
    assert containers_with_label(run, client) == []


def test_unreachable_daemon_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(DockerUnavailable) as caught:
        docker_client()
    assert "start the daemon" in caught.value.message
    assert "docker group" in caught.value.message and "DOCKER_HOST" in caught.value.message


# -- images ----------------------------------------------------------------------------------


def test_pinned_digest_is_verified(client: Any, image_id: str) -> None:
    assert resolve_image(client, f"{DEFAULT_TAG}@{image_id}", where="t.image").id == image_id
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DockerUnavailable, match="pins sha256:0000"):
        resolve_image(client, f"{DEFAULT_TAG}@{wrong}", where="t.image")
    with pytest.raises(ConfigError, match="not a digest"):
        resolve_image(client, f"{DEFAULT_TAG}@sha256:abc", where="t.image")


def test_missing_image_says_how_to_build(client: Any) -> None:
    with pytest.raises(DockerUnavailable, match="python -m pytest_llamabench docker-image"):
        resolve_image(client, "pytest-llamabench/not-built:nope", where="t.image")


def test_image_build_is_cached(client: Any, image_id: str) -> None:
    started = time.monotonic()
    assert build_local_image(default_binary(), tag=DEFAULT_TAG, client=client, log=lambda m: None) == image_id
    assert time.monotonic() - started < 10  # hash + label lookup, no build


def test_image_holds_the_binary_libraries_and_tmp(client: Any, image_id: str) -> None:
    out = client.containers.run(image_id, ["--version"], remove=True, stderr=True)
    assert b"version:" in out
    labels = client.images.get(image_id).labels
    assert len(labels["pytest-llamabench.binary-sha256"]) == 64
    parked = client.containers.create(image_id, ["--version"])
    try:
        _, tmp = parked.get_archive("/tmp")
    finally:
        parked.remove(force=True)
    assert tmp["mode"] & (1 << 31) and tmp["mode"] & 0o777 == 0o777  # a world-writable directory


def test_parse_ldd() -> None:
    output = (
        "\tlinux-vdso.so.1 (0x00007ffd1c9f5000)\n"
        "\tlibgomp.so.1 => /lib/x86_64-linux-gnu/libgomp.so.1 (0x00007f2b83f7c000)\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2b82c1e000)\n"
        "\tlibcuda.so.1 => /lib/x86_64-linux-gnu/libcuda.so.1 (0x00007f2b83f00000)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f2b83fd7000)\n"
    )
    assert parse_ldd(output, Path("x")) == [
        Path("/lib/x86_64-linux-gnu/libgomp.so.1"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib64/ld-linux-x86-64.so.2"),
    ]  # libcuda (the driver) is left to the NVIDIA container runtime
    with pytest.raises(BuildError, match="libfoo.so.2"):
        parse_ldd("\tlibfoo.so.2 => not found\n", Path("x"))


# -- cleanup by label --------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _parked(client: Any, image_id: str, run: str, **labels: str) -> Any:
    """A created (never started) container with pytest-llamabench labels."""
    return client.containers.create(
        image_id, ["--version"], name=dk.container_name(run, "parked"),
        labels={**dk.owner_labels(run, "parked"), **labels},
    )  # fmt: skip


def test_sweep_removes_containers_of_dead_owners(client: Any, image_id: str) -> None:
    current, crashed, other = (uuid.uuid4().hex[:12] for _ in range(3))
    dead = _parked(client, image_id, crashed, **{dk.LABEL_OWNER_PID: str(_dead_pid())})
    alive = _parked(client, image_id, other)  # owner: this process, still alive
    reused = _parked(client, image_id, other, **{dk.LABEL_OWNER_START: "1"})  # this PID, another start time
    excluded = _parked(client, image_id, current, **{dk.LABEL_OWNER_PID: str(_dead_pid())})
    try:
        removed = sweep_leftovers(client, exclude_run_id=current)
        assert dead.name in removed and reused.name in removed
        assert alive.name not in removed and excluded.name not in removed
        assert containers_with_label(crashed, client) == []
        assert [c.id for c in containers_with_label(other, client)] == [alive.id]
    finally:
        for run in (current, crashed, other):
            remove_run_containers(client, run)
    assert all(containers_with_label(run, client) == [] for run in (current, crashed, other))


def test_remove_run_containers(client: Any, image_id: str) -> None:
    run = uuid.uuid4().hex[:12]
    names = {_parked(client, image_id, run).name for _ in range(2)}
    assert set(remove_run_containers(client, run)) == names
    assert containers_with_label(run, client) == []
