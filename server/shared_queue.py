"""One queue for several replicas, on Redis or Valkey (``BITDANCE_REDIS_URL``).

Every generation request becomes a job in Redis (:mod:`server.redis_scripts` lists the keys).
This replica plays both sides:

- **accepting / waiting**: :meth:`SharedQueue.submit` enqueues (global admission: 429 over
  ``max_queue`` jobs waiting in total; an ``Idempotency-Key`` gives the first job back) and
  :meth:`SharedQueue.open` mirrors a job into a local :class:`~server.mailbox.RequestState` +
  :class:`~server.jobs.Job`: its stored events replayed, then followed live (``XREAD``), so the
  routes wait, stream and describe exactly as in memory mode, whichever replica runs it.
- **running**: the puller reads at most as many jobs as the ready workers have free batch slots
  (``XREADGROUP``), submits them to the local pool and writes their events back, fenced by owner
  and attempt. Leases: the pending entry's idle time, renewed every ``job_lease_s / 3``; a job
  idle longer is taken by any replica with free slots (``XAUTOCLAIM``), re-run from the start
  (same request, same seed, so the same image) with a ``requeued`` event, at most
  ``job_max_attempts`` runs, then ``worker_died``. A cancel reaches the owner over pub/sub.

Redis lost while serving: new requests get 503 ``queue_unavailable``; running jobs go on and their
events wait in a bounded outbox (progress dropped first), written when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from bitdance_core.engine.protocol import ErrorCode, GenerationRequest
from server import redis_scripts as rs
from server.drain import WINDOW_S, rate_of, retry_after_s
from server.errors import APIError
from server.jobs import Job, _size
from server.mailbox import TERMINAL, RequestState
from server.settings import Settings
from server.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

OUTBOX_MAX = 4096  # event writes held while Redis is away (terminal ones are kept longest)
RELEASED_CODES = (ErrorCode.WORKER_DIED.value, "worker_hung", ErrorCode.SHUTTING_DOWN.value)
TAIL_BLOCK_MS = 1000


@dataclass
class Write:
    job_id: str
    attempt: int
    kind: str  # a worker event kind, or "release"
    data: str
    status: str = ""  # terminal: succeeded | failed | cancelled
    nbytes: int = 0


@dataclass
class Running:
    st: RequestState
    attempt: int
    nbytes: int = 0
    preview_bytes: int = 0


def request_to_json(req: GenerationRequest) -> str:
    return json.dumps(dataclasses.asdict(req), separators=(",", ":"))


def request_from_json(text: str) -> GenerationRequest:
    d = json.loads(text)
    if d.get("class_label") is not None:
        d["class_label"] = tuple(d["class_label"])
    return GenerationRequest(**d)


def _status_of(kind: str, data: dict[str, Any]) -> str:
    if kind == "completed":
        return "succeeded"
    return "cancelled" if data.get("code") == ErrorCode.CANCELLED.value else "failed"


class SharedQueue:
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

    def free_slots(self) -> int:
        slots = sum(
            int((w.info or {}).get("max_batch_requests", self.settings.max_batch_requests))
            for w in self.pool.workers
            if w.ready
        )
        return slots - len(self.local)

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

    # ---- running side --------------------------------------------------------------------------
    async def _pull(self) -> None:
        from redis.exceptions import RedisError

        while True:
            free = self.free_slots()
            if not self.up or free <= 0 or self.pool.draining or self.pool.closed:
                self._wake_pull.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake_pull.wait(), 0.25)
                continue
            try:
                resp = await self.r.xreadgroup(rs.GROUP, self.owner, {rs.QUEUE: ">"}, count=free, block=1000)
                for _, entries in resp or ():
                    for qid, fields in entries:
                        await self._take(qid, fields.get("id", ""), "")
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(0.5)

    async def _take(self, qid: str, job_id: str, reason: str) -> None:
        res = await self.s["TAKE"](
            keys=[rs.job_key(job_id), rs.events_key(job_id)],
            args=[self.owner, self.settings.job_max_attempts, reason],
        )
        attempt = int(res[0])
        if attempt == 0:  # cancelled while queued, deleted, expired: nothing to run
            async with self.r.pipeline(transaction=False) as p:
                p.xack(rs.QUEUE, rs.GROUP, qid)
                p.xdel(rs.QUEUE, qid)
                await p.execute()
            return
        if attempt < 0:
            msg = f"the job's replica died or stopped renewing its lease {int(res[1])} times; not run again"
            self._queue(Write(job_id, int(res[1]), "failed", rs.encode({"code": ErrorCode.WORKER_DIED.value,
                                                                        "message": msg}), "failed"))  # fmt: skip
            return
        req = request_from_json(res[1])
        try:
            st = self.pool.submit(req)
        except APIError as exc:  # no worker ready after all: the lease runs out, another replica takes it
            logger.warning("job %s not started here (%s); left for another replica", job_id, exc.message)
            return
        run = Running(st, attempt)
        self.local[job_id] = run
        st.listener = lambda kind, data: self._on_event(job_id, run, kind, data)
        if attempt > 1:
            logger.info("job %s: attempt %d on this replica (%s)", job_id, attempt, reason or "given back")

    def _on_event(self, job_id: str, run: Running, kind: str, data: dict[str, Any]) -> None:
        """Every worker event of a job run here, in order, into the outbox."""
        if self.local.get(job_id) is not run or kind == "queued":
            return  # cancelled elsewhere, reclaimed, or given back; "queued" was written at acceptance
        if kind == "failed" and data.get("code") in RELEASED_CODES:
            # not the job's fault (the worker died, the replica drains): another run may finish it
            self.local.pop(job_id, None)
            reason = f"{data.get('code')}: {data.get('message')}"
            self._queue(Write(job_id, run.attempt, "release", reason))
            return
        text = rs.encode(data)
        size = _size(data)
        if kind == "preview":
            run.nbytes += size - run.preview_bytes
            run.preview_bytes = size
        else:
            run.nbytes += size
        status = _status_of(kind, data) if kind in TERMINAL else ""
        if status:
            self.local.pop(job_id, None)
            self._wake_pull.set()
        self._queue(Write(job_id, run.attempt, kind, text, status, run.nbytes))

    def _queue(self, write: Write) -> None:
        self.outbox.append(write)
        if len(self.outbox) > OUTBOX_MAX:
            kept = [w for w in self.outbox if w.status or w.kind == "release"]
            dropped = len(self.outbox) - len(kept)
            while len(kept) > OUTBOX_MAX:
                lost = kept.pop(0)
                logger.error("outbox full while Redis is away: result of job %s dropped", lost.job_id)
            self.outbox = deque(kept)
            logger.warning("outbox full while Redis is away: %d progress event(s) dropped", dropped)
        self._wake_write.set()

    async def _writer(self) -> None:
        from redis.exceptions import RedisError

        s = self.settings
        while True:
            if not self.outbox:
                self._wake_write.clear()
                await self._wake_write.wait()
                continue
            batch = list(self.outbox)[:256]
            now_ms = int(time.time() * 1000)
            try:
                async with self.r.pipeline(transaction=False) as p:
                    for w in batch:
                        if w.kind == "release":
                            await self.s["RELEASE"](
                                keys=[rs.job_key(w.job_id), rs.QUEUE],
                                args=[self.owner, w.attempt, rs.GROUP, w.data, self.lease_ms + 1],
                                client=p,
                            )
                            continue
                        await self.s["APPEND"](
                            keys=[rs.job_key(w.job_id), rs.events_key(w.job_id), rs.QUEUE, rs.gone_key(w.job_id),
                                  rs.FINISHED, rs.SIZES, rs.FINISHED_BYTES, rs.DONE],
                            args=[self.owner, w.attempt, w.kind, w.data, w.status, w.nbytes, int(s.job_ttl_s),
                                  s.job_max_results, s.job_max_bytes, now_ms, rs.GROUP, rs.TOMBSTONE_TTL_S],
                            client=p,
                        )  # fmt: skip
                    results = await p.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(0.5)
                continue
            for w, res in zip(batch, results, strict=True):
                if isinstance(res, Exception):
                    logger.error("writing %s of job %s failed: %s", w.kind, w.job_id, res)
            for _ in batch:
                self.outbox.popleft()

    async def _leases(self) -> None:
        """Renew the leases of the jobs run here; take over jobs whose lease ran out elsewhere."""
        from redis.exceptions import RedisError

        interval = min(1.0, self.settings.job_lease_s / 3)
        renewed = 0.0
        while True:
            await asyncio.sleep(interval)
            if not self.up:
                renewed = 0.0
                continue
            try:
                if self.local and time.monotonic() - renewed >= self.settings.job_lease_s / 3:
                    await self._renew()
                    renewed = time.monotonic()
                free = self.free_slots() if time.monotonic() - self.up_since >= self.settings.job_lease_s else 0
                cursor = "0-0"
                while free > 0 and not self.pool.draining and not self.pool.closed:
                    cursor, claimed, _ = await self.r.xautoclaim(
                        rs.QUEUE, rs.GROUP, self.owner, self.lease_ms, start_id=cursor, count=free
                    )
                    for qid, fields in claimed:
                        if fields:
                            await self._take(qid, fields.get("id", ""), "lease_expired: its replica stopped "
                                             "renewing the lease (died, hung or cut off)")  # fmt: skip
                            free -= 1
                    if cursor == "0-0":
                        break
            except (RedisError, OSError) as exc:
                self._down(exc)

    async def _renew(self) -> None:
        items = list(self.local.items())
        async with self.r.pipeline(transaction=False) as p:
            for job_id, run in items:
                await self.s["RENEW"](keys=[rs.job_key(job_id), rs.QUEUE], args=[self.owner, run.attempt, rs.GROUP],
                                client=p)  # fmt: skip
            results = await p.execute(raise_on_error=False)
        for (job_id, run), ok in zip(items, results, strict=True):
            if ok == 0 and self.local.get(job_id) is run:  # cancelled, deleted, or re-run elsewhere
                self.local.pop(job_id, None)
                self.pool.cancel(run.st, ErrorCode.CANCELLED.value, "the job was cancelled or taken over")

    async def _cancels(self) -> None:
        from redis.exceptions import RedisError

        while True:
            try:
                async with self.r.pubsub() as ps:
                    await ps.subscribe(rs.CANCEL_CHANNEL)
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None:
                            job_id, code, message = json.loads(msg["data"])
                            run = self.local.pop(job_id, None)
                            if run is not None:
                                self.pool.cancel(run.st, code, message)
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(0.5)
