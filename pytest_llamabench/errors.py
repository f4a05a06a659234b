"""One error hierarchy for everything pytest-llamabench reports.

Every message says what failed, where the value came from (file:key, flag,
env var) and how to fix it. ``kind`` is a short stable label used in the
results table and the JSON report (``"oom-gpu"``, ``"unsupported-argument"``, ...).
"""

from __future__ import annotations


class LlamabenchError(Exception):
    """Base class: a problem pytest-llamabench can explain in one message."""

    kind = "error"

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail
        self.context: dict[str, object] = {}  # builtin-typed facts for reports (server args, model)

    def __str__(self) -> str:
        return self.message

    @property
    def summary(self) -> str:
        """One line for tables: the kind and the first line of the message."""
        return f"{self.kind}: {self.message.splitlines()[0]}"


class ConfigError(LlamabenchError):
    """A config file, option, env var or ini value is invalid."""

    kind = "config"


class BuildError(LlamabenchError):
    """llama.cpp could not be fetched or built."""

    kind = "build"


# -- failures of a server launch -------------------------------------------------


class ServerStartError(LlamabenchError):
    """llama-server did not become ready."""

    kind = "start-failed"


class ServerOutOfMemory(ServerStartError):
    """An allocation failed (model weights, KV cache or compute buffer).

    ``device`` is ``"gpu"`` or ``"host"``; ``requested_mib`` and ``buffer`` are
    filled when the log says what was asked for.
    """

    kind = "oom"

    def __init__(
        self,
        message: str,
        *,
        device: str,
        requested_mib: float | None = None,
        buffer: str | None = None,
        log_tail: str = "",
    ) -> None:
        super().__init__(message, log_tail=log_tail)
        self.device = device
        self.requested_mib = requested_mib
        self.buffer = buffer

    @property
    def summary(self) -> str:
        return f"OOM ({self.device}): {self.message.splitlines()[0]}"


class UnsupportedArgument(ServerStartError):
    """The llama-server build does not know a flag or value."""

    kind = "unsupported-argument"


class UnsupportedArchitecture(ServerStartError):
    """The llama-server build cannot load this model architecture."""

    kind = "unsupported-architecture"


class ChatTemplateError(ServerStartError):
    """The chat template given to the server (a file or a built-in name) does not parse or is unknown."""

    kind = "bad-template"


class ModelLoadError(ServerStartError):
    """The model file is missing, not GGUF, truncated or otherwise unloadable."""

    kind = "bad-model"


class ServerCrashed(ServerStartError):
    """The server was killed by a signal (SIGILL, SIGSEGV, ...)."""

    kind = "crash"


class ServerNotReady(ServerStartError):
    """The server did not answer /health 200 before the deadline."""

    kind = "not-ready"


class ServerExited(ServerStartError):
    """The server exited for a reason the log does not explain."""

    kind = "exited"


class DockerUnavailable(ServerStartError):
    """The Docker daemon cannot be reached, or the image is missing."""

    kind = "docker"


class GpuUnavailable(ServerStartError):
    """A GPU was required and none is usable."""

    kind = "no-gpu"


# -- failures while measuring -----------------------------------------------------


class ServerDied(LlamabenchError):
    """The server process went away while a workload was running."""

    kind = "server-died"


class RequestFailed(LlamabenchError):
    """A request failed, timed out or returned malformed data."""

    kind = "request-failed"


class RequestTimedOut(RequestFailed):
    """The server sent nothing for longer than the request timeout."""


class StreamDroppedEarly(RequestFailed):
    """The stream closed before its first event while the server lived (seen with a CUDA build)."""


class MeasurementInvalid(LlamabenchError):
    """A run did not do the work it was asked to (token counts, cache reuse)."""

    kind = "invalid-measurement"


class ThresholdNotMet(LlamabenchError):
    """A measured value missed a configured threshold."""

    kind = "threshold"


# -- quant quality (quality/: llama-perplexity, llama-quantize) ---------------------


class CorpusError(ConfigError):
    """A quality workload's corpus is missing, unreadable, or too short for two contexts."""

    kind = "bad-corpus"


class ToolMissing(ConfigError):
    """A llama.cpp tool (llama-perplexity, llama-quantize) is not beside the llama-server in use."""

    kind = "missing-tool"


class VocabularyMismatch(ConfigError):
    """A model and its quality reference have different vocabularies: KL divergence is meaningless."""

    kind = "vocab-mismatch"


class QualityRunFailed(LlamabenchError):
    """llama-perplexity or llama-quantize failed, or printed no result."""

    kind = "quality-failed"
