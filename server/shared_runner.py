"""The running side of the shared queue (:mod:`server.shared_queue`): what a replica runs.

The puller reads at most as many jobs as the ready workers have free batch slots
(``XREADGROUP``), submits them to the local pool and writes their events back through an outbox
(one pipeline per batch), fenced by owner and attempt. Leases: the pending entry's idle time,
renewed every ``job_lease_s / 3``; a job idle longer is taken by any replica with free slots
(``XAUTOCLAIM``) and re-run from the start with a ``requeued`` event, at most
``job_max_attempts`` runs, then ``worker_died``. A job whose worker died or whose replica drains
is given back at once. A cancel from any replica arrives over pub/sub (and, failing that, with
the next renewal). While Redis is away the outbox holds at most ``OUTBOX_MAX`` writes, progress
dropped first, results last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from bitdance_core.engine.protocol import ErrorCode, GenerationRequest
from server import redis_scripts as rs
from server.errors import APIError
from server.jobs import _size
from server.mailbox import TERMINAL, RequestState
from server.settings import Settings
from server.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

OUTBOX_MAX = 4096  # event writes held while Redis is away (terminal ones are kept longest)
RELEASED_CODES = (ErrorCode.WORKER_DIED.value, "worker_hung", ErrorCode.SHUTTING_DOWN.value)


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


class SharedRunner:
    """Mixed into :class:`server.shared_queue.SharedQueue`, which owns the attributes used here."""

    settings: Settings
    pool: WorkerPool
    owner: str
    lease_ms: int
    r: Any
    s: dict[str, Any]
    up: bool
    up_since: float
    local: dict[str, Running]
    outbox: deque[Write]
    _wake_pull: asyncio.Event
    _wake_write: asyncio.Event

    def _down(self, exc: BaseException) -> None:
        raise NotImplementedError

    def free_slots(self) -> int:
        slots = sum(
            int((w.info or {}).get("max_batch_requests", self.settings.max_batch_requests))
            for w in self.pool.workers
            if w.ready
        )
        return slots - len(self.local)

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
            except Exception:  # a bug or a job it cannot read must not stop this replica's pulling
                logger.exception("shared queue: pulling failed; going on")
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
        try:
            req = request_from_json(res[1])
        except (TypeError, ValueError) as exc:  # e.g. written by a newer version during a rolling update
            msg = f"this replica cannot read the stored request: {exc}"
            self._queue(Write(job_id, attempt, "failed", rs.encode({"code": ErrorCode.INTERNAL.value, "message": msg}),
                              "failed"))  # fmt: skip
            return
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
            except Exception:  # a write Redis cannot take (a bug): drop this batch, never stop writing
                logger.exception("shared queue: %d event write(s) dropped", len(batch))
                results = [None] * len(batch)
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
            except Exception:  # never let the lease loop die: running jobs would lose their leases
                logger.exception("shared queue: lease renewal / reclaim failed; going on")

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
            except Exception:  # a malformed message: drop it, keep listening
                logger.exception("shared queue: cancel message failed; going on")
                await asyncio.sleep(0.5)
