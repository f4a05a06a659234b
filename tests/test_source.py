"""The pinned llama.cpp source (sdist sha256, trimmed copy by content digest), the build's pinned
commit, kept vocabularies and which cached build a run resolves (CPU or CUDA)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_llamabench.__main__ import main
from pytest_llamabench.errors import BuildError, ConfigError
from pytest_llamabench.server import build, source
from pytest_llamabench.server.build import BuildSpec, cached_server, resolve_server_bin

TOP = "llama_cpp_python-0.3.36/"
KEPT = {
    TOP + "pyproject.toml": b"[project]\n",
    TOP + "vendor/llama.cpp/CMakeLists.txt": b"project(llama.cpp)\n",
    TOP + "vendor/llama.cpp/src/llama.cpp": b"int main() {}\n",
    TOP + "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf": b"GGUF qwen2 vocab",
}
TRIMMED = {
    TOP + ".git/modules/vendor/llama.cpp/HEAD": b"0c1e57098bba43ac29e6e3b677cdceebdd22334f\n",
    TOP + "vendor/llama.cpp/docs/build.md": b"# build\n",
    TOP + "vendor/llama.cpp/tests/test-x.cpp": b"int x;\n",
    TOP + "vendor/llama.cpp/models/ggml-vocab-falcon.gguf": b"GGUF falcon",
}


def write_tar(path: Path, members: dict[str, bytes], *, level: int = 6) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=level) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def pinned_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small 'sdist' whose file hash and content digest stand in for the pinned ones."""
    sdist = write_tar(tmp_path / "sdist.tar.gz", {**KEPT, **TRIMMED})
    monkeypatch.setattr(source, "SDIST_SHA256", source.file_sha256(sdist))
    monkeypatch.setattr(source, "TREE_SHA256", source.tree_digest(sdist))
    monkeypatch.setenv("LLAMABENCH_CACHE_DIR", str(tmp_path / "cache"))
    return sdist


def test_trim_rule_keeps_the_build_tree_and_two_vocabs() -> None:
    assert all(source.is_kept(name) for name in KEPT)
    assert not any(source.is_kept(name) for name in TRIMMED)
    assert source.is_kept(TOP + "vendor/llama.cpp/models/ggml-vocab-qwen35.gguf")
    assert not source.is_kept("other-1.0/vendor/llama.cpp/CMakeLists.txt")  # another package's tree


