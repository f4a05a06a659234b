"""Many streamed completions at once: one ``httpx.AsyncClient`` on one event loop.

The concurrent load workload (``measure/load.py``) sends its requests through this, so the
client costs one thread however many streams are open. Each stream records the client-side
arrival time of every token event, like ``LlamaClient`` does for one request at a time, and
the server's slot use is read from ``/metrics`` (when the server runs with ``--metrics``) or
``/slots``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx

from pytest_llamabench.errors import RequestFailed
from pytest_llamabench.server.client import StreamCollector, StreamResult, stream_body, stream_counter, timed_out

_PROCESSING = re.compile(r"^llamacpp:requests_processing\s+([0-9.eE+-]+)\s*$", re.MULTILINE)


class AsyncStreams:
    """``async with AsyncStreams(url, ...) as streams: await streams.completion(path, payload)``."""

    def __init__(self, base_url: str, *, api_key: str | None, timeout_s: float, timeout_hint: str,
                 connections: int) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.timeout_hint = timeout_hint
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=connections + 1, max_keepalive_connections=0)  # + the slot poller
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                       timeout=httpx.Timeout(timeout_s, connect=10.0))  # fmt: skip

    async def __aenter__(self) -> AsyncStreams:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def completion(self, path: str, payload: Mapping[str, Any]) -> StreamResult:
        """POST ``/completion`` (tokens counted from its ``tokens`` arrays) or ``/v1/completions``
        (one token per text delta), streamed."""
        body = stream_body(path, payload)
        stream = StreamCollector(path, stream_counter(path))
        try:
            # a fresh connection per request, as LlamaClient does (a pooled one the server closed
            # shows up as "disconnected without sending a response")
            async with self._http.stream("POST", path, json=body, headers={"Connection": "close"}) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise RequestFailed(f"POST {path} answered {response.status_code}: {response.text[:300]}")
                async for line in response.aiter_lines():
                    if not stream.take(line):
                        break
        except httpx.TimeoutException as exc:
            raise timed_out("POST", path, self.timeout_s, self.timeout_hint, exc) from exc
        except httpx.HTTPError as exc:
            raise stream.broken(self.base_url, exc) from exc
        return stream.result()

    async def busy_slots(self, source: str) -> int | None:
        """Slots processing a request now, from ``/metrics`` or ``/slots``; None if unreadable."""
        try:
            response = await self._http.get(source, timeout=5.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        if source == "/metrics":
            match = _PROCESSING.search(response.text)
            return round(float(match.group(1))) if match else None
        try:
            slots = response.json()
        except ValueError:
            return None
        if not isinstance(slots, list):
            return None
        return sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))


__all__ = ["AsyncStreams"]
