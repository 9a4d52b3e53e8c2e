"""Jobs: a generation request with an id, a status and a result that outlive the HTTP connection.

``POST /v1/jobs`` and every streaming ``POST /generate`` make a :class:`Job`. It listens to every
worker event of its request (before the mailbox coalesces anything) and keeps:

- the SSE log of ``/generate`` events (:mod:`server.events`), replayed from the start by
  ``GET /v1/jobs/{id}/events``; previews are state, not history: only the newest one stays in
  the log (what a slow ``/generate`` client gets too), so a job holds at most one preview;
- status (queued | running | succeeded | failed | cancelled), queue position, progress, the
  newest preview, and on success the ``/generate`` response body.

:class:`JobStore` keeps running jobs until they end, then the results for ``job_ttl_s`` seconds,
at most ``job_max_results`` of them and ``job_max_bytes`` in all, the oldest finished first out.
An evicted or deleted id is remembered (bounded) so it answers 410, an unknown one 404.

NOTE on libraries: cachetools' ``TTLCache`` was considered. Its order is least-recently *used*
(a status poll would keep an old result alive, against "oldest first"), it has one size bound
where two are needed (count and bytes), it cannot hold running jobs out of eviction, and the 410
tombstones would need hooks into its private expiry path; an ordered dict does exactly this.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.events import Rendered, render_generate_event
from server.mailbox import RequestState

TOMBSTONES = 10_000  # evicted / deleted ids remembered for 410


@dataclass
class LogEntry:
    seq: int
    name: str
    data: dict[str, Any]
    nbytes: int


def _size(data: dict[str, Any]) -> int:
    """Bytes a payload holds, dominated by its base64 images (cheap: no JSON encoding)."""
    total = 64
    for key, value in data.items():
        if isinstance(value, str):
            total += len(value) + len(key)
        elif isinstance(value, list):
            total += sum(_size(v) if isinstance(v, dict) else 16 for v in value)
        elif isinstance(value, dict):
            total += _size(value)
        else:
            total += 16
    return total


@dataclass
class Job:
    st: RequestState
    kind: str  # "job" (POST /v1/jobs) or "stream" (a streaming POST /generate)
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    finished_mono: float | None = None
    position: int | None = 0
    started: bool = False
    progress: dict[str, Any] | None = None
    preview: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    log: list[LogEntry] = field(default_factory=list)
    nbytes: int = 0
    _seq: int = 0
    _waiters: list[asyncio.Future] = field(default_factory=list)
    on_close: Callable[[], None] | None = None  # a shared-queue mirror: stop following Redis

    @property
    def id(self) -> str:
        return self.st.request_id

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def status(self) -> str:
        if self.result is not None:
            return "succeeded"
        if self.error is not None:
            return "cancelled" if self.error.get("code") == "cancelled" else "failed"
        return "running" if self.started else "queued"

    # ---- fed by RequestState.listener (every worker event, in order, on the event loop) ----------
    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        rendered = render_generate_event(kind, data, self.st.request, self.st.created)
        if rendered is None:
            return
        name, payload = rendered
        if name == "queued":
            self.position = payload["position"]
        elif name == "started":
            self.started, self.position = True, None
        elif name == "progress":
            self.started, self.position = True, None
            self.progress = payload
        elif name == "preview":
            self.preview = payload
            self._drop_previews()
        elif name == "requeued":  # shared queue: its replica was lost, it runs again from the start
            self.started, self.position, self.progress, self.preview = False, 0, None, None
            self._drop_previews()
        elif name == "completed":
            self.result = payload
        elif name == "error":
            self.error = payload
        self._append(name, payload)
        if name in ("completed", "error"):
            self.finished_at, self.finished_mono = time.time(), time.monotonic()
        self._wake()

    def _drop_previews(self) -> None:
        kept = [e for e in self.log if e.name != "preview"]
        self.nbytes -= sum(e.nbytes for e in self.log if e.name == "preview")
        self.log = kept

    def _append(self, name: str, payload: dict[str, Any]) -> None:
        self._seq += 1
        entry = LogEntry(self._seq, name, payload, _size(payload))
        self.log.append(entry)
        self.nbytes += entry.nbytes

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    # ---- readers ---------------------------------------------------------------------------------
    def since(self, seq: int) -> list[LogEntry]:
        return [e for e in self.log if e.seq > seq]

    async def wait(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(fut, timeout)

    async def follow(self, heartbeat_s: float) -> AsyncIterator[Rendered | None]:
        """Every event from the start, then live ones until the terminal one; None = keep-alive."""
        last = 0
        while True:
            entries = self.since(last)
            for entry in entries:
                last = entry.seq
                yield entry.name, entry.data
            if self.done and not self.since(last):
                return
            if not entries:
                before = last
                await self.wait(heartbeat_s)
                if not self.since(before) and not self.done:
                    yield None

    def describe(self, base_url: str, preview: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "job",
            "status": self.status,
            "created_at": int(self.created_at),
            "finished_at": int(self.finished_at) if self.finished_at is not None else None,
            "position": self.position if self.status == "queued" else None,
            "progress": None,
            "status_url": f"{base_url}/v1/jobs/{self.id}",
            "events_url": f"{base_url}/v1/jobs/{self.id}/events",
        }
        if self.progress is not None:
            p = self.progress
            body["progress"] = {
                "patch": p["patch"],
                "patches": p["patches"],
                "diffusion_steps": p["diffusion_steps"],
                "fraction": round(p["patch"] / max(1, p["patches"]), 4),
            }
        if self.status == "succeeded":
            body["progress"] = {**(body["progress"] or {}), "fraction": 1.0} if body["progress"] else None
        if preview:
            body["preview"] = self.preview
        if self.result is not None:
            body["result"] = self.result
        if self.error is not None:
            body["error"] = self.error
        return body


class JobStore:
    """Running jobs plus finished results under TTL, count and byte bounds (event-loop owned)."""

    def __init__(self, ttl_s: float, max_results: int, max_bytes: int) -> None:
        self.ttl_s, self.max_results, self.max_bytes = ttl_s, max_results, max_bytes
        self.running: dict[str, Job] = {}
        self.finished: OrderedDict[str, Job] = OrderedDict()  # oldest finished first
        self.gone: OrderedDict[str, str] = OrderedDict()  # id -> why (evicted | deleted)
        self.evictions = 0

    def add(self, st: RequestState, kind: str) -> Job:
        job = Job(st, kind)
        self.running[job.id] = job
        prior = st.listener

        def listener(kind_: str, data: dict[str, Any]) -> None:
            if prior is not None:
                prior(kind_, data)
            job.on_event(kind_, data)
            if job.done:
                self._finish(job)

        st.listener = listener
        return job

    def _finish(self, job: Job) -> None:
        if self.running.pop(job.id, None) is None:
            return
        self.finished[job.id] = job
        self.purge()

    def get(self, job_id: str) -> Job | None:
        self.purge()
        return self.running.get(job_id) or self.finished.get(job_id)

    def was_here(self, job_id: str) -> str | None:
        return self.gone.get(job_id)

    def discard(self, job_id: str) -> None:
        """Forget a job that was never accepted (refused by the worker's first event)."""
        self.running.pop(job_id, None)
        self.finished.pop(job_id, None)

    def delete(self, job_id: str) -> None:
        job = self.running.pop(job_id, None) or self.finished.pop(job_id, None)
        if job is not None:
            self._tombstone(job_id, "deleted")

    @property
    def finished_bytes(self) -> int:
        return sum(j.nbytes for j in self.finished.values())

    def purge(self) -> None:
        now = time.monotonic()
        total = self.finished_bytes
        while self.finished:
            job_id, job = next(iter(self.finished.items()))
            expired = job.finished_mono is not None and now - job.finished_mono >= self.ttl_s
            if not (expired or len(self.finished) > self.max_results or total > self.max_bytes):
                break
            self.finished.popitem(last=False)
            total -= job.nbytes
            self.evictions += 1
            self._tombstone(job_id, "expired" if expired else "evicted")

    def _tombstone(self, job_id: str, why: str) -> None:
        self.gone[job_id] = why
        while len(self.gone) > TOMBSTONES:
            self.gone.popitem(last=False)
