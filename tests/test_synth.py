"""Synthetic GGUF models: real shapes and quant recipes, valid random data, loadable by llama-server."""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from pytest_llamabench.model import synth
from pytest_llamabench.errors import ConfigError
from pytest_llamabench.model.digest import stat_key
from pytest_llamabench.model.files import verify_model

TINY = [(shape, quant) for shape in ("tiny-qwen3moe", "tiny-qwen35moe") for quant in synth.RECIPES]

# Reference data from real files (llama.cpp load logs): tensor count and F32 tensor count.
REAL_TENSOR_COUNTS = {"qwen3-30b-a3b": (579, 241), "qwen35-35b-a3b": (733, 301)}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, server_bin: Path) -> Iterator[Path]:
    """A private project cache, so the sha256 cache of the user is never touched.

    Depends on ``server_bin`` so the session's llama-server is resolved (in the real cache)
    before the override: else a later ``server_bin`` would look in this empty cache and rebuild.
    """
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMABENCH_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("models")
    logs: list[str] = []
    return {
        (shape, quant): synth.write_synthetic_model(
            shape, quant, out / synth.default_file_name(synth.SHAPES[shape], quant), log=logs.append
        )
        for shape, quant in TINY
    }


@pytest.fixture(scope="module")
def readers(tiny_models: dict[tuple[str, str], Path]) -> dict[tuple[str, str], GGUFReader]:
    return {key: GGUFReader(path, "r") for key, path in tiny_models.items()}


def expected_type(shape: synth.ModelShape, quant: str, name: str, ne: tuple[int, ...], i_v: int, n_v: int) -> str:
    """llama-quantize's choice, restated from src/llama-quant.cpp for these tensors (no 8-expert model)."""
    if len(ne) == 1 or "norm" in name or not name.endswith(".weight") or "gate_inp" in name or "conv1d" in name:
        return "F32"
    if quant == "q8_0":
        return "Q8_0"
    more = synth.use_more_bits
    if name == "output.weight":
        return "Q6_K"
    if name.endswith(("attn_v.weight", "attn_qkv.weight")):
        return "Q6_K" if more(i_v, n_v) else "Q4_K"
    if ".ffn_down" in name:
        return "Q6_K" if more(int(name.split(".")[1]), shape.n_layer) else "Q4_K"
    return "Q4_K"


def test_use_more_bits_matches_llama_quantize() -> None:
    # i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, with C integer division; n = 48 gives 24 layers
    chosen = [i for i in range(48) if synth.use_more_bits(i, 48)]
    assert chosen[:6] == list(range(6)) and chosen[-6:] == list(range(42, 48))
    assert all((i - 6) % 3 == 2 for i in chosen[6:-6])
    assert len(chosen) == 6 + 6 + len(range(8, 42, 3))


@pytest.mark.parametrize("shape,quant", TINY)
def test_tiny_model_verifies_with_sha256_cached_at_write(
    tiny_models: dict[tuple[str, str], Path], cache_dir: Path, shape: str, quant: str
) -> None:
    path = tiny_models[shape, quant]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = json.loads((cache_dir / "sha256-cache.json").read_text())
    assert cache[str(path.resolve())] == {"stat": list(stat_key(path)), "sha256": digest}
    info = verify_model(path)
    model = synth.SHAPES[shape]
    assert info.sha256 == digest
    assert (info.architecture, info.n_layer, info.n_embd) == (model.arch, model.n_layer, model.n_embd)
    assert (info.n_head, info.n_head_kv, info.key_length) == (model.n_head, model.n_head_kv, model.head_dim)
    assert info.tensor_count == len(synth.tensor_shapes(model))
    assert not path.with_name(path.name + ".partial").exists()


@pytest.mark.parametrize("shape,quant", TINY)
def test_tiny_model_tensors_follow_the_recipe(
    readers: dict[tuple[str, str], GGUFReader], shape: str, quant: str
) -> None:
    model = synth.SHAPES[shape]
    reader = readers[shape, quant]
    written = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}
    wanted = synth.tensor_shapes(model)
    n_v = sum(name.endswith(("attn_v.weight", "attn_qkv.weight")) for name, _ in wanted)
    i_v = 0
    expected = {}
    for name, ne in wanted:
        expected[name] = (ne, expected_type(model, quant, name, ne, i_v, n_v))
        i_v += name.endswith(("attn_v.weight", "attn_qkv.weight"))
    assert written == expected
    types = {t for _, t in written.values()}
    assert types == ({"F32", "Q8_0"} if quant == "q8_0" else {"F32", "Q4_K", "Q6_K"})
    field = reader.get_field("general.file_type")
    assert field is not None and field.contents() == synth.RECIPES[quant].file_type


