"""What a container server can reach: only its model file, read-only, as nobody, under an init.

Real Docker engine and the real server (the local image of tests/test_container.py).
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.config import Matrix
from pytest_llamabench.errors import ConfigError
from pytest_llamabench.server.container import NOBODY, ContainerServer, container_user

from .test_container import boxed, client, containers_with_label, image_id, matrix  # noqa: F401 - fixtures


def _uids(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return {int(v) for v in line.split()[1:]}
    raise AssertionError(f"no Uid line for {pid}")


def test_the_server_sees_only_its_model_file_as_an_unprivileged_user(
    client: Any, image_id: str, matrix: Matrix, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:12]
    server = ContainerServer(boxed(matrix, ready_timeout_s=180), run_id=run, log_dir=tmp_path, client=client)
    with server:
        assert server.client.health_status() == 200
        (found,) = containers_with_label(run, client)
        assert server.model_info is not None
        model = server.model_info.path.resolve()
        mounts = [(m["Source"], m["Destination"], m["RW"]) for m in found.attrs["Mounts"]]
        assert mounts == [(str(model), f"/models/{model.name}", False)]  # the file, not its directory
        host = found.attrs["HostConfig"]
        assert host["Init"] is True
        assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True
        assert "no-new-privileges" in host["SecurityOpt"]
        expected_uid = 65534 if os.getuid() == 0 else os.getuid()
        assert found.attrs["Config"]["User"] == (NOBODY if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}")
        pids = server.pids()
        assert len(pids) == 2  # docker-init as PID 1, llama-server its child
        assert all(_uids(pid) == {expected_uid} for pid in pids if "llama-server" in Path(f"/proc/{pid}/cmdline").read_text())
        assert any("llama-server" in Path(f"/proc/{pid}/cmdline").read_text() for pid in pids)
    assert containers_with_label(run, client) == []


@pytest.mark.skipif(os.getuid() != 0, reason="as a normal user the container runs as that user")
def test_as_root_an_unreadable_model_is_refused_before_launch(tmp_path: Path) -> None:
    model = tmp_path / "private.gguf"
    model.write_bytes(b"GGUF")
    model.chmod(0o600)
    with pytest.raises(ConfigError, match=r"m\.toml \(model\): .*private\.gguf is not readable by others.*chmod o\+r"):
        container_user([model], where="m.toml (model)")
    model.chmod(0o644)
    assert container_user([model], where="m.toml (model)") == NOBODY
    assert model.stat().st_mode & stat.S_IROTH


def test_a_projector_is_mounted_as_a_file_too(tmp_path: Path) -> None:
    from pytest_llamabench.server.container import _mount_file_args

    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"GGUF")
    args, volumes = _mount_file_args(["--mmproj", str(projector), "-c", "512"])
    assert args == ["--mmproj", "/files/0/mmproj.gguf", "-c", "512"]
    assert volumes == {str(projector.resolve()): {"bind": "/files/0/mmproj.gguf", "mode": "ro"}}
