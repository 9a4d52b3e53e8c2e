"""Two real ``bitdance serve`` replicas sharing one real Redis (issue 16), on loopback.

The tests start their own ``redis-server`` (Debian's package; ``.ci/run`` installs it) on a free
port with an append-only file, and two replicas with the real worker on the tiny checkpoint, one
CPU thread each, and a 2 s job lease. A single-node server (in memory, no Redis) gives the
reference image of every seed used. Covered: a job accepted by A is read, streamed and cancelled
through B; 200 requests at concurrency 16 spread over both, each image the single-node one; the
same Idempotency-Key gives one job; Redis stopped mid-run and restarted; ``kill -9`` of A's whole
process group while it runs jobs (B re-runs them after the lease, same images, ``requeued``).
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from redis_harness import MISSING, RedisServer, available
from server_harness import LiveServer, decode_b64, iter_sse, metric, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason=MISSING),
]

LEASE_S = 2.0
FAST = {"prompt": "a red cube on a table", "width": 64, "height": 64, "steps": 2}
LONG = {"prompt": "a long one", "width": 128, "height": 128, "steps": 8}  # 16 patches: a few seconds
ENDLESS = {"prompt": "an endless one", "width": 512, "height": 512, "steps": 100}
SEEDS = range(24)  # the 200-request test cycles through these; the single node draws each once
FLAGS = ("--devices", "cpu", "--threads", "1", "--max-queue", "256", "--restart-backoff-s", "0.2")


def _replica(redis_url: str) -> LiveServer:
    return LiveServer(*FLAGS, "--redis-url", redis_url, "--job-lease-s", str(LEASE_S), fake=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    red = RedisServer()
    red.start()
    single = LiveServer(*FLAGS, fake=False)  # in memory: the reference
    a, b = _replica(red.url), _replica(red.url)
    servers = {"redis": red, "single": single, "a": a, "b": b}
    try:
        for s in (single, a, b):
            s.wait_ready(240)
        with single.client() as c, ThreadPoolExecutor(4) as ex:
            refs = ex.map(lambda seed: _pixels(c.post("/generate", json={**FAST, "seed": seed}).json()), SEEDS)
            servers["refs"] = dict(zip(SEEDS, refs, strict=True))
            servers["long_ref"] = _pixels(c.post("/generate", json={**LONG, "seed": 7}).json())
        single.kill()
        yield servers
    finally:
        for s in (single, a, b):
            s.kill()
        red.close()


def _pixels(body: dict[str, Any]) -> np.ndarray:
    assert "images" in body, body
    return np.asarray(Image.open(io.BytesIO(decode_b64(body["images"][0]["b64_json"]))).convert("RGB"))


def _completed(srv: LiveServer) -> float:
    return metric(srv.metrics(), "bitdance_requests_total", 'status="completed"')


def _events(srv: LiveServer, job_id: str, out: list[tuple[str, dict[str, Any]]], timeout: float = 120) -> None:
    with srv.client(timeout=timeout) as c, c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        out.extend(iter_sse(r.iter_lines()))


def _engine_requests(srv: LiveServer) -> int:
    return srv.info()["workers"][0]["engine"].get("requests", 0)


def test_job_on_a_is_read_streamed_and_cancelled_through_b(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    with a.client() as ca, b.client() as cb:
        # a short job: its whole SSE log through B (replayed, then live), its result through both
        r = ca.post("/v1/jobs", json={**LONG, "seed": 7})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        live: list[tuple[str, dict[str, Any]]] = []
        t = threading.Thread(target=_events, args=(b, job_id, live))
        t.start()
        t.join(120)
        names = [n for n, _ in live]
        assert names[0] == "queued" and names[-1] == "completed" and names.count("completed") == 1, names
        assert "started" in names and "progress" in names
        replay: list[tuple[str, dict[str, Any]]] = []
        _events(b, job_id, replay)  # after the end: the same log, replayed
        assert [n for n, _ in replay if n != "preview"] == [n for n in names if n != "preview"]
        got_b, got_a = cb.get(f"/v1/jobs/{job_id}").json(), ca.get(f"/v1/jobs/{job_id}").json()
        assert got_b["status"] == got_a["status"] == "succeeded"
        assert np.array_equal(_pixels(got_b["result"]), cluster["long_ref"])
        assert np.array_equal(_pixels(live[-1][1]), cluster["long_ref"])

        # an endless job accepted by A, followed and cancelled through B
        job_id = ca.post("/v1/jobs", json=ENDLESS).json()["id"]
        events: list[tuple[str, dict[str, Any]]] = []
        t = threading.Thread(target=_events, args=(b, job_id, events))
        t.start()
        wait_for(lambda: any(n == "progress" for n, _ in events), 60, "progress through B")
        runner = wait_for(lambda: next((s for s in (a, b) if _engine_requests(s) > 0), None), 10, "the runner")
        assert cb.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        t0 = time.monotonic()
        gone = cb.delete(f"/v1/jobs/{job_id}")
        assert gone.status_code == 200 and gone.json()["status"] == "cancelled" and gone.json()["deleted"]
        t.join(10)
        assert events[-1] == ("error", {"code": "cancelled", "message": "cancelled by DELETE /v1/jobs/{id}"})
        wait_for(lambda: _engine_requests(runner) == 0, 5, "the runner frees the job's rows")
        assert time.monotonic() - t0 < 5
        for c in (ca, cb):
            assert c.get(f"/v1/jobs/{job_id}").status_code == 410
        assert ca.get(f"/v1/jobs/{'0' * 32}").status_code == 404


def test_200_requests_spread_over_both_replicas(cluster: dict[str, Any]) -> None:
    a, b, refs = cluster["a"], cluster["b"], cluster["refs"]
    before = {"a": _completed(a), "b": _completed(b)}
    seeds = [SEEDS[i % len(SEEDS)] for i in range(200)]

    def one(i: int) -> tuple[int, Any]:
        srv = a if i % 2 == 0 else b
        with srv.client(timeout=300) as c:
            r = c.post("/generate", json={**FAST, "seed": seeds[i]})
        return r.status_code, r.json()

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(200)))
    elapsed = time.monotonic() - t0
    assert [code for code, _ in results] == [200] * 200, [body for code, body in results if code != 200][:3]
    for i, (_, body) in enumerate(results):
        assert body["seed"] == seeds[i]
        assert np.array_equal(_pixels(body), refs[seeds[i]]), f"request {i} (seed {seeds[i]}) differs"
    ran = {"a": _completed(a) - before["a"], "b": _completed(b) - before["b"]}
    assert ran["a"] + ran["b"] == 200 and min(ran.values()) >= 50, (ran, elapsed)


def test_idempotency_key_gives_one_job(cluster: dict[str, Any]) -> None:
    a, b, red = cluster["a"], cluster["b"], cluster["redis"].client()
    jobs_before = len(red.keys("bd:job:*"))
    with a.client() as ca, b.client() as cb:
        key = {"Idempotency-Key": f"retry-{time.time()}"}
        first = ca.post("/v1/jobs", json={**FAST, "seed": 3}, headers=key)
        again = cb.post("/v1/jobs", json={**FAST, "seed": 3}, headers=key)
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        key = {"Idempotency-Key": f"sync-{time.time()}"}
        one = ca.post("/generate", json={**FAST, "seed": 5}, headers=key)
        two = cb.post("/generate", json={**FAST, "seed": 5}, headers=key)
        assert one.status_code == two.status_code == 200
        assert one.headers["x-request-id"] == two.headers["x-request-id"]
        assert np.array_equal(_pixels(one.json()), _pixels(two.json()))
        other = cb.post("/generate", json={**FAST, "seed": 5})  # no key: a new job
        assert other.headers["x-request-id"] != one.headers["x-request-id"]
    assert len(red.keys("bd:job:*")) == jobs_before + 3


def test_redis_stopped_mid_run_then_back(cluster: dict[str, Any]) -> None:
    a, b, red = cluster["a"], cluster["b"], cluster["redis"]
    pids = {name: [w["pid"] for w in s.info()["workers"]] for name, s in (("a", a), ("b", b))}
    done = {"a": _completed(a), "b": _completed(b)}
    with a.client() as ca:
        job_id = ca.post("/v1/jobs", json={**LONG, "seed": 7}).json()["id"]
        wait_for(lambda: ca.get(f"/v1/jobs/{job_id}").json()["status"] == "running", 60, "the job runs")
    red.stop()
    for srv in (a, b):
        with srv.client() as c:
            r = c.post("/generate", json={**FAST, "seed": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable", r.text
            assert int(r.headers["retry-after"]) >= 1
    ready = httpx.get(a.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and "unreachable" in ready.json()["redis"]
    # the job finishes on its replica while Redis is away
    wait_for(lambda: _completed(a) + _completed(b) > done["a"] + done["b"], 120, "the job completes locally")
    red.start()
    a.wait_ready(30)
    b.wait_ready(30)
    with b.client() as cb:
        got = wait_for(lambda: cb.get(f"/v1/jobs/{job_id}").json(), 30, "the job readable again")
        got = wait_for(lambda: (j := cb.get(f"/v1/jobs/{job_id}").json())["status"] == "succeeded" and j, 30, "result")
        assert np.array_equal(_pixels(got["result"]), cluster["long_ref"])
        assert cb.post("/generate", json={**FAST, "seed": 1}).status_code == 200
    for name, srv in (("a", a), ("b", b)):
        assert [w["pid"] for w in srv.info()["workers"]] == pids[name]
        assert metric(srv.metrics(), "bitdance_worker_restarts_total") == 0


def test_kill9_of_a_replica_its_jobs_rerun_on_the_other(cluster: dict[str, Any]) -> None:
    """Last: kills replica A."""
    a, b, red = cluster["a"], cluster["b"], cluster["redis"].client()
    with b.client() as cb:
        ids = [cb.post("/v1/jobs", json={**LONG, "seed": 7}).json()["id"] for _ in range(6)]
    streams: dict[str, list[tuple[str, dict[str, Any]]]] = {job_id: [] for job_id in ids}
    threads = [threading.Thread(target=_events, args=(b, job_id, streams[job_id])) for job_id in ids]
    for t in threads:
        t.start()
    wait_for(lambda: a.info()["workers"][0]["in_flight"] > 0, 60, "A runs jobs")
    on_a = a.info()["workers"][0]["in_flight"]
    t0 = time.monotonic()
    os.killpg(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)
    for t in threads:
        t.join(120)
    requeued = [job_id for job_id, ev in streams.items() if any(n == "requeued" for n, _ in ev)]
    assert 1 <= len(requeued) <= on_a, (on_a, {k: [n for n, _ in v] for k, v in streams.items()})
    for job_id, events in streams.items():
        names = [n for n, _ in events]
        assert names[-1] == "completed" and names.count("completed") == 1, names
        assert np.array_equal(_pixels(events[-1][1]), cluster["long_ref"])
        stored = [f["k"] for _, f in red.xrange(f"bd:ev:{job_id}")]
        assert stored.count("completed") == 1 and "failed" not in stored, stored
    for job_id in requeued:
        names = [n for n, _ in streams[job_id]]
        after = names[names.index("requeued") :]
        assert after[:2] == ["requeued", "started"], names
        reason = next(d for n, d in streams[job_id] if n == "requeued")
        assert reason["reason"].startswith("lease_expired") and reason["attempt"] == 2
    with b.client() as cb:
        assert all(cb.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded" for job_id in ids)
    assert time.monotonic() - t0 < 120
