"""In-process asynchronous front of the engine: ``async for event in engine.generate(request)``.

A background thread runs the same loop as the worker process (``loop.EngineLoop``) over a
``queue.Queue`` of protocol messages; each request gets an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``. Leaving the ``async for`` early (client gone) cancels the request
in the engine. ``close()`` cancels what is left. A device error (``faults.EngineDead``) ends every
stream with ``worker_died`` and every later ``generate`` at once. The server uses the worker process
instead; this serves benchmarks, tests and embedding the engine in another asyncio program.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from .faults import EngineDead
from .loop import EngineLoop, failed
from .protocol import Cancel, ErrorCode, EventKind, GenerationRequest, Shutdown, Submit
from .request import EngineEvent

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.dead: str | None = None  # why the engine died (a device error), else None
        self._loop = EngineLoop(engine, self._emit, idle_wait_s=0.1)
        self._thread = threading.Thread(target=self._run, name="bitdance-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        if self.dead is not None:
            yield failed(request.request_id, ErrorCode.WORKER_DIED, f"the engine is dead: {self.dead}")
            return
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[request.request_id] = (loop, q)
        self._commands.put(Submit(request))
        finished = False
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.kind in (EventKind.COMPLETED, EventKind.FAILED):
                    finished = True
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._commands.put(Cancel(request.request_id))

    def cancel(self, request_id: str) -> None:
        self._commands.put(Cancel(request_id))

    def close(self) -> None:
        self._commands.put(Shutdown(drain=False))
        self._thread.join(timeout=30)

    def _emit(self, ev: EngineEvent) -> None:
        target = self._streams.get(ev.request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, ev)

    def _run(self) -> None:
        try:
            self._loop.run(self._commands)
        except EngineDead as e:
            self.dead = str(e)
            logger.critical("engine dead: %s", e)
            for rid in list(self._streams):
                self._emit(failed(rid, ErrorCode.WORKER_DIED, f"the engine is dead: {e}"))
