"""One queue for several replicas, on Redis or Valkey (``BITDANCE_REDIS_URL``).

Every generation request becomes a job in Redis (:mod:`server.redis_scripts` lists the keys).
This replica plays both sides:

- **accepting / waiting**: :meth:`SharedQueue.submit` enqueues (global admission: 429 over
  ``max_queue`` jobs waiting in total; an ``Idempotency-Key`` gives the first job back) and
  :meth:`SharedQueue.open` mirrors a job into a local :class:`~server.mailbox.RequestState` +
  :class:`~server.jobs.Job`: its stored events replayed, then followed live (``XREAD``), so the
  routes wait, stream and describe exactly as in memory mode, whichever replica runs it.
- **running** (:mod:`server.shared_runner`): pull jobs while the workers have free batch slots,
  run them, write their events back; leases, re-runs and cancels from other replicas.

Redis lost while serving: new requests get 503 ``queue_unavailable``; running jobs go on and their
events wait in a bounded outbox (progress dropped first), written when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from typing import Any

from bitdance_core.engine.protocol import ErrorCode, GenerationRequest
from server import redis_scripts as rs
from server.drain import WINDOW_S, rate_of, retry_after_s
from server.errors import APIError
from server.jobs import Job
from server.mailbox import TERMINAL, RequestState
from server.settings import Settings
from server.shared_runner import Running, SharedRunner, Write, request_from_json, request_to_json
from server.worker_pool import WorkerPool

__all__ = ["SharedQueue", "request_from_json", "request_to_json"]

logger = logging.getLogger(__name__)

TAIL_BLOCK_MS = 1000


class SharedQueue(SharedRunner):
    """A replica's view of the shared queue: accept, mirror, cancel (here); run (:class:`SharedRunner`)."""

    def __init__(self, settings: Settings, pool: WorkerPool) -> None:
        self.settings, self.pool = settings, pool
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lease_ms = int(settings.job_lease_s * 1000)
        self.r: Any = None
        self.up = False
        self.up_since = 0.0
        self.error: str | None = "not connected yet"
        self.waiting = 0
        self.rate: float | None = None
        self.local: dict[str, Running] = {}
        self.outbox: deque[Write] = deque()
        self.closed = False
        self._tasks: list[asyncio.Task] = []
        self._tails: set[asyncio.Task] = set()
        self._wake_pull = asyncio.Event()
        self._wake_write = asyncio.Event()
        pool.shared_waiting = lambda: self.waiting

    # ---- lifecycle and health ------------------------------------------------------------------
    async def start(self) -> None:
        import redis.asyncio as redis  # only with a Redis URL: memory mode never imports it

        self.r = redis.from_url(
            self.settings.redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
        )
        self.s = {
            name: self.r.register_script(getattr(rs, name))
            for name in ("ENQUEUE", "TAKE", "RENEW", "RELEASE", "APPEND", "CANCEL", "WAITING_LUA")
        }
        for loop in (self._monitor, self._pull, self._leases, self._writer, self._cancels):
            self._tasks.append(asyncio.create_task(loop(), name=f"shared-queue-{loop.__name__}"))

    async def close(self, flush_s: float = 3.0) -> None:
        deadline = time.monotonic() + flush_s
        while self.outbox and self.up and time.monotonic() < deadline:
            self._wake_write.set()
            await asyncio.sleep(0.05)
        self.closed = True
        for task in [*self._tasks, *self._tails]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._tails, return_exceptions=True)
        if self.r is not None:
            await self.r.aclose()

    def _down(self, exc: BaseException) -> None:
        if self.up:
            logger.error("Redis at %s unreachable: %s", self.settings.redis_url, exc)
        self.up, self.error = False, f"{type(exc).__name__}: {exc}"

    def _up(self) -> None:
        if not self.up:
            logger.info("Redis at %s reachable; replica %s", self.settings.redis_url, self.owner)
            # NOTE: no replica could renew while Redis was away, so idle times say nothing for a lease:
            # judge them again only after one lease with Redis back (the owners renew at once)
            self.up_since = time.monotonic()
        self.up, self.error = True, None

    async def _monitor(self) -> None:
        """Connect (again), create the group, and refresh the queue length and drain rate every second."""
        from redis.exceptions import RedisError, ResponseError

        while True:
            try:
                with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                    await self.r.xgroup_create(rs.QUEUE, rs.GROUP, id="0", mkstream=True)
                await self.refresh()
                self._up()
                self._wake_pull.set()
            except (RedisError, OSError) as exc:
                self._down(exc)
            await asyncio.sleep(1.0 if self.up else 0.5)

    async def refresh(self) -> None:
        """The shared queue's length and every replica's completions of the last minute, from Redis."""
        now = time.time()
        waiting = await self.s["WAITING_LUA"](keys=[rs.QUEUE], args=[rs.GROUP])
        done = await self.r.zrangebyscore(rs.DONE, (now - WINDOW_S) * 1000, "+inf", withscores=True)
        self.waiting = int(waiting)
        self.rate = rate_of([score / 1000 for _, score in done], now)

    def retry_after(self) -> int | None:
        return retry_after_s(self.waiting, self.rate)

    # ---- accepting and waiting side ------------------------------------------------------------
    async def submit(self, req: GenerationRequest, kind: str, idempotency_key: str | None) -> Job:
        """Enqueue ``req`` (or find the job of ``idempotency_key``) and return its live mirror."""
        from redis.exceptions import RedisError

        if self.pool.draining or self.pool.closed:
            raise APIError(ErrorCode.SHUTTING_DOWN.value, "the server is shutting down; no new requests")
        if not self.up:
            raise APIError("queue_unavailable", f"the shared job queue (Redis) is unreachable: {self.error}")
        s = self.settings
        active_ttl = int(s.request_timeout_s * s.job_max_attempts + s.job_ttl_s + 60)
        try:
            verdict, value = await self.s["ENQUEUE"](
                keys=[rs.QUEUE, rs.QUEUE, rs.job_key(req.request_id), rs.events_key(req.request_id),
                      rs.idem_key(idempotency_key or "")],
                args=[req.request_id, request_to_json(req), kind, time.time(), s.max_queue, int(s.job_ttl_s),
                      active_ttl, 1 if idempotency_key else 0, rs.GROUP],
            )  # fmt: skip
            job_id = value if verdict == "dup" else req.request_id
            job = await self.open(job_id, live=verdict != "full")
        except (RedisError, OSError) as exc:
            self._down(exc)
            raise APIError("queue_unavailable", f"the shared job queue (Redis) is unreachable: {exc}") from exc
        if verdict == "full":
            raise APIError(
                ErrorCode.QUEUE_FULL.value,
                f"the shared queue is full ({value} jobs waiting, max_queue {s.max_queue}); retry later",
            )
        if job is None:  # an Idempotency-Key whose job was deleted or evicted
            raise APIError("job_expired", f"the job of this Idempotency-Key ({job_id}) is gone")
        st = job.st
        if verdict == "ok" and not st.finished:
            loop = asyncio.get_running_loop()
            msg = f"request exceeded the {s.request_timeout_s:g}s deadline"
            st.timer = loop.call_later(s.request_timeout_s, self.cancel, st, ErrorCode.TIMEOUT.value, msg)
        return job

    async def open(self, job_id: str, live: bool) -> Job | None:
        """A local mirror of a stored job: its events replayed, then (``live``) followed until the end."""
        h = await self.r.hgetall(rs.job_key(job_id))
        if not h or "request" not in h:
            return None
        created_at = float(h["created_at"])
        st = RequestState(request_from_json(h["request"]), -1)
        st.created = time.monotonic() - max(0.0, time.time() - created_at)
        job = Job(st, h.get("kind", "job"), created_at=created_at)

        def listener(kind: str, data: dict[str, Any]) -> None:
            job.on_event(kind, data)
            if kind in TERMINAL and st.timer is not None:
                st.timer.cancel()  # the deadline would keep the mirror (and its images) alive

        st.listener = listener
        last = "0-0"
        for eid, fields in await self.r.xrange(rs.events_key(job_id)):
            last = eid
            st.push(fields["k"], rs.decode(fields["d"]))
        if h.get("finished_at"):
            job.finished_at = float(h["finished_at"])
        if live and not st.finished:
            task = asyncio.create_task(self._tail(job_id, st, last))
            self._tails.add(task)
            task.add_done_callback(self._tails.discard)
            job.on_close = task.cancel
        return job

    async def gone(self, job_id: str) -> str | None:
        return await self.r.get(rs.gone_key(job_id))

    async def _tail(self, job_id: str, st: RequestState, last: str) -> None:
        from redis.exceptions import RedisError

        key = rs.events_key(job_id)
        while not st.finished and not self.closed:
            try:
                resp = await self.r.xread({key: last}, count=256, block=TAIL_BLOCK_MS)
                if not resp and not await self.r.exists(key):
                    st.push("failed", {"code": "job_expired", "message": f"job {job_id} was deleted or evicted"})
                    return
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(0.5)
                continue
            for eid, fields in resp[0][1] if resp else ():
                last = eid
                st.push(fields["k"], rs.decode(fields["d"]))

    def cancel(self, st: RequestState, code: str = ErrorCode.CANCELLED.value, message: str = "cancelled") -> None:
        """End a mirrored job for its client now and cancel it everywhere (the pool's ``cancel``)."""
        if st.finished:
            return
        st.push("failed", {"code": code, "message": message})
        task = asyncio.ensure_future(self._cancel(st.request_id, code, message, delete=False))
        self._tails.add(task)
        task.add_done_callback(self._tails.discard)

    async def _cancel(self, job_id: str, code: str, message: str, delete: bool) -> str:
        from redis.exceptions import RedisError

        s = self.settings
        try:
            before = await self.s["CANCEL"](
                keys=[rs.job_key(job_id), rs.events_key(job_id), rs.QUEUE, rs.QUEUE, rs.gone_key(job_id),
                      rs.FINISHED, rs.SIZES, rs.FINISHED_BYTES],
                args=[code, message, rs.GROUP, 1 if delete else 0, int(s.job_ttl_s), int(time.time() * 1000),
                      rs.TOMBSTONE_TTL_S, job_id],
            )  # fmt: skip
            if before == "running":
                await self.r.publish(rs.CANCEL_CHANNEL, json.dumps([job_id, code, message]))
            return before
        except (RedisError, OSError) as exc:
            self._down(exc)
            logger.warning("could not cancel job %s in Redis: %s", job_id, exc)
            return ""

    async def delete(self, job: Job) -> None:
        """Cancel (if it still runs) and delete: later reads answer 410 on every replica."""
        msg = "cancelled by DELETE /v1/jobs/{id}"
        before = await self._cancel(job.id, ErrorCode.CANCELLED.value, msg, delete=True)
        if before in ("queued", "running"):
            job.st.push("failed", {"code": ErrorCode.CANCELLED.value, "message": msg})
