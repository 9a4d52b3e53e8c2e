"""The shared queue's rules against a real ``redis-server`` (no model): global admission and its
Retry-After, the waiting gauge, cancel of a queued job, delete -> 410, leases and fencing (a
reclaimed job's old owner writes nothing, at most ``job_max_attempts`` runs), the result bounds,
and a replica that starts before Redis (``/readyz`` 503 naming Redis, then ready)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis_harness import MISSING, RedisServer, available
from server_harness import LiveServer, wait_for

from bitdance_core.engine.protocol import GenerationRequest
from server import redis_scripts as rs
from server.errors import APIError
from server.metrics import Metrics
from server.settings import Settings
from server.shared_queue import SharedQueue, request_from_json, request_to_json
from server.worker_pool import WorkerPool

pytestmark = pytest.mark.skipif(not available(), reason=MISSING)


@pytest.fixture()
def red() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def _req(seed: int = 1) -> GenerationRequest:
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt="a", height=64, width=64, seed=seed)


async def _queue(url: str, **kw: Any) -> tuple[SharedQueue, Metrics]:
    settings = Settings(redis_url=url, devices=["cpu"], **kw)
    metrics = Metrics()
    pool = WorkerPool(settings, metrics)  # never started: no worker is ready, so this replica pulls nothing
    queue = SharedQueue(settings, pool)
    await queue.start()
    for _ in range(100):
        if queue.up:
            break
        await asyncio.sleep(0.05)
    assert queue.up, queue.error
    return queue, metrics


def test_request_round_trip() -> None:
    req = GenerationRequest(request_id="x" * 32, prompt="p", height=32, width=64, seed=9, class_label=(1, 2),
                            metadata={"k": "v"})  # fmt: skip
    assert request_from_json(request_to_json(req)) == req
    data = {"images": [{"data": b"\x89PNG\x00", "tokens": None}], "token_shape": (2, 3)}
    assert rs.decode(rs.encode(data)) == {"images": [{"data": b"\x89PNG\x00", "tokens": None}], "token_shape": [2, 3]}


def test_global_admission_retry_after_and_waiting_gauge(red: RedisServer) -> None:
    async def run() -> None:
        queue, metrics = await _queue(red.url, max_queue=3)
        try:
            jobs = [await queue.submit(_req(i), "job", None) for i in range(3)]
            assert [j.status for j in jobs] == ["queued"] * 3
            assert [j.position for j in jobs] == [0, 1, 2]
            with pytest.raises(APIError) as exc:
                await queue.submit(_req(), "job", None)
            assert exc.value.code == "queue_full" and exc.value.status == 429
            await queue.refresh()
            assert queue.waiting == 3
            assert "bitdance_num_requests_waiting 3.0" in metrics.render().decode()
            assert queue.retry_after() is None  # nothing finished yet: no measurement
            now_ms = time.time() * 1000  # ten completions over the last 19.5 s: 0.51 per second
            red.client().zadd(rs.DONE, {f"done{i}": now_ms - 19_500 + i * 1950 for i in range(10)})
            await queue.refresh()
            assert queue.retry_after() == 8  # (3 waiting + this one) / 0.51 per second = 7.8
            # a cancel of a queued job frees its place at once, everywhere
            queue.cancel(jobs[0].st)
            await asyncio.sleep(0.2)
            await queue.refresh()
            assert queue.waiting == 2 and jobs[0].status == "cancelled"
            stored = await queue.open(jobs[0].id, live=False)
            assert stored is not None and stored.status == "cancelled"
            await queue.submit(_req(), "job", None)
            # delete: 410 on every replica (the tombstone), an unknown id 404 (None, no tombstone)
            await queue.delete(jobs[1])
            assert await queue.open(jobs[1].id, live=False) is None
            assert await queue.gone(jobs[1].id) == "deleted"
            assert await queue.gone(uuid.uuid4().hex) is None
        finally:
            await queue.close()

    asyncio.run(run())


def test_leases_fencing_and_attempts(red: RedisServer) -> None:
    async def run() -> None:
        queue, _ = await _queue(red.url, job_max_attempts=2)
        r = red.client()
        try:
            job = await queue.submit(_req(), "job", None)
            jk, ek = rs.job_key(job.id), rs.events_key(job.id)
            take, append = queue.s["TAKE"], queue.s["APPEND"]

            async def write(owner: str, attempt: int, kind: str, status: str = "") -> int:
                return await append(
                    keys=[jk, ek, rs.QUEUE, rs.gone_key(job.id), rs.FINISHED, rs.SIZES, rs.FINISHED_BYTES, rs.DONE],
                    args=[owner, attempt, kind, rs.encode({"step": 1, "total_steps": 4}), status, 100, 600, 256,
                          2**28, int(time.time() * 1000), rs.GROUP, 60],
                )  # fmt: skip

            r.xreadgroup(rs.GROUP, "X", {rs.QUEUE: ">"}, count=1)
            assert (await take(keys=[jk, ek], args=["X", 2, "lease_expired"]))[0] == 1
            await queue.refresh()
            assert queue.waiting == 0
            assert await write("X", 1, "progress") == 1
            # X stops renewing; Y takes the job over: a requeued event, attempt 2; X's writes are dropped
            assert (await take(keys=[jk, ek], args=["Y", 2, "lease_expired"]))[0] == 2
            assert await write("X", 1, "progress") == 0
            assert await queue.s["RENEW"](keys=[jk, rs.QUEUE], args=["X", 1, rs.GROUP]) == 0
            # Y is lost too: attempts used up, the next taker must fail it
            res = await take(keys=[jk, ek], args=["Z", 2, "lease_expired"])
            assert res[0] == -1 and res[1] == 2
            assert await write("Y", 2, "completed", "succeeded") == 0  # fenced: Z owns it now
            assert await write("Z", 2, "failed", "failed") == 1
            kinds = [f["k"] for _, f in r.xrange(ek)]
            assert kinds == ["queued", "progress", "requeued", "failed"], kinds
            assert r.hget(jk, "status") == "failed" and r.xlen(rs.QUEUE) == 0
            assert await write("Z", 2, "completed", "succeeded") == 0  # ends once
        finally:
            await queue.close()

    asyncio.run(run())


def test_result_bounds_evict_oldest_first(red: RedisServer) -> None:
    async def run() -> None:
        queue, _ = await _queue(red.url, job_max_results=2)
        r = red.client()
        try:
            ids = []
            for _ in range(3):
                job = await queue.submit(_req(), "job", None)
                jk, ek = rs.job_key(job.id), rs.events_key(job.id)
                await queue.s["TAKE"](keys=[jk, ek], args=["X", 3, ""])
                await queue.s["APPEND"](
                    keys=[jk, ek, rs.QUEUE, rs.gone_key(job.id), rs.FINISHED, rs.SIZES, rs.FINISHED_BYTES, rs.DONE],
                    args=["X", 1, "failed", rs.encode({"code": "internal_error", "message": "x"}), "failed", 1000,
                          600, 2, 2**28, int(time.time() * 1000), rs.GROUP, 60],
                )  # fmt: skip
                ids.append(job.id)
            assert await queue.gone(ids[0]) == "evicted" and not r.exists(rs.job_key(ids[0]))
            assert all(r.exists(rs.job_key(i)) for i in ids[1:])
            assert r.zcard(rs.FINISHED) == 2 and r.get(rs.FINISHED_BYTES) == "2000"
        finally:
            await queue.close()

    asyncio.run(run())


def test_replica_waits_for_redis_then_serves() -> None:
    red = RedisServer()  # its port is chosen, the server not started yet
    srv = LiveServer("--devices", "cpu", "--redis-url", red.url, env={"FAKE_WORKER_STEP_S": "0.01"})
    try:
        wait_for(lambda: _readyz(srv) is not None, 60, "the server answers")
        time.sleep(1.0)  # the worker is ready by now; Redis is not
        status, body = _readyz(srv)
        assert status == 503 and "unreachable" in body["redis"], body
        with srv.client() as c:
            r = c.post("/generate", json={"prompt": "a", "width": 64, "height": 64})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"
            assert "Redis" in r.json()["error"]["message"]
        red.start()
        srv.wait_ready(30)
        assert _readyz(srv)[1]["redis"] == "ok"
        with srv.client() as c:
            r = c.post("/generate", json={"prompt": "a", "width": 64, "height": 64})
            assert r.status_code == 200, r.text
            job = c.post("/v1/jobs", json={"prompt": "a", "width": 64, "height": 64}).json()
            got = wait_for(lambda: (j := c.get(job["status_url"]).json())["status"] == "succeeded" and j, 30, "job")
            assert got["result"]["images"]
    finally:
        srv.kill()
        red.close()


def _readyz(srv: LiveServer) -> tuple[int, dict[str, Any]] | None:
    try:
        r = httpx.get(srv.url + "/readyz", timeout=2)
    except httpx.TransportError:
        return None
    return r.status_code, r.json()


def test_delete_on_b_cancels_on_the_running_replica_at_once(red: RedisServer) -> None:
    """Over pub/sub, not by the next lease renewal (30 s lease here: renewals every 10 s)."""
    env = {"FAKE_WORKER_STEP_S": "0.2"}  # 64 steps of 256x256: about 13 s
    a, b = (LiveServer("--devices", "cpu", "--redis-url", red.url, env=env) for _ in range(2))
    try:
        a.wait_ready(60)
        b.wait_ready(60)
        with a.client() as ca, b.client() as cb:
            job = ca.post("/v1/jobs", json={"prompt": "a", "width": 256, "height": 256}).json()
            wait_for(lambda: cb.get(job["status_url"]).json()["status"] == "running", 30, "running")
            runner = next(s for s in (a, b) if s.info()["workers"][0]["in_flight"] == 1)
            time.sleep(2.0)  # the runner renewed the lease once (within 1 s of the start): the next is ~10 s away
            t0 = time.monotonic()
            assert cb.delete(job["status_url"]).json()["status"] == "cancelled"
            wait_for(lambda: runner.info()["workers"][0]["in_flight"] == 0, 3, "the worker drops it")
            assert time.monotonic() - t0 < 3
    finally:
        a.kill()
        b.kill()
