"""``Retry-After`` of a full queue comes from the measured drain, not a constant (issue 17 item 8):
the formula, and a real server (fake worker, in memory) whose 429 says how long its queue takes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from server_harness import LiveServer

from server.drain import MAX_RETRY_AFTER_S, rate_of, retry_after_s

SLOW = {"prompt": "a", "width": 256, "height": 256}  # 64 AR steps x 50 ms: about 3.2 s per request


def test_formula() -> None:
    assert retry_after_s(5, None) is None  # not measured: the caller keeps its constant
    assert retry_after_s(0, 2.0) == 1
    assert retry_after_s(11, 0.5) == 24  # 12 requests to go at 0.5/s
    assert retry_after_s(10**6, 0.01) == MAX_RETRY_AFTER_S
    now = 1000.0
    assert rate_of([], now) is None
    assert rate_of([now - 100], now) is None  # outside the window
    assert rate_of([now - 10, now - 5, now], now) == 3 / 10
    assert rate_of([now, now, now], now) == 3.0  # one batch: at least a second apart, not infinite


def test_429_retry_after_is_the_measured_queue_drain() -> None:
    srv = LiveServer("--devices", "cpu", "--max-batch-requests", "1", "--max-queue", "1",
                     env={"FAKE_WORKER_STEP_S": "0.05"})  # fmt: skip
    try:
        srv.wait_ready(60)
        with srv.client() as c, ThreadPoolExecutor(3) as ex:
            first = list(ex.map(lambda _: c.post("/generate", json=SLOW), range(3)))
            assert sorted(r.status_code for r in first) == [200, 200, 429]
            unmeasured = next(r for r in first if r.status_code == 429)
            assert unmeasured.headers["retry-after"] == "1"  # nothing had finished: the constant
            t0 = time.monotonic()
            assert c.post("/generate", json=SLOW).status_code == 200
            per_request = time.monotonic() - t0
            time.sleep(0.3)  # the worker has dropped the finished one too
            futures = [ex.submit(c.post, "/generate", json=SLOW) for _ in range(2)]
            time.sleep(0.5)  # one runs, one waits
            full = c.post("/generate", json=SLOW)
            assert [f.result().status_code for f in futures] == [200, 200]
        assert full.status_code == 429
        # 3 completions over about 2 request times; 1 waiting + this one: about 2 request times
        assert int(full.headers["retry-after"]) >= max(2, int(per_request)), (full.headers, per_request)
    finally:
        srv.kill()
