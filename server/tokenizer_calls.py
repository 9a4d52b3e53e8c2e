"""Tokenizer calls in flight: one ``Tokenize`` / ``Detokenize`` message to a worker, one future per call.

Owned by the :class:`~server.worker_pool.WorkerPool` (event-loop thread only): ``call`` routes a message to
the ready worker with the fewest calls (429 past ``limit`` per worker), the pool hands every
``TokenizerResult`` to ``on_result`` and fails a dead worker's calls with ``fail_worker``. The route bounds
the wait with the request deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bitdance_core.engine.protocol import ErrorCode, TokenizerResult
from server.errors import APIError


class TokenizerCalls:
    def __init__(self) -> None:
        self.pending: dict[str, tuple[asyncio.Future, int]] = {}

    def load(self, worker_index: int) -> int:
        return sum(1 for _, w in self.pending.values() if w == worker_index)

    async def call(self, pool: Any, msg: Any, limit: int, timeout_s: float) -> dict[str, Any]:
        """Send ``msg`` to a ready worker and wait for its result data; ``APIError`` on a failure."""
        if pool.draining or pool.closed:
            raise APIError(ErrorCode.SHUTTING_DOWN.value, "the server is shutting down; no new requests")
        ready = [w for w in pool.workers if w.ready]
        if not ready:
            raise APIError("not_ready", "no model worker is ready (starting or restarting); retry shortly")
        w = min(ready, key=lambda h: (self.load(h.index), len(h.in_flight), h.index))
        if self.load(w.index) >= limit:
            raise APIError("overloaded", f"{limit} tokenizer requests already wait on every worker; retry later")
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg.request_id] = (fut, w.index)
        w.inbox.put(msg)
        try:
            result: TokenizerResult = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError as e:
            raise APIError(ErrorCode.TIMEOUT.value, f"tokenizer request exceeded the {timeout_s:g}s deadline") from e
        finally:
            self.pending.pop(msg.request_id, None)
        if result.error is not None:
            raise APIError.from_failed(result.error)
        return result.data

    def on_result(self, msg: TokenizerResult) -> None:
        entry = self.pending.get(msg.request_id)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    def fail_worker(self, worker_index: int, code: str, message: str) -> None:
        for rid, (fut, w) in list(self.pending.items()):
            if w == worker_index and not fut.done():
                fut.set_result(TokenizerResult(rid, error={"code": code, "message": message}))
