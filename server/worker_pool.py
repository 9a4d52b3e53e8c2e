"""Model-worker processes: spawn, route, read events, detect death, restart.

One worker process per device (``multiprocessing`` spawn context), each with an ``inbox`` queue
(``Submit`` / ``Cancel`` / ``Shutdown``) and an ``outbox`` queue (``WorkerReady`` /
``RequestEvent`` / ``StepStats`` / ``WorkerFatal``), the contract of
``bitdance_core.engine.protocol``.

Threading: a daemon reader thread per worker blocks on the outbox and hands every message to the
event loop with ``loop.call_soon_threadsafe``; everything else (routing, mailboxes, metrics) runs
on the event loop, so no locks are needed and the loop never blocks on IPC.

Death detection: right after ``start()`` the API process closes its copy of the outbox's write
end, so when the worker dies (kill -9, crash, OOM) the reader sees EOF at once, even mid-message.
Every request on that worker then ends with ``worker_died``, and the worker is restarted after a
back-off (doubling while it keeps dying before it gets ready).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from bitdance_core.engine.protocol import (
    Cancel,
    ErrorCode,
    GenerationRequest,
    Heartbeat,
    RequestEvent,
    Shutdown,
    StepStats,
    Submit,
    TokenizerResult,
    WorkerConfig,
    WorkerFatal,
    WorkerReady,
)
from server.drain import DrainMeter
from server.errors import REJECT_REASON_BY_CODE, APIError, outcome_of
from server.mailbox import TERMINAL, RequestState
from server.metrics import Metrics
from server.settings import Settings
from server.tokenizer_calls import TokenizerCalls
from server.worker_entry import run_worker

logger = logging.getLogger(__name__)

CANCEL_CONFIRM_S = 30.0  # a worker that never confirms a Cancel: forget the request after this long
MAX_BACKOFF_S = 30.0


class WorkerHandle:
    """The API side of one worker process (event-loop owned, except the reader thread's locals)."""

    def __init__(self, index: int, config: WorkerConfig) -> None:
        self.index = index
        self.config = config
        self.generation = 0  # bumped per spawn; messages from an older process are ignored
        self.process: Any = None
        self.inbox: Any = None
        self.state = "stopped"  # starting | ready | dead | stopped
        self.info: dict[str, Any] | None = None
        self.in_flight: dict[str, RequestState] = {}
        self.restarts = 0
        self.completed = 0
        self.deaths_before_ready = 0
        self.last_exitcode: int | None = None
        self.last_heard = time.monotonic()  # any message from the worker (heartbeats, events, stats)
        self.engine: dict[str, Any] = {}  # the latest Heartbeat: the engine's own counts
        self.hangs = 0

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "device": self.config.device,
            "pid": self.process.pid if self.process is not None else None,
            "state": self.state,
            "in_flight": len(self.in_flight),
            "completed": self.completed,
            "restarts": self.restarts,
            "hangs": self.hangs,
            "last_exitcode": self.last_exitcode,
            "heard_s_ago": round(time.monotonic() - self.last_heard, 3),
            "engine": dict(self.engine),
        }


