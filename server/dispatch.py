"""Where a route sends a request: the local worker pool (memory mode) or the shared queue (Redis).

The routes call these instead of the pool, so they read the same with one replica or many:
:func:`submit` gives the :class:`~server.mailbox.RequestState` to wait on, :func:`canceller`
the object whose ``cancel(st, code, message)`` ends it (the pool, or the shared queue, which
cancels it on whichever replica runs it).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from bitdance_core.engine.protocol import GenerationRequest
from server.mailbox import RequestState

IDEMPOTENCY_HEADER = "Idempotency-Key"


def shared(request: Request) -> Any:
    """The :class:`~server.shared_queue.SharedQueue`, or None in memory mode."""
    return getattr(request.app.state, "shared", None)


def canceller(request: Request) -> Any:
    return shared(request) or request.app.state.pool


async def submit(request: Request, req: GenerationRequest) -> RequestState:
    """A synchronous request (JSON, image or OpenAI); with a shared queue a job any replica may run."""
    queue = shared(request)
    if queue is None:
        return request.app.state.pool.submit(req)
    job = await queue.submit(req, "sync", request.headers.get(IDEMPOTENCY_HEADER))
    return job.st
