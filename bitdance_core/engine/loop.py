"""The engine's busy loop, shared by the worker process and ``AsyncEngine``.

One iteration: drain the inbox of protocol messages (``Submit`` / ``Cancel`` / ``Shutdown``; blocking
only while the engine has nothing to step) → one ``engine.step()`` → hand every event to ``emit``.
``Shutdown(drain=True)`` refuses new work and returns once what runs has finished;
``Shutdown(drain=False)`` (or ``None``, a closed inbox) cancels everything first. An
:class:`~bitdance_core.engine.faults.EngineDead` from the step propagates: the owner of the
device decides (the worker exits, ``AsyncEngine`` fails its streams).

The inbox is anything with ``get(timeout=)`` and ``get_nowait()`` raising ``queue.Empty`` (a
``multiprocessing`` queue in the worker, a ``queue.Queue`` in ``AsyncEngine``).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from .protocol import Cancel, ErrorCode, EventKind, Shutdown, Submit
from .request import EngineEvent
from .serving_config import InvalidRequest

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.2  # how long an idle loop blocks on the inbox before its periodic work (heartbeats)


def failed(request_id: str, code, message: str, field: str | None = None) -> EngineEvent:
    data = {"code": getattr(code, "value", code), "message": message}
    if field is not None:
        data["field"] = field
    return EngineEvent(request_id, EventKind.FAILED, data)


class EngineLoop:
    """``on_submit(request)`` runs before a request reaches the engine; ``on_step(step_s)`` after each
    step; ``on_tick()`` once per iteration (busy or idle); ``on_message(msg)`` handles any other message
    (the tokenizer's) between steps and returns True when it did."""

    def __init__(self, engine, emit: Callable[[EngineEvent], None], *,
                 on_submit: Callable | None = None, on_step: Callable[[float], None] | None = None,
                 on_tick: Callable[[], None] | None = None, idle_wait_s: float = IDLE_WAIT_S,
                 on_message: Callable[[object], bool] | None = None):
        self.engine, self.emit = engine, emit
        self.on_message = on_message
        self.on_submit, self.on_step, self.on_tick = on_submit, on_step, on_tick
        self.idle_wait_s = idle_wait_s
        self.draining = False
        self.cancelled = 0  # requests dropped by Cancel
        self.freed_rows = 0  # KV rows those cancels released (the engine's own count)

    def handle(self, msg) -> None:
        engine = self.engine
        if isinstance(msg, Submit):
            req = engine.with_defaults(msg.request)  # the worker's image metadata names the steps used
            rid = req.request_id
            if self.draining:
                self.emit(failed(rid, ErrorCode.SHUTTING_DOWN, "the worker is shutting down"))
                return
            if self.on_submit is not None:
                self.on_submit(req)
            try:
                self.emit(engine.add_request(req))
            except InvalidRequest as e:
                self.emit(failed(rid, e.code, str(e), e.field))
        elif isinstance(msg, Cancel):
            used = engine.scheduler.used_rows
            ev = engine.cancel(msg.request_id)
            if ev is not None:
                self.cancelled += 1
                self.freed_rows += used - engine.scheduler.used_rows
                self.emit(ev)
        elif isinstance(msg, Shutdown) or msg is None:
            self.draining = True
            if msg is None or not msg.drain:
                for rid in list(engine.requests):
                    ev = engine.cancel(rid)
                    if ev is not None:
                        self.emit(ev)
        elif self.on_message is None or not self.on_message(msg):
            logger.warning("engine loop: unknown message %r", type(msg).__name__)

    def run(self, inbox) -> None:
        engine = self.engine
        while True:
            msgs = []
            try:
                msgs.append(inbox.get(timeout=self.idle_wait_s) if not engine.has_work() else inbox.get_nowait())
                while True:
                    msgs.append(inbox.get_nowait())
            except queue.Empty:
                pass
            for msg in msgs:
                self.handle(msg)
            if engine.has_work():
                t0 = time.perf_counter()
                for ev in engine.step():
                    self.emit(ev)
                if self.on_step is not None:
                    self.on_step(time.perf_counter() - t0)
            elif self.draining:
                return
            if self.on_tick is not None:
                self.on_tick()