class WorkerPool:
    """All workers plus the request registry; the routes' only way to reach the model."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.workers = [WorkerHandle(i, cfg) for i, cfg in enumerate(settings.worker_configs())]
        self.requests: dict[str, RequestState] = {}
        self.tokenizer = TokenizerCalls()  # /v1/tokenize, /v1/detokenize calls in flight
        self.draining = False
        self.closed = False
        self._ctx = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rr = 0
        self.drain = DrainMeter()  # completions: Retry-After of a full queue
        self.shared_waiting: object = None  # with a shared queue: () -> its length, the waiting gauge
        self.load_error: str | None = None  # a load error no restart fixes: no (re)spawn, /readyz names it
        self.on_load_error: Callable[[str], None] | None = None  # `bitdance serve` exits unless told to keep serving
        metrics.bind_gauges(
            running=lambda: sum(1 for st in self.requests.values() if st.started),
            waiting=lambda: self.shared_waiting() if callable(self.shared_waiting) else self.num_waiting,
            ready=lambda: sum(1 for w in self.workers if w.ready),
        )

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # NOTE: runs before multiprocessing's own exit hook, which would join (forever) workers that
        # were never told to stop, e.g. after a forced exit that skipped the lifespan shutdown.
        atexit.register(self._kill_all)
        if self.load_error is not None:  # found before start-up: no worker could ever load it
            logger.error("not starting workers: %s", self.load_error)
            return
        for w in self.workers:
            self._spawn(w)
        self._loop.call_later(self._watch_interval, self._watchdog)

    @property
    def _watch_interval(self) -> float:
        return max(0.1, min(1.0, self.settings.worker_hang_s / 4))

    def _watchdog(self) -> None:
        """Kill a ready worker that has work in flight but has not been heard of for ``worker_hang_s``
        (its loop is stuck: a deadlock, a kernel that never returns, SIGSTOP)."""
        if self.closed:
            return
        now = time.monotonic()
        for w in self.workers:
            silent = now - w.last_heard
            if w.ready and w.in_flight and silent > self.settings.worker_hang_s:
                self._on_hung(w, silent)
        self._loop.call_later(self._watch_interval, self._watchdog)  # type: ignore[union-attr]

    def _on_hung(self, w: WorkerHandle, silent: float) -> None:
        logger.error(
            "worker %d (pid %s) silent for %.1fs with %d request(s) in flight: killing it",
            w.index, w.process.pid, silent, len(w.in_flight),
        )  # fmt: skip
        w.state, w.hangs = "hung", w.hangs + 1
        self.metrics.hangs.inc()
        self._fail_all(w, "worker_hung", f"model worker {w.index} stopped responding for {silent:.0f}s; restarting it")
        w.process.kill()  # SIGKILL works on a stopped process too; the reader sees EOF -> restart

    def _kill_all(self) -> None:
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                w.process.kill()
                w.process.join(5)

    def _spawn(self, w: WorkerHandle) -> None:
        assert self._loop is not None
        inbox, outbox = self._ctx.Queue(), self._ctx.Queue()
        proc = self._ctx.Process(
            target=run_worker,
            args=(
                self.settings.worker_target,
                self.settings.log_level,
                os.getpid(),
                w.config,
                inbox,
                outbox,
                self.settings.worker_env(w.config.device),
            ),
            name=f"bitdance-worker-{w.index}",
        )
        proc.start()
        # NOTE: the child holds its own copy now; dropping ours makes the worker's death an EOF.
        outbox._writer.close()
        w.generation += 1
        w.process, w.inbox, w.state = proc, inbox, "starting"
        logger.info("spawned worker %d (pid %d) on %s", w.index, proc.pid, w.config.device)
        threading.Thread(
            target=self._read_outbox,
            args=(w, w.generation, proc, outbox),
            name=f"bitdance-worker-{w.index}-reader",
            daemon=True,
        ).start()
        self._loop.call_later(self.settings.worker_ready_timeout_s, self._check_ready, w, w.generation)

    def _read_outbox(self, w: WorkerHandle, gen: int, proc: Any, outbox: Any) -> None:
        """Reader thread: forward every message to the loop; report the exit at EOF."""
        while True:
            try:
                msg = outbox.get(timeout=1.0)
            except queue.Empty:
                if proc.exitcode is not None:  # dead but EOF not seen (a grandchild holds the pipe)
                    break
                continue
            except (EOFError, OSError):
                break
            except Exception:  # an unpicklable message: log, keep reading
                logger.exception("worker %d sent an unreadable message", w.index)
                continue
            if not self._post(self._on_message, w, gen, msg):
                return
        proc.join(timeout=10)
        self._post(self._on_exit, w, gen, proc.exitcode)

    def _post(self, fn: Any, *args: Any) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: the server is gone
            return False
        return True

    def _check_ready(self, w: WorkerHandle, gen: int) -> None:
        if gen == w.generation and w.state == "starting" and w.process.is_alive():
            logger.error("worker %d not ready after %.0fs; killing it", w.index, self.settings.worker_ready_timeout_s)
            w.process.kill()

    def _on_exit(self, w: WorkerHandle, gen: int, exitcode: int | None) -> None:
        if gen != w.generation:
            return
        was_ready = w.ready or w.state == "hung"
        w.state, w.last_exitcode = ("stopped" if self.closed else "dead"), exitcode
        w.inbox.cancel_join_thread()  # never block our own exit flushing into a dead pipe
        self._fail_all(w, ErrorCode.WORKER_DIED.value, f"model worker {w.index} died (exit code {exitcode})")
        self.metrics.kv_usage.labels(str(w.index)).set(0)
        if self.closed:
            return
        if self.load_error is not None:  # a permanent load error: a restart would fail the same way
            w.state = "failed"
            return
        w.deaths_before_ready = 0 if was_ready else w.deaths_before_ready + 1
        delay = min(MAX_BACKOFF_S, self.settings.restart_backoff_s * 2 ** max(0, w.deaths_before_ready - 1))
        logger.error("worker %d (pid %s) exited with %s; restarting in %.1fs", w.index, w.process.pid, exitcode, delay)
        self._loop.call_later(delay, self._restart, w, gen)  # type: ignore[union-attr]

    def _restart(self, w: WorkerHandle, gen: int) -> None:
        if self.closed or gen != w.generation:
            return
        w.restarts += 1
        self.metrics.restarts.inc()
        try:
            self._spawn(w)
        except OSError:  # e.g. out of memory or pids: try again later
            logger.exception("could not restart worker %d", w.index)
            self._loop.call_later(MAX_BACKOFF_S, self._restart, w, gen)  # type: ignore[union-attr]

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every worker with ``Shutdown`` (``drain=False`` if requests are still in flight: the
        drain, if any, is over), then kill the stragglers."""
        self.closed = True
        for w in self.workers:
            abandoned = bool(w.in_flight)  # the drain is over: whatever still runs is given up
            self._fail_all(w, ErrorCode.SHUTTING_DOWN.value, "the server is shutting down")
            if w.process is not None and w.process.is_alive():
                if w.ready:
                    w.inbox.put(Shutdown(drain=not abandoned))
                else:  # still loading (or failed): nothing to finish, don't wait for the load
                    w.process.kill()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        for w in self.workers:
            if w.process is None:
                continue
            await loop.run_in_executor(None, w.process.join, max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():  # workers ignore SIGTERM (see worker_entry)
                logger.warning("worker %d did not stop after Shutdown; killing it", w.index)
                w.process.kill()
                await loop.run_in_executor(None, w.process.join, 5)
            w.inbox.cancel_join_thread()
            w.state = "stopped"
        logger.info("all workers stopped")

    # ---- worker -> API -----------------------------------------------------------------------
    def _on_message(self, w: WorkerHandle, gen: int, msg: Any) -> None:
        if gen != w.generation:
            return
        w.last_heard = time.monotonic()
        if isinstance(msg, Heartbeat):
            w.engine = {
                "busy": msg.busy,
                "requests": msg.requests,
                "used_rows": msg.used_rows,
                "cancelled": msg.cancelled,
                "freed_rows": msg.freed_rows,
            }
        elif isinstance(msg, RequestEvent):
            st = w.in_flight.get(msg.request_id)
            if st is not None:
                self._on_event(w, st, getattr(msg.kind, "value", msg.kind), msg.data)
        elif isinstance(msg, StepStats):
            self.metrics.observe_step(w.index, msg)
        elif isinstance(msg, TokenizerResult):
            self.tokenizer.on_result(msg)
        elif isinstance(msg, WorkerReady):
            w.state, w.info = "ready", dict(msg.info)
            logger.info(
                "worker %d ready: model %s on %s (%s)",
                w.index,
                msg.info.get("model"),
                msg.info.get("device"),
                msg.info.get("dtype"),
            )
        elif isinstance(msg, WorkerFatal):
            logger.error("worker %d fatal: %s", w.index, msg.message)
            w.state = "dead"
            if getattr(msg, "permanent", False) and not w.ready and self.load_error is None:
                w.state, self.load_error = "failed", msg.message
                logger.error("the model cannot load; no restarts (%s)", msg.message)
                if self.on_load_error is not None:
                    self.on_load_error(msg.message)
            self._fail_all(w, ErrorCode.WORKER_DIED.value, f"model worker {w.index} failed: {msg.message}")
            self._loop.call_later(10.0, self._check_exited, w, gen)  # type: ignore[union-attr]
        else:
            logger.warning("worker %d sent an unknown message %r", w.index, type(msg).__name__)

    def _check_exited(self, w: WorkerHandle, gen: int) -> None:
        if gen == w.generation and w.process.is_alive():
            logger.error("worker %d still alive 10s after WorkerFatal; killing it", w.index)
            w.process.kill()

    def _on_event(self, w: WorkerHandle, st: RequestState, kind: str, data: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind == "started":
            st.started = True
            if "queue_s" in data:
                self.metrics.queue_time.observe(float(data["queue_s"]))
        elif kind == "preview" and st.first_preview_s is None:
            st.first_preview_s = now - st.created
            self.metrics.first_preview.observe(st.first_preview_s)
        elif kind == "completed":
            if not st.started and "queue_s" in data.get("timings", {}):
                self.metrics.queue_time.observe(float(data["timings"]["queue_s"]))
            self.metrics.e2e_latency.observe(now - st.created)
            self.metrics.images.inc(len(data.get("images", ())))
            self.drain.record()
            w.completed += 1
        st.push(kind, data)
        if kind in TERMINAL:
            self._close(st)

    def _close(self, st: RequestState) -> None:
        """The worker is done with ``st`` (or dead): drop it and count its final status."""
        if st.worker_done:
            return
        st.worker_done = True
        if st.timer is not None:
            st.timer.cancel()
        w = self.workers[st.worker_index]
        w.in_flight.pop(st.request_id, None)
        self.requests.pop(st.request_id, None)
        code = st.status or ErrorCode.INTERNAL.value
        self.metrics.requests.labels(outcome_of(code)).inc()
        if code in REJECT_REASON_BY_CODE:
            self.metrics.rejected.labels(REJECT_REASON_BY_CODE[code]).inc()
        if not w.in_flight:
            self.metrics.kv_usage.labels(str(w.index)).set(0)

    def _fail_all(self, w: WorkerHandle, code: str, message: str) -> None:
        self.tokenizer.fail_worker(w.index, code, message)
        for st in list(w.in_flight.values()):
            st.push("failed", {"code": code, "message": message})
            self._close(st)

    # ---- API -> worker -----------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any] | None:
        """Model info from a ready worker (else the last one seen; None before any was ready)."""
        ready = [w.info for w in self.workers if w.ready and w.info]
        if ready:
            return ready[0]
        known = [w.info for w in self.workers if w.info]
        return known[0] if known else None

    @property
    def num_waiting(self) -> int:
        return sum(1 for st in self.requests.values() if not st.started)

    @property
    def num_ready(self) -> int:
        return sum(1 for w in self.workers if w.ready)

    def submit(self, request: GenerationRequest) -> RequestState:
        """Route to the least-loaded ready worker; raises ``APIError`` (503 / 429) when impossible."""
        if self.draining or self.closed:
            raise APIError(ErrorCode.SHUTTING_DOWN.value, "the server is shutting down; no new requests")
        ready = [w for w in self.workers if w.ready]
        if not ready:
            if self.load_error is not None:
                raise APIError("not_ready", f"the model could not be loaded: {self.load_error}")
            raise APIError("not_ready", "no model worker is ready (starting or restarting); retry shortly")
        n = len(self.workers)
        self._rr += 1
        w = min(ready, key=lambda h: (len(h.in_flight), (h.index - self._rr) % n))
        info = w.info or {}
        capacity = int(info.get("max_batch_requests", self.settings.max_batch_requests)) + int(
            info.get("max_waiting", self.settings.max_queue)
        )
        if len(w.in_flight) >= capacity:
            raise APIError("overloaded", f"server at capacity ({len(self.requests)} requests in flight); retry later")
        st = RequestState(request, w.index)
        w.in_flight[request.request_id] = st
        self.requests[request.request_id] = st
        w.inbox.put(Submit(request))
        assert self._loop is not None
        st.timer = self._loop.call_later(self.settings.request_timeout_s, self._expire, st)
        return st

    def _expire(self, st: RequestState) -> None:
        self.cancel(st, ErrorCode.TIMEOUT.value, f"request exceeded the {self.settings.request_timeout_s:g}s deadline")

    def cancel(self, st: RequestState, code: str = ErrorCode.CANCELLED.value, message: str = "cancelled") -> None:
        """End ``st`` for its client now and ask the worker to drop it (client gone, timeout, drain)."""
        if st.worker_done:
            return
        st.push("failed", {"code": code, "message": message})
        if st.cancel_sent:
            return
        st.cancel_sent = True
        w = self.workers[st.worker_index]
        if w.process is not None and w.process.is_alive():
            w.inbox.put(Cancel(st.request_id))
        self._loop.call_later(CANCEL_CONFIRM_S, self._forget, st)  # type: ignore[union-attr]

    def _forget(self, st: RequestState) -> None:
        if not st.worker_done:
            logger.warning("worker %d never confirmed the cancel of %s", st.worker_index, st.request_id)
            self._close(st)

    def cancel_all(self, code: str, message: str) -> None:
        for st in list(self.requests.values()):
            self.cancel(st, code, message)
