"""Turn a failed launch (exit status + server log) into one typed exception.

The patterns are real llama.cpp log lines (see tests/test_classify.py for the
lines they were taken from). Order matters: the most specific cause wins, and
nothing that is not an allocation failure is ever called an OOM.
"""

from __future__ import annotations

import re
import signal

from pytest_llamabench.errors import (
    ChatTemplateError,
    ModelLoadError,
    ServerCrashed,
    ServerExited,
    ServerOutOfMemory,
    ServerStartError,
    UnsupportedArchitecture,
    UnsupportedArgument,
)

_MIB = 1024 * 1024

# "cudaMalloc failed: out of memory" comes with the request size on the line before:
# "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 21615.00 MiB on device 0: cudaMalloc failed: out of memory"
_GPU_ALLOC = re.compile(r"allocating ([\d.]+) MiB on device (\d+): cudaMalloc failed: out of memory")
_GPU_BUFFER = re.compile(r"failed to allocate (CUDA\d+|ROCm\d+|Vulkan\d+|Metal|SYCL\d+)(?:_Host)? buffer of size (\d+)")
_HOST_MALLOC = re.compile(r"insufficient memory \(attempted to allocate ([\d.]+) MB\)")
_HOST_BUFFER = re.compile(r"failed to allocate (CPU)(?:_\w+)? buffer of size (\d+)")
_CUDA_OOM = re.compile(r"(cudaMalloc failed: out of memory|CUDA error: out of memory|out of memory on device)")

_BUFFER_KINDS = (
    ("kv cache", re.compile(r"buffer for kv cache|kv_self|llama_kv_cache|KV buffer", re.I)),
    ("compute", re.compile(r"compute buffer|sched_reserve|ggml_gallocr_reserve|graph_reserve", re.I)),
    ("model", re.compile(r"load_tensors|model buffer|failed to load model|llama_model_load", re.I)),
)

_UNKNOWN_ARG = re.compile(
    r"error: (?:invalid|unknown) argument: (\S+)|error while handling argument \"([^\"]+)\":?\s*(.*)", re.I
)
# "error: the supplied chat template is not supported: <template>" (a --chat-template-file or name the
# server cannot parse), after "common_chat_verify_template: failed to apply template: <why>"
_BAD_TEMPLATE = re.compile(r"the supplied chat template is not supported|chat template parsing error: (.*)")
_TEMPLATE_WHY = re.compile(r"failed to apply template: (.*)|chat template parsing error: (.*)")
_TEMPLATE_ARG = re.compile(r"--chat-template(?:-file)? (\S+)")
_UNKNOWN_ARCH = re.compile(r"unknown model architecture: '([^']+)'")
_BAD_MODEL = re.compile(
    r"(failed to read magic|failed to read key-value pairs|invalid magic characters|gguf_init_from_file\w*: failed|"
    r"tensor '[^']+' data is not within the file bounds|failed to read tensor info|"
    r"unable to open file|failed to open GGUF file|model file does not exist|"
    r"error loading model: )"
)

_SIGNAL_HINTS = {
    signal.SIGILL: "illegal instruction: the binary was built for CPU instructions this machine "
    "lacks (a GGML_NATIVE build from another CPU?); rebuild with `python -m pytest_llamabench "
    "build-server --force` or point --llamabench-server-bin at a portable build",
    signal.SIGKILL: "killed (SIGKILL): often the kernel's OOM killer or a container memory limit",
    signal.SIGSEGV: "segmentation fault inside llama-server",
    signal.SIGABRT: "aborted (an assertion in llama.cpp failed)",
    signal.SIGBUS: "bus error (a truncated or changed memory-mapped model file?)",
}


def _buffer_kind(log: str) -> str | None:
    tail = "\n".join(log.splitlines()[-40:])
    for kind, pattern in _BUFFER_KINDS:
        if pattern.search(tail):
            return kind
    return None


