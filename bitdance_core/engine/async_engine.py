"""In-process asynchronous front of the engine: ``async for event in engine.generate(request)``.

A background thread runs the engine's step loop; each request gets an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``. Leaving the ``async for`` early (client gone) cancels the request
in the engine. The server uses the worker process instead; this serves benchmarks, tests and
embedding the engine in another asyncio program.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from ..serving_config import InvalidRequest
from .protocol import ErrorCode, EventKind, GenerationRequest
from .request import EngineEvent

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bitdance-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[request.request_id] = (loop, q)
        self._commands.put(("add", request))
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
                self._commands.put(("cancel", request.request_id))

    def cancel(self, request_id: str) -> None:
        self._commands.put(("cancel", request_id))

    def close(self) -> None:
        self._stop.set()
        self._commands.put(("noop", None))
        self._thread.join(timeout=30)

    def _emit(self, ev: EngineEvent) -> None:
        target = self._streams.get(ev.request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, ev)

    def _run(self) -> None:
        while not self._stop.is_set():
            cmds: list = []
            try:
                idle = not self.engine.has_work()
                cmds.append(self._commands.get(timeout=0.1) if idle else self._commands.get_nowait())
                while True:
                    cmds.append(self._commands.get_nowait())
            except queue.Empty:
                pass
            for kind, arg in cmds:
                if kind == "add":
                    try:
                        self._emit(self.engine.add_request(arg))
                    except InvalidRequest as e:
                        self._emit(EngineEvent(arg.request_id, EventKind.FAILED,
                                               {"code": e.code, "message": str(e), "field": e.field}))
                elif kind == "cancel":
                    ev = self.engine.cancel(arg)
                    if ev is not None:
                        self._emit(ev)
            if self.engine.has_work():
                for ev in self.engine.step():
                    self._emit(ev)
        for rid in list(self.engine.requests):
            self._emit(EngineEvent(rid, EventKind.FAILED, {"code": ErrorCode.SHUTTING_DOWN.value,
                                                           "message": "engine closed"}))
