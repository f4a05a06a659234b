"""The model sha256 cache: a changed file is never taken for the cached one; verify = "always"."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from pathlib import Path

import pytest

from pytest_llamabench.config import load_matrix
from pytest_llamabench.errors import ConfigError, ModelLoadError
from pytest_llamabench.model import digest
from pytest_llamabench.model.files import verify_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLAMABENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "_THIS_RUN", {})  # each test is a fresh run
    return tmp_path / "cache"


def test_a_flipped_byte_with_the_mtime_restored_is_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(4096))
    first = digest.file_sha256(model)
    before = model.stat()
    with model.open("r+b") as fh:  # the same size, one byte different
        fh.seek(100)
        fh.write(b"\x01")
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = model.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # the old key would match
    monkeypatch.setattr(digest, "_THIS_RUN", {})  # a later run
    assert digest.file_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest() != first


def test_an_unchanged_file_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    real = digest.file_sha256(model)
    monkeypatch.setattr(digest, "_THIS_RUN", {})
    monkeypatch.setattr(digest, "hash_file", lambda path: pytest.fail("read again"))
    assert digest.file_sha256(model) == real
    cache = json.loads(digest.cache_file().read_text())
    assert cache[str(model.resolve())] == {"stat": list(digest.stat_key(model)), "sha256": real}


def test_always_rehashes_once_per_run_whatever_the_cache_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    real = hashlib.sha256(model.read_bytes()).hexdigest()
    # a cache entry that matches the file's stat but not its bytes: what no stat key can catch
    digest.cache_file().parent.mkdir(parents=True)
    digest.cache_file().write_text(json.dumps({str(model.resolve()): {"stat": list(digest.stat_key(model)), "sha256": "0" * 64}}))
    assert digest.file_sha256(model) == "0" * 64  # cached mode trusts it (documented limit)
    assert digest.file_sha256(model, always=True) == real
    monkeypatch.setattr(digest, "hash_file", lambda path: pytest.fail("hashed twice in one run"))
    assert digest.file_sha256(model, always=True) == real


def test_verify_always_catches_a_stale_cache_entry_before_launch(tmp_path: Path, model_path: Path) -> None:
    pinned = hashlib.sha256(model_path.read_bytes()).hexdigest()
    digest.cache_file().parent.mkdir(parents=True)
    digest.cache_file().write_text(json.dumps({str(model_path.resolve()): {"stat": list(digest.stat_key(model_path)), "sha256": "f" * 64}}))
    with pytest.raises(ModelLoadError, match="the config pins"):
        verify_model(model_path, sha256=pinned)
    assert verify_model(model_path, sha256=pinned, rehash=True).sha256 == pinned


def test_old_cache_entries_are_ignored(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    st = model.stat()
    digest.cache_file().parent.mkdir(parents=True)
    digest.cache_file().write_text(json.dumps({f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}": "0" * 64}))
    assert digest.file_sha256(model) == hashlib.sha256(b"GGUF").hexdigest()


def _matrix(tmp_path: Path, verify: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(f"""
        [models.m]
        path = "model.gguf"
        verify = "{verify}"

        [configs.a]
        model = "m"
        ctx = 512

        [workloads.w]
        prompt_tokens = 8
    """))  # fmt: skip
    return path


def test_verify_key_in_the_matrix(tmp_path: Path) -> None:
    matrix = load_matrix([_matrix(tmp_path, "always")])
    assert matrix.configs["a"].model.verify == "always"
    with pytest.raises(ConfigError, match=r"m\.toml.*verify.*'sometimes' is not one of cached, always"):
        load_matrix([_matrix(tmp_path, "sometimes")])
