"""Server-sent events: framing, and a route's stream of one request (plain waits: :mod:`server.waits`).

Frames are ``event: <name>\\ndata: <one-line JSON>\\n\\n``; a ``: ping`` comment goes out after
``heartbeat_s`` of silence so proxies keep the connection. A stream always ends with exactly one
terminal frame (``completed`` or ``error``, or the OpenAI equivalents) because the mailbox hands
out the terminal event last and exactly once. If the client goes away first (the ASGI server
cancels the streaming task), the request is cancelled in the worker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from bitdance_core.engine.protocol import ErrorCode
from server.jobs import Job
from server.mailbox import RequestState

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
FIRST_EVENT_WAIT_S = 5.0  # how long a stream waits for the worker's verdict before sending headers

Event = tuple[str, dict[str, Any]]


class WorkerPool(Protocol):
    """What the waits need of the pool (or of the shared queue, :mod:`server.dispatch`)."""

    def cancel(self, st: RequestState, code: str = ..., message: str = ...) -> None: ...

Renderer = Callable[[Event], Iterable[bytes]]


def frame(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def first_event(st: RequestState, timeout: float = FIRST_EVENT_WAIT_S) -> Event | None:
    """The worker's first event (``queued`` or an early ``failed``), so a stream can still answer
    422 / 429 before committing to 200. None if it takes longer; the stream then starts anyway."""
    return await st.get(timeout=timeout)


async def event_stream(
    st: RequestState, pool: WorkerPool, render: Renderer, heartbeat_s: float, first: Event | None = None
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            for chunk in render(first):
                yield chunk
        while not st.exhausted:
            item = await st.get(timeout=heartbeat_s)
            if item is None:
                if not st.exhausted:
                    yield b": ping\n\n"
                continue
            for chunk in render(item):
                yield chunk
    finally:  # client gone (or the server cancelled us): free the rows now
        _cancel_if_open(st, pool)


def sse_response(
    st: RequestState,
    pool: WorkerPool,
    render: Renderer,
    heartbeat_s: float,
    first: Event | None,
    headers: dict[str, str],
) -> StreamingResponse:
    return _SSEResponse(
        event_stream(st, pool, render, heartbeat_s, first),
        on_close=lambda: _cancel_if_open(st, pool),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


async def job_events(job: Job, pool: WorkerPool, heartbeat_s: float, cancel_on_close: bool) -> AsyncIterator[bytes]:
    """A job's SSE log from the start, then live; cancels the job on close only if asked (a
    streaming ``/generate`` owns its job; ``/v1/jobs/{id}/events`` only watches)."""
    try:
        async for item in job.follow(heartbeat_s):
            yield b": ping\n\n" if item is None else frame(*item)
    finally:
        if cancel_on_close:
            _cancel_if_open(job.st, pool)
        if job.on_close is not None:
            job.on_close()


def job_response(
    job: Job, pool: WorkerPool, heartbeat_s: float, cancel_on_close: bool, headers: dict[str, str]
) -> StreamingResponse:
    on_close = (lambda: _cancel_if_open(job.st, pool)) if cancel_on_close else (lambda: None)
    return _SSEResponse(
        job_events(job, pool, heartbeat_s, cancel_on_close),
        on_close=on_close,
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


def _cancel_if_open(st: RequestState, pool: WorkerPool) -> None:
    if not st.finished:
        pool.cancel(st, ErrorCode.CANCELLED.value, "client disconnected")


class _SSEResponse(StreamingResponse):
    """Also cancels when the client leaves before the body iterator ever ran (its ``finally``
    would then never run)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
