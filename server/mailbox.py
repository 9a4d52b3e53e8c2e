"""Per-request mailbox: worker events in, coalesced for a possibly slow consumer.

Progress, previews and queue positions are *state*, not a log: when the consumer lags, a newer
event of the same kind replaces the pending one, so an SSE client that reads slowly gets the
newest preview, never a backlog, and memory per request stays bounded (at most one pending event
per kind). A ``listener`` (a job, :mod:`server.jobs`) sees every event before coalescing. The
terminal event (``completed`` or ``failed``) is never dropped and is always the
last one handed out. Used only from the event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bitdance_core.engine.protocol import GenerationRequest

logger = logging.getLogger(__name__)
TERMINAL = ("completed", "failed")
COALESCED = ("queued", "started", "progress", "preview")


@dataclass
class RequestState:
    """What the API process knows of one submitted request (owned by the event loop)."""

    request: GenerationRequest
    worker_index: int
    created: float = field(default_factory=time.monotonic)
    started: bool = False  # the worker reported ``started``
    first_preview_s: float | None = None
    finished: bool = False  # the client-visible outcome is decided (terminal event pushed)
    status: str | None = None  # "completed" or an error code, once finished
    worker_done: bool = False  # the worker reported the end (or died): accounting is closed
    cancel_sent: bool = False
    timer: asyncio.TimerHandle | None = None  # the per-request deadline
    listener: Callable[[str, dict[str, Any]], None] | None = None  # sees every event, uncoalesced (jobs)
    _pending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _terminal: tuple[str, dict[str, Any]] | None = None
    _terminal_handed: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def push(self, kind: str, data: dict[str, Any]) -> None:
        """Add an event; ignored once the terminal event is in."""
        if self.finished:
            return
        if self.listener is not None:
            try:
                self.listener(kind, data)
            except Exception:  # a job's bookkeeping must never lose the request's own events
                logger.exception("job listener failed on %s of %s", kind, self.request_id)
        if kind in TERMINAL:
            self.finished = True
            self.status = "completed" if kind == "completed" else str(data.get("code", "internal_error"))
            self._terminal = (kind, data)
        else:
            if kind in COALESCED:
                self._pending = [ev for ev in self._pending if ev[0] != kind]
            self._pending.append((kind, data))
        self._wakeup.set()

    def get_nowait(self) -> tuple[str, dict[str, Any]] | None:
        if self._pending:
            return self._pending.pop(0)
        if self._terminal is not None and not self._terminal_handed:
            self._terminal_handed = True
            return self._terminal
        return None

    async def get(self, timeout: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """The next event, waiting up to ``timeout`` seconds (None on timeout or after the end)."""
        item = self.get_nowait()
        if item is not None or self._terminal_handed:
            return item
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        return self.get_nowait()

    async def result(self) -> tuple[str, dict[str, Any]]:
        """Wait for the terminal event, discarding intermediate ones."""
        while self._terminal is None:
            self._pending.clear()
            self._wakeup.clear()
            await self._wakeup.wait()
        self._pending.clear()
        self._terminal_handed = True
        return self._terminal

    @property
    def exhausted(self) -> bool:
        return self._terminal_handed
