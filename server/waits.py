"""How a route waits on a request it submitted: the one place for the wait, the 499 and the failure.

* :func:`first_or_refuse`: the worker's first event; an early ``failed`` one (queue full, a prompt too long in
  tokens) is raised as its HTTP error, so a stream or a job can still answer 4xx before committing to 200.
* :func:`completed`: the ``completed`` event's data of a plain (non-streaming) request. A ``failed`` end is raised
  as its HTTP error (:meth:`APIError.from_failed`); a client that disconnects first cancels the request in the
  worker and raises :class:`ClientGone`, which :func:`install` answers with a bare 499 (nobody is listening).

Used by ``/generate``, ``/v1/images/generations`` and ``/sdapi/v1/txt2img``; streams end through
:mod:`server.sse` instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from bitdance_core.engine.protocol import ErrorCode
from server.errors import APIError
from server.mailbox import RequestState
from server.sse import Event, WorkerPool, first_event


class ClientGone(Exception):
    """The client disconnected while a plain (non-streaming) response was pending (answered 499)."""


async def first_or_refuse(st: RequestState) -> Event | None:
    """The first event (None when the worker is slower than ``FIRST_EVENT_WAIT_S``); an early failure raised."""
    first = await first_event(st)
    if first is not None and first[0] == "failed":
        raise APIError.from_failed(first[1])
    return first


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_result(request: Request, st: RequestState, pool: WorkerPool) -> Event:
    """The terminal event of ``st``; cancels it in the worker if the client disconnects first."""
    result = asyncio.ensure_future(st.result())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        pool.cancel(st, ErrorCode.CANCELLED.value, "request handler cancelled")
        raise
    finally:
        for task in (result, gone):
            if not task.done():
                task.cancel()
    if result in done:
        return result.result()
    pool.cancel(st, ErrorCode.CANCELLED.value, "client disconnected")
    raise ClientGone


async def completed(request: Request, st: RequestState, pool: WorkerPool) -> dict[str, Any]:
    """The ``completed`` data of ``st``; raises ``APIError`` when it failed, ``ClientGone`` when the client left."""
    kind, data = await wait_result(request, st, pool)
    if kind == "failed":
        raise APIError.from_failed(data)
    return data


def install(app: FastAPI) -> None:
    """Answer :class:`ClientGone` with a bare 499 (nginx's "client closed request")."""

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)