def test_the_content_digest_ignores_trimmed_members_and_compression_but_not_one_byte(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar.gz", {**KEPT, **TRIMMED}, level=1)
    trimmed = write_tar(tmp_path / "trimmed.tar.gz", KEPT, level=9)
    assert source.file_sha256(full) != source.file_sha256(trimmed)
    assert source.tree_digest(full) == source.tree_digest(trimmed)
    flipped = dict(KEPT)
    flipped[TOP + "vendor/llama.cpp/src/llama.cpp"] = b"int main() {}\r"
    assert source.tree_digest(write_tar(tmp_path / "flipped.tar.gz", flipped)) != source.tree_digest(trimmed)
    extra = {**KEPT, TOP + "vendor/llama.cpp/src/evil.cpp": b"//"}
    assert source.tree_digest(write_tar(tmp_path / "extra.tar.gz", extra)) != source.tree_digest(trimmed)


def test_the_pinned_sdist_and_its_trimmed_copy_pass_anything_else_is_one_clear_error(
    pinned_fake: Path, tmp_path: Path
) -> None:
    assert source.verify_sdist(pinned_fake).trimmed is False
    trimmed = source.write_trimmed(pinned_fake, tmp_path / "trimmed.tar.gz", log=lambda m: None)
    assert trimmed.trimmed and trimmed.sha256 != source.SDIST_SHA256
    assert "trimmed" in trimmed.description and source.TREE_SHA256 in trimmed.description
    tampered = dict(KEPT)
    tampered[TOP + "vendor/llama.cpp/CMakeLists.txt"] = b"project(evil)\n"
    bad = write_tar(tmp_path / "bad.tar.gz", tampered)
    with pytest.raises(BuildError) as err:
        source.verify_sdist(bad)
    message = str(err.value)
    assert "\n" not in message
    assert source.file_sha256(bad) in message and source.SDIST_SHA256 in message and "trim-sdist" in message
    with pytest.raises(BuildError, match="already trimmed"):
        source.write_trimmed(tmp_path / "trimmed.tar.gz", tmp_path / "again.tar.gz")


def test_only_kept_members_are_extracted(pinned_fake: Path, tmp_path: Path) -> None:
    llama = source.extract_kept(source.verify_sdist(pinned_fake), tmp_path / "src")
    assert (llama / "CMakeLists.txt").read_bytes() == KEPT[TOP + "vendor/llama.cpp/CMakeLists.txt"]
    assert not (llama / "docs").exists() and not (tmp_path / "src" / TOP / ".git").exists()
    assert sorted(p.name for p in (llama / "models").iterdir()) == ["ggml-vocab-qwen2.gguf"]


def test_build_refuses_an_unpinned_sdist_before_configuring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMABENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_tool", lambda name: name)  # cmake/ninja are not reached
    bad = write_tar(tmp_path / "llama_cpp_python-0.3.36.tar.gz", KEPT)
    with pytest.raises(BuildError, match="is not the pinned llama-cpp-python 0.3.36 sdist"):
        build.build(BuildSpec(), sdist=bad, log=lambda m: None)
    assert not (tmp_path / "cache" / "llama.cpp" / BuildSpec().key).exists()
    code = main(["build-server", "--sdist", str(bad)])
    assert code == 2


def test_every_build_names_the_pinned_commit() -> None:
    for spec in (BuildSpec(), BuildSpec("cuda", "90")):
        flags = spec.cmake_flags()
        assert f"-DLLAMA_BUILD_COMMIT={source.LLAMA_CPP_COMMIT}" in flags
        assert f"-DLLAMA_BUILD_NUMBER={source.LLAMA_CPP_BUILD_NUMBER}" in flags
    assert BuildSpec().key == "llama-cpp-python-0.3.36-cpu-avx2"  # unchanged: no rebuild of existing caches


def _real_sdist() -> Path | None:
    path = os.environ.get("LLAMABENCH_TEST_SDIST")
    return Path(path) if path and Path(path).is_file() else None


@pytest.mark.skipif(_real_sdist() is None, reason="set LLAMABENCH_TEST_SDIST to the downloaded sdist")
def test_the_real_sdist_matches_both_pins_and_the_commit(tmp_path: Path) -> None:
    sdist = _real_sdist()
    assert sdist is not None
    assert source.verify_sdist(sdist).sha256 == source.SDIST_SHA256
    assert source.tree_digest(sdist) == source.TREE_SHA256
    with tarfile.open(sdist) as tar:
        head = tar.extractfile(TOP + ".git/modules/vendor/llama.cpp/HEAD")
        assert head is not None and head.read().decode().startswith(source.LLAMA_CPP_COMMIT)
    trimmed = source.write_trimmed(sdist, tmp_path / "t.tar.gz", log=lambda m: None)
    assert trimmed.trimmed and (tmp_path / "t.tar.gz").stat().st_size < 20 * 2**20


def test_the_cached_build_reports_the_pinned_commit(server_bin: Path) -> None:
    out = subprocess.run([str(server_bin), "--version"], capture_output=True, text=True, timeout=60)
    assert f"commit {source.LLAMA_CPP_COMMIT}" in out.stdout + out.stderr


# -- vocabularies ---------------------------------------------------------------------


def test_vocab_command_takes_the_tokenizer_from_a_verified_sdist(
    pinned_fake: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["vocab", "qwen2", "--sdist", str(pinned_fake)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == build.vocab_dir() / "ggml-vocab-qwen2.gguf"
    assert path.read_bytes() == KEPT[TOP + "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"]
    assert main(["vocab", "qwen2"]) == 0  # kept now: no sdist needed
    assert capsys.readouterr().out.strip() == str(path)
    assert main(["vocab", "falcon", "--sdist", str(pinned_fake)]) == 2
    assert "no ggml-vocab-falcon.gguf in the pinned source" in capsys.readouterr().err


def test_a_build_keeps_the_source_vocabs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMABENCH_CACHE_DIR", str(tmp_path / "cache"))
    models = tmp_path / "llama.cpp" / "models"
    models.mkdir(parents=True)
    (models / "ggml-vocab-qwen2.gguf").write_bytes(b"v")
    (models / "ggml-vocab-qwen2.gguf.inp").write_bytes(b"not a vocab")
    kept = build.keep_vocabs(models.parent)
    assert [p.name for p in kept] == ["ggml-vocab-qwen2.gguf"] and kept[0].read_bytes() == b"v"


# -- which build a run uses ---------------------------------------------------------


def _fake_build(spec: BuildSpec) -> Path:
    """An executable at the cached build's path: resolution only checks that it is there."""
    spec.bin_dir.mkdir(parents=True)
    path = spec.bin_dir / "llama-server"
    path.write_text("#!/bin/sh\necho 'version: 0.5.0-dev (build 1, commit 0c1e570)'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def two_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("LLAMABENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no llama-server on PATH
    monkeypatch.delenv("LLAMABENCH_SERVER_BIN", raising=False)
    return _fake_build(BuildSpec()), _fake_build(BuildSpec("cuda", "90"))


def test_gpu_sessions_prefer_the_cuda_build_of_any_arch(two_builds: tuple[Path, Path]) -> None:
    cpu, cuda = two_builds

    def resolve(candidates: list[tuple[str | None, str]], prefer_cuda: bool) -> tuple[Path, str]:
        return resolve_server_bin(candidates, spec=BuildSpec(), build_if_missing=False, log=print, prefer_cuda=prefer_cuda)

    assert resolve([], prefer_cuda=False) == (cpu, "cache (llama-cpp-python-0.3.36-cpu-avx2)")
    assert resolve([], prefer_cuda=True) == (cuda, "cache (llama-cpp-python-0.3.36-cuda-sm90-avx2)")
    assert cached_server(BuildSpec("cuda")) == (cuda, BuildSpec("cuda", "90"))  # --llamabench-backend=cuda
    assert resolve([(str(cpu), "LLAMABENCH_SERVER_BIN")], prefer_cuda=True) == (cpu, "LLAMABENCH_SERVER_BIN")


def test_without_a_cuda_build_gpu_sessions_use_the_cpu_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMABENCH_CACHE_DIR", str(tmp_path / "cache"))
    cpu = _fake_build(BuildSpec())
    assert cached_server(BuildSpec(), prefer_cuda=True) == (cpu, BuildSpec())
    assert cached_server(BuildSpec("cuda", "80")) is None


def test_which_server_finds_the_cuda_build(two_builds: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cpu, cuda = two_builds
    (cuda.parent / "build-info.json").write_text(json.dumps({"source": {"description": "trimmed sdist X"}}))
    assert main(["which-server", "--backend", "cuda"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cuda}  (from cache (llama-cpp-python-0.3.36-cuda-sm90-avx2))")
    assert "commit 0c1e570" in out and "source: trimmed sdist X" in out
    assert main(["which-server", "--backend", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(str(cpu))


def test_an_unknown_vocab_name_is_a_config_error(pinned_fake: Path) -> None:
    with pytest.raises(ConfigError, match="kept: ggml-vocab-qwen2.gguf"):
        build.vocab_file("nope", sdist=pinned_fake, log=lambda m: None)


def test_trim_sdist_command(pinned_fake: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.tar.gz"
    assert main(["trim-sdist", str(pinned_fake), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == sorted(KEPT)


def test_a_second_build_of_the_same_key_waits_instead_of_deleting_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes building one key: the second used to delete the first's work dir mid-build."""
    import fcntl
    import threading

    monkeypatch.setenv("LLAMABENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_build_locked", lambda *a: pytest.fail("built twice"))
    spec = BuildSpec()
    lock_path = tmp_path / "cache" / "llama.cpp" / f"{spec.key}.lock"
    lock_path.parent.mkdir(parents=True)
    messages: list[str] = []
    with lock_path.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "the first build" runs
        waiter = threading.Thread(target=lambda: messages.append(str(build.build(spec, log=messages.append))))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and "another process is building it" in messages[0]
        spec.bin_dir.mkdir(parents=True)
        for target in build.TARGETS:  # the first build finishes
            (spec.bin_dir / target).write_text("#!/bin/sh\n")
            (spec.bin_dir / target).chmod(0o755)
    waiter.join(10)
    assert messages[-1] == str(spec.bin_dir)
