"""``Retry-After`` of a full queue comes from the measured drain, not a constant (issue 17 item 8):
the formula, and a real server (fake worker, in memory) whose 429 says how long its queue takes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from server_harness import LiveServer

from server.drain import MAX_RETRY_AFTER_S, rate_of, retry_after_s

SLOW = {"prompt": "a", "width": 256, "height": 256}  # 64 AR steps x 30 ms: about 2 s per request


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
                     env={"FAKE_WORKER_STEP_S": "0.03"})  # fmt: skip
    try:
        srv.wait_ready(60)
        with srv.client() as c, ThreadPoolExecutor(4) as ex:
            first = list(ex.map(lambda _: c.post("/generate", json=SLOW), range(3)))
            codes = sorted(r.status_code for r in first)
            assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes
            # nothing had finished when these were refused: no measurement, the constant
            assert {r.headers["retry-after"] for r in first if r.status_code == 429} == {"1"}
            t0 = time.monotonic()
            assert c.post("/generate", json=SLOW).status_code == 200
            per_request = time.monotonic() - t0
            time.sleep(0.3)  # the worker has dropped the finished one too
            futures = []
            for _ in range(4):  # one runs, one waits, the rest are refused
                futures.append(ex.submit(c.post, "/generate", json=SLOW))
                time.sleep(0.3)
            later = [f.result() for f in futures]
        refused = [r for r in later if r.status_code == 429]
        assert refused and any(r.status_code == 200 for r in later), [r.status_code for r in later]
        # two completions over about two request times: (waiting + 1) x half a request time or more, never 1
        waits = [int(r.headers["retry-after"]) for r in refused]
        assert min(waits) >= max(2, int(per_request) // 2), (waits, per_request)
    finally:
        srv.kill()
