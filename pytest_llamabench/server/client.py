"""A small httpx client for llama-server: health, props, tokenize, streamed generation.

Streaming requests record the client-side arrival time of every token event,
so time to first token and inter-token latency are measured by the client,
while generation speed also comes from the server's own ``timings``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from pytest_llamabench.errors import RequestFailed, RequestTimedOut, StreamDroppedEarly


@dataclasses.dataclass
class StreamResult:
    """One streamed generation, as the client saw it."""

    sent_at: float
    token_times: list[float]  # perf_counter() at each event carrying tokens
    client_tokens: int  # tokens counted from the stream
    finished_at: float
    final: dict[str, Any]  # the last event: timings, usage, ...
    text: str

    @property
    def timings(self) -> dict[str, Any]:
        timings = self.final.get("timings")
        if not isinstance(timings, dict):
            raise RequestFailed(f"the server's final stream event has no timings: {_short(self.final)}")
        return timings


class LlamaClient:
    """Talks to one llama-server. ``api_key`` is sent, never logged."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        #: longest silence allowed during a streamed request, and what to say to raise it
        self.request_timeout_s = timeout
        self.timeout_hint = "raise the request timeout"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def health_status(self) -> int:
        """HTTP status of /health (200 ready, 503 loading); raises httpx errors."""
        return self._http.get("/health", timeout=5.0).status_code

    def props(self) -> dict[str, Any]:
        return self._json("GET", "/props")

    def tokenize(self, text: str) -> list[int]:
        tokens = self._json("POST", "/tokenize", json={"content": text, "add_special": False}).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise RequestFailed(f"POST /tokenize returned no list of token ids: {_short(tokens)}")
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        return str(self._json("POST", "/detokenize", json={"tokens": tokens})["content"])

    def completion(self, prompt: str | list[int], **params: Any) -> dict[str, Any]:
        """A non-streamed /completion, for users' own tests."""
        return self._json("POST", "/completion", json={"prompt": prompt, **params})

    def stream_completion(self, payload: Mapping[str, Any]) -> StreamResult:
        """POST /completion with stream=true; tokens counted from ``tokens`` arrays."""
        return self._stream("/completion", stream_body("/completion", payload), _completion_tokens)

    def stream_oai_completion(self, payload: Mapping[str, Any]) -> StreamResult:
        """POST /v1/completions with stream=true; one token per text delta."""
        return self._stream("/v1/completions", stream_body("/v1/completions", payload), _oai_text_tokens)

    def stream_chat(self, payload: Mapping[str, Any], count: Any = None) -> StreamResult:
        """POST /v1/chat/completions with stream=true; one token per content delta (``count``:
        another counter, e.g. one that also counts reasoning deltas)."""
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        return self._stream("/v1/chat/completions", body, count or _chat_tokens)

    def slots(self) -> list[dict[str, Any]]:
        """GET /slots: each slot's state and the parameters of its last task."""
        try:
            response = self._http.get("/slots", timeout=self._timeout())
            data = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            raise RequestFailed(f"GET /slots failed: {exc!r}") from exc
        if not isinstance(data, list):
            raise RequestFailed(f"GET /slots answered {response.status_code}: {response.text[:300]}")
        return [s for s in data if isinstance(s, dict)]

    def apply_template(self, messages: list[dict[str, Any]], **params: Any) -> str:
        """POST /apply-template: the prompt the server's chat template makes of ``messages``."""
        return str(self._json("POST", "/apply-template", json={"messages": messages, **params}).get("prompt", ""))

    # -- internals -----------------------------------------------------------------

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.request_timeout_s, connect=10.0)

    def _timed_out(self, method: str, path: str, exc: Exception) -> RequestTimedOut:
        return timed_out(method, path, self.request_timeout_s, self.timeout_hint, exc)

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, timeout=self._timeout(), **kwargs)
        except httpx.TimeoutException as exc:
            raise self._timed_out(method, path, exc) from exc
        except httpx.HTTPError as exc:
            raise RequestFailed(f"{method} {self.base_url}{path} failed: {exc!r}") from exc
        if response.status_code != 200:
            raise RequestFailed(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
        except ValueError as exc:
            raise RequestFailed(f"{method} {path} returned malformed JSON: {response.text[:300]!r}") from exc
        if not isinstance(data, dict):
            raise RequestFailed(f"{method} {path} returned {type(data).__name__}, expected an object")
        return data

    def _stream(self, path: str, body: Mapping[str, Any], count: Any) -> StreamResult:
        stream = StreamCollector(path, count)
        try:
            # a fresh connection per measured request: a pooled keep-alive connection that the
            # server has closed shows up as "disconnected without sending a response"
            with self._http.stream("POST", path, json=body, headers={"Connection": "close"},
                                   timeout=self._timeout()) as response:  # fmt: skip
                if response.status_code != 200:
                    response.read()
                    raise RequestFailed(f"POST {path} answered {response.status_code}: {response.text[:300]}")
                for line in response.iter_lines():
                    if not stream.take(line):
                        break
        except httpx.TimeoutException as exc:
            raise self._timed_out("POST", path, exc) from exc
        except httpx.HTTPError as exc:
            raise stream.broken(self.base_url, exc) from exc
        return stream.result()


class StreamCollector:
    """What one streamed generation adds up to, fed line by line by the sync client and the async
    one (``stream_async``) alike: the arrival time of every event carrying tokens, the tokens and
    text counted by ``count``, and the final event (timings, usage)."""

    def __init__(self, path: str, count: Callable[[dict[str, Any]], tuple[int, str]]) -> None:
        self.path = path
        self.count = count
        self.sent_at = time.perf_counter()
        self.token_times: list[float] = []
        self.client_tokens = 0
        self.text: list[str] = []
        self.final: dict[str, Any] = {}

    def take(self, line: str) -> bool:
        """One line of the stream; False at ``[DONE]``."""
        if not line.startswith("data: "):
            return True
        now = time.perf_counter()
        event = parse_event(line[len("data: ") :], self.path)
        if event is None:
            return False
        n, piece = self.count(event)
        if n:
            self.token_times.append(now)
            self.client_tokens += n
            self.text.append(piece)
        if "timings" in event or event.get("stop") is True:
            self.final = {**self.final, **event}
        return True

    def broken(self, base_url: str, exc: Exception) -> RequestFailed:
        """The error for a connection lost mid-stream: ``StreamDroppedEarly`` before any token or final event."""
        error = RequestFailed if (self.final or self.token_times) else StreamDroppedEarly
        return error(f"POST {base_url}{self.path} failed mid-stream: {exc!r}")

    def result(self) -> StreamResult:
        if not self.final:
            raise RequestFailed(f"POST {self.path}: the stream ended without a final event (no timings)")
        return StreamResult(self.sent_at, self.token_times, self.client_tokens, time.perf_counter(), self.final,
                            "".join(self.text))  # fmt: skip


def parse_event(data: str, path: str) -> dict[str, Any] | None:
    """One ``data:`` payload of a stream (sync or async client); None at ``[DONE]``."""
    if data == "[DONE]":
        return None
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise RequestFailed(f"POST {path}: malformed stream event {data[:200]!r}") from exc
    if not isinstance(event, dict):
        raise RequestFailed(f"POST {path}: stream event is not an object: {data[:200]!r}")
    if "error" in event:
        raise RequestFailed(f"POST {path}: server error in stream: {_short(event['error'])}")
    return event


def timed_out(method: str, path: str, timeout_s: float, hint: str, exc: Exception) -> RequestTimedOut:
    """The error for a request the server went silent on (sync and async clients)."""
    return RequestTimedOut(f"{method} {path}: the server sent nothing for {timeout_s:g} s ({type(exc).__name__}); {hint}")


def stream_body(path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A streamed completion's body: ``/completion`` returns token ids, ``/v1/completions`` a final usage event."""
    extra = {"return_tokens": True} if path == "/completion" else {"stream_options": {"include_usage": True}}
    return {**payload, "stream": True, **extra}


def stream_counter(path: str) -> Callable[[dict[str, Any]], tuple[int, str]]:
    """Tokens and text of one event: ``/completion`` (its ``tokens`` array) or ``/v1/completions``."""
    return _completion_tokens if path == "/completion" else _oai_text_tokens


def _completion_tokens(event: dict[str, Any]) -> tuple[int, str]:
    tokens = event.get("tokens") or []
    return len(tokens), str(event.get("content", ""))


def _oai_text_tokens(event: dict[str, Any]) -> tuple[int, str]:
    choices = event.get("choices") or []
    text = choices[0].get("text") if choices else None
    return (1, text) if text else (0, "")


def _chat_tokens(event: dict[str, Any]) -> tuple[int, str]:
    choices = event.get("choices") or []
    content = (choices[0].get("delta") or {}).get("content") if choices else None
    return (1, content) if content else (0, "")


def _short(value: object) -> str:
    return json.dumps(value)[:300]
