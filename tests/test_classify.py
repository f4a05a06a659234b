"""Failure classification from real llama.cpp log lines.

The CPU lines were produced by this project's llama-server build on this machine
(see the test names); the CUDA lines are the messages of ggml-cuda.cu and
llama.cpp's loader, as printed on real GPUs (ggml_backend_cuda_buffer_type_alloc_buffer,
alloc_tensor_range), confirmed for real on the GPU in the GPU run.
"""

from __future__ import annotations

import signal

import pytest

from pytest_llamabench.server.classify import classify_failure
from pytest_llamabench.errors import (
    ModelLoadError,
    ServerCrashed,
    ServerExited,
    ServerOutOfMemory,
    UnsupportedArchitecture,
    UnsupportedArgument,
)

HOST_KV_OOM = """\
0.00.137.892 W llama_context: n_ctx_seq (4000000) > n_ctx_train (8192) -- possible training context overflow
0.00.275.037 E ggml_aligned_malloc: insufficient memory (attempted to allocate 87890.62 MB)
0.00.275.059 E ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 92160000000
0.00.275.060 E alloc_tensor_range: failed to allocate CPU buffer of size 92160000000
0.00.290.762 E llama_init_from_model: failed to initialize the context: failed to allocate buffer for kv cache
0.00.291.328 E srv  llama_server: exiting due to model loading error
"""

GPU_MODEL_OOM = """\
load_tensors: offloading 40 repeating layers to GPU
ggml_backend_cuda_buffer_type_alloc_buffer: allocating 21615.00 MiB on device 0: cudaMalloc failed: out of memory
alloc_tensor_range: failed to allocate CUDA0 buffer of size 22665241600
llama_model_load: error loading model: unable to allocate CUDA0 buffer
llama_model_load_from_file_impl: failed to load model
"""

GPU_COMPUTE_OOM = """\
llama_context: n_ctx = 65536
ggml_backend_cuda_buffer_type_alloc_buffer: allocating 2504.02 MiB on device 0: cudaMalloc failed: out of memory
ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 2625656832
graph_reserve: failed to allocate compute buffers
llama_init_from_model: failed to initialize the context: failed to allocate compute pp buffers
"""


def test_host_kv_cache_oom_from_this_build() -> None:
    exc = classify_failure(HOST_KV_OOM, 1)
    assert isinstance(exc, ServerOutOfMemory)
    assert (exc.device, exc.buffer) == ("host", "kv cache")
    assert exc.requested_mib == pytest.approx(87890.62)
    assert "87891 MiB" in exc.message and "exit status 1" in exc.message


def test_gpu_model_oom() -> None:
    exc = classify_failure(GPU_MODEL_OOM, 1)
    assert isinstance(exc, ServerOutOfMemory)
    assert (exc.device, exc.requested_mib, exc.buffer) == ("gpu", 21615.0, "model")
    assert "21615 MiB on device 0" in exc.message


def test_gpu_compute_buffer_oom() -> None:
    exc = classify_failure(GPU_COMPUTE_OOM, 1)
    assert isinstance(exc, ServerOutOfMemory)
    assert (exc.device, exc.buffer) == ("gpu", "compute")


def test_oom_killer() -> None:
    exc = classify_failure("llama_model_loader: loaded meta data\n", -signal.SIGKILL, oom_killed=True)
    assert isinstance(exc, ServerOutOfMemory) and exc.device == "host"


@pytest.mark.parametrize(
    ("log", "code", "kind", "text"),
    [
        ("error: invalid argument: --bogus-flag\n", 1, UnsupportedArgument, "'--bogus-flag'"),
        ('error while handling argument "--fit": error: unknown value for --fit: \'maybe\'\n', 1,
         UnsupportedArgument, "unknown value for --fit"),
        ("llama_model_load: error loading model: error loading model architecture: unknown model architecture: 'qwen35moe'\n",
         1, UnsupportedArchitecture, "'qwen35moe'"),
        ("E gguf_init_from_reader: invalid magic characters: 'notg', expected 'GGUF'\n", 1, ModelLoadError, "magic"),
        ("E gguf_init_from_reader: failed to read key-value pairs\n", 1, ModelLoadError, "key-value"),
        ("main: loading model\n", -signal.SIGILL, ServerCrashed, "instructions this machine lacks"),
        ("", 132, ServerCrashed, "illegal instruction"),
        ("main: loading model\n", -signal.SIGSEGV, ServerCrashed, "segmentation fault"),
        ("E srv  something else went wrong\n", 3, ServerExited, "exit status 3"),
    ],
)  # fmt: skip
def test_other_kinds(log: str, code: int, kind: type, text: str) -> None:
    exc = classify_failure(log, code)
    assert type(exc) is kind
    assert text in exc.message


def test_an_unknown_flag_is_never_an_oom_even_with_oom_words_later() -> None:
    log = "error: invalid argument: --n-cpu-moe-typo\nhint: out of memory? no\n"
    assert isinstance(classify_failure(log, 1), UnsupportedArgument)