@pytest.mark.parametrize("shape,quant", TINY)
def test_tiny_model_weights_are_finite_and_small(
    readers: dict[tuple[str, str], GGUFReader], shape: str, quant: str
) -> None:
    samples = []
    for t in readers[shape, quant].tensors:
        values = dequantize(np.asarray(t.data[:64]), t.tensor_type).astype(np.float64).reshape(-1)
        assert np.isfinite(values).all(), t.name
        if t.name.endswith("norm.weight"):
            assert (values == 1.0).all(), t.name
        elif t.tensor_type != GGMLQuantizationType.F32:
            assert np.abs(values).max() < 10 * synth.WEIGHT_RMS, t.name
            samples.append(values)
    weights = np.concatenate(samples)
    rms = float(np.sqrt((weights**2).mean()))
    assert 0.5 * synth.WEIGHT_RMS < rms < 2 * synth.WEIGHT_RMS
    assert abs(float(weights.mean())) < 0.1 * rms


@pytest.mark.parametrize("shape,quant", TINY[:1])
def test_tiny_model_tokenizer_is_chatml_bpe_padded_to_vocab(
    readers: dict[tuple[str, str], GGUFReader], shape: str, quant: str
) -> None:
    reader = readers[shape, quant]

    def value(key: str) -> Any:
        field = reader.get_field(key)
        assert field is not None, key
        return field.contents()

    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == synth.SHAPES[shape].n_vocab == len(set(tokens))
    assert len(value("tokenizer.ggml.token_type")) == len(tokens)
    assert value("tokenizer.ggml.model") == "gpt2" and len(value("tokenizer.ggml.merges")) > 10_000
    assert tokens[value("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert tokens[value("tokenizer.ggml.bos_token_id")] == "<|endoftext|>"
    assert "<|im_start|>" in tokens and "<|im_start|>" in value("tokenizer.chat_template")


@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "qwen35-35b-a3b"])
def test_full_shape_matches_published_files(shape: str) -> None:
    model = synth.SHAPES[shape]
    for quant in synth.RECIPES:
        plan = synth.plan_tensors(model, quant)
        assert (len(plan), sum(t.qtype == "F32" for t in plan)) == REAL_TENSOR_COUNTS[shape]
        published = model.published_size(quant)
        if published is not None:
            size = synth.tensor_data_size(model, quant)
            assert abs(size / published - 1) < 0.05, (quant, size, published)


def test_qwen3_30b_sizes_are_within_5_percent_of_the_real_files() -> None:
    model = synth.SHAPES["qwen3-30b-a3b"]
    for quant, real in (("q8_0", 32.5e9), ("q4_k_m", 18.6e9)):  # Qwen3-30B-A3B-{Q8_0,Q4_K_M}.gguf
        assert abs(synth.tensor_data_size(model, quant) / real - 1) < 0.05, quant


def test_block_sizes_agree_with_gguf() -> None:
    for name, sizes in synth.BLOCK_SIZES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == sizes


def test_unknown_shape_and_recipe_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: qwen3-30b-a3b"):
        synth.write_synthetic_model("qwen9", "q8_0", tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="known: q8_0, q4_k_m"):
        synth.write_synthetic_model("tiny-qwen3moe", "q2_k", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_lists_shapes_and_writes_default_name(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    synth.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synth-model", "--list"])
    assert args.func(args) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in synth.SHAPES)
    args = parser.parse_args(["synth-model", "--shape", "tiny-qwen3moe", "--quant", "q8_0", "--out-dir", str(tmp_path)])
    assert args.func(args) == 0
    expected = tmp_path / synth.default_file_name(synth.SHAPES["tiny-qwen3moe"], "q8_0")
    assert capsys.readouterr().out.strip() == str(expected)
    cache = json.loads((cache_dir / "sha256-cache.json").read_text())
    assert cache[str(expected.resolve())]["sha256"] == hashlib.sha256(expected.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- real llama-server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get_json(base + "/health", timeout=5).get("status") == "ok":
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.3)
    pytest.fail(f"llama-server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("shape,quant", TINY)
def test_llama_server_loads_tiny_model_and_generates(
    server_bin: Path, tiny_models: dict[tuple[str, str], Path], tmp_path: Path, shape: str, quant: str
) -> None:
    server = str(server_bin)
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [server, "-m", str(tiny_models[shape, quant]), "--host", "127.0.0.1", "--port", str(port),
           "-c", "512", "-np", "1", "-t", "2", "--fit", "off", "-ngl", "0"]  # fmt: skip
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, base, log)
        result = _get_json(base + "/completion", {"prompt": "Hello", "n_predict": 16, "ignore_eos": True})
        assert result["timings"]["predicted_n"] == 16
        chat = _get_json(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 4})  # fmt: skip
        assert chat["choices"][0]["finish_reason"] == "length"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