def classify_failure(
    log: str, returncode: int | None, *, oom_killed: bool = False, what: str = "llama-server"
) -> ServerStartError:
    """Classify why ``what`` stopped. ``returncode`` < 0 is a signal (Popen style)."""
    tail = "\n".join(log.rstrip().splitlines()[-30:])
    status = _describe_status(returncode)

    if (m := _GPU_ALLOC.search(log)) or _CUDA_OOM.search(log) or (m := _GPU_BUFFER.search(log)):
        requested, device = _gpu_request(log)
        buffer = _buffer_kind(log)
        detail = f"{requested:.0f} MiB on {device}" if requested is not None else f"on {device}"
        return ServerOutOfMemory(
            f"out of memory on the GPU: {buffer or 'a'} buffer of {detail} could not be allocated "
            f"({status}); offload more to the CPU (-ot exps=CPU, --n-cpu-moe), lower ctx, "
            "quantize the KV cache, or mark the config expect = \"oom\"",
            device="gpu", requested_mib=requested, buffer=buffer, log_tail=tail,
        )  # fmt: skip
    if (m := _HOST_MALLOC.search(log)) or (m := _HOST_BUFFER.search(log)):
        requested = float(m.group(1)) if m.re is _HOST_MALLOC else int(m.group(2)) / _MIB
        buffer = _buffer_kind(log)
        return ServerOutOfMemory(
            f"out of memory on the host: {buffer or 'a'} buffer of {requested:.0f} MiB could not "
            f"be allocated ({status}); lower ctx, quantize the KV cache, or mark the config "
            'expect = "oom"',
            device="host", requested_mib=requested, buffer=buffer, log_tail=tail,
        )  # fmt: skip
    if oom_killed or (returncode == -signal.SIGKILL and "Killed process" in log):
        return ServerOutOfMemory(
            f"{what} was OOM-killed ({status}): the host or container ran out of memory",
            device="host", log_tail=tail,
        )  # fmt: skip
    if m := _UNKNOWN_ARG.search(log):
        arg, why = m.group(1) or m.group(2), (m.group(3) or "").strip()
        return UnsupportedArgument(
            f"this llama-server build does not accept {arg!r}{': ' + why if why else ''} "
            f"({status}); fix or remove it in the config, or use a newer build ("
            "--llamabench-server-bin, build-server)",
            log_tail=tail,
        )
    if _BAD_TEMPLATE.search(log):
        why = _TEMPLATE_WHY.search(log)
        given = _TEMPLATE_ARG.search(log.split("\n", 1)[0])  # the argv line the launcher wrote first
        what_template = f"chat template {given.group(1)}" if given else "the GGUF's chat template"
        detail = f": {(why.group(1) or why.group(2)).strip()[:200]}" if why else ""
        return ChatTemplateError(
            f"{what} rejected {what_template}: it does not parse{detail} ({status}); fix the template, or "
            'set chat_template = "gguf" (the model\'s own) or a built-in name such as "chatml" in the config',
            log_tail=tail,
        )
    if m := _UNKNOWN_ARCH.search(log):
        return UnsupportedArchitecture(
            f"this llama-server build cannot load architecture {m.group(1)!r} ({status}); "
            "build a newer llama.cpp that supports it",
            log_tail=tail,
        )
    if _BAD_MODEL.search(log):
        return ModelLoadError(
            f"{what} could not load the model file ({status}): {_first_error(log)}", log_tail=tail
        )
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode)
        hint = _SIGNAL_HINTS.get(sig, f"killed by {sig.name}")
        return ServerCrashed(f"{what} crashed: {hint} ({status})", log_tail=tail)
    if returncode == 132:  # 128 + SIGILL, as a shell or container reports it
        return ServerCrashed(f"{what} crashed: {_SIGNAL_HINTS[signal.SIGILL]} ({status})", log_tail=tail)
    return ServerExited(f"{what} exited ({status}): {_first_error(log)}", log_tail=tail)


def _gpu_request(log: str) -> tuple[float | None, str]:
    if m := _GPU_ALLOC.search(log):
        return float(m.group(1)), f"device {m.group(2)}"
    if m := _GPU_BUFFER.search(log):
        return int(m.group(2)) / _MIB, m.group(1)
    return None, "the GPU"


def _describe_status(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"\b(E|error|failed)\b", line) and "no API key" not in line:
            return re.sub(r"^[\d.]+ [EWI] ", "", line.strip())[:300]
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "the log is empty"
