"""Several replicas on one Redis queue: throughput of one replica vs two, and failover time.

One run, its own ``redis-server`` on a free loopback port (Debian package ``redis-server``):

1. **one replica** (``--redis-url``, one CPU thread): ``--requests`` synchronous ``/generate``
   requests at ``--concurrency``, images/s;
2. **two replicas** (a second one joins, one CPU thread each): the same load sent alternately to
   both, images/s, and how many each ran;
3. **failover**: ``--jobs`` jobs posted to B and followed on B (SSE); once A runs some of them,
   ``kill -9`` of A's whole process group; the time from the kill to each re-run job's
   ``started`` event on B (the lease, ``--lease-s``, plus the reclaim poll), and to the last image.

    .venv/bin/python bench/bench_replicas.py                       # tiny model, 64x64, 2 steps
    .venv/bin/python bench/bench_replicas.py --requests 200 --concurrency 16 --lease-s 5
    .venv/bin/python bench/bench_replicas.py --model ''             # the embedded demo model

Two one-thread replicas can at best double one replica's images/s, on a machine with two idle cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from redis_harness import MISSING, RedisServer, available  # noqa: E402
from server_harness import TINY_MODEL, LiveServer, iter_sse, metric, wait_for  # noqa: E402


def _replica(args: argparse.Namespace, url: str) -> LiveServer:
    # NOTE: LiveServer passes the tiny model first; this later --model wins ('' = the embedded demo model)
    return LiveServer("--devices", "cpu", "--threads", "1", "--redis-url", url, "--job-lease-s", str(args.lease_s),
                      "--max-queue", str(max(64, 2 * args.concurrency)), "--model", args.model, fake=False)  # fmt: skip


def _load(servers: list[LiveServer], body: dict[str, Any], n: int, concurrency: int) -> tuple[float, list[int]]:
    def one(i: int) -> int:
        with servers[i % len(servers)].client(timeout=600) as c:
            r = c.post("/generate", json={**body, "seed": i})
        return r.status_code

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as ex:
        codes = list(ex.map(one, range(n)))
    return time.monotonic() - t0, codes


def _completed(srv: LiveServer) -> float:
    return metric(srv.metrics(), "bitdance_requests_total", 'status="completed"')


def _follow(srv: LiveServer, job_id: str, out: list[tuple[float, str]]) -> None:
    with srv.client(timeout=600) as c, c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        for name, _ in iter_sse(r.iter_lines()):
            out.append((time.monotonic(), name))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TINY_MODEL), help="checkpoint dir; '' = the embedded demo model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--size", default="64x64", help="WxH of every request")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=6, help="jobs in flight when a replica is killed")
    ap.add_argument("--job-size", default="128x128", help="WxH of the failover jobs (they must run a while)")
    ap.add_argument("--job-steps", type=int, default=8)
    ap.add_argument("--lease-s", type=float, default=3.0)
    args = ap.parse_args()
    if not available():
        sys.exit(f"bench_replicas: {MISSING}")
    w, h = (int(v) for v in args.size.split("x"))
    body = {"prompt": "a red cube on a table", "width": w, "height": h, "steps": args.steps}
    jw, jh = (int(v) for v in args.job_size.split("x"))
    job = {"prompt": "a long one", "width": jw, "height": jh, "steps": args.job_steps, "seed": 7}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus {os.cpu_count()}")

    red = RedisServer()
    red.start()
    servers: list[LiveServer] = []
    try:
        a = _replica(args, red.url)
        servers.append(a)
        a.wait_ready(600)
        _load([a], body, 4, 4)  # warm-up
        t1, codes1 = _load([a], body, args.requests, args.concurrency)
        b = _replica(args, red.url)
        servers.append(b)
        b.wait_ready(600)
        _load([b], body, 4, 4)
        before = [_completed(a), _completed(b)]
        t2, codes2 = _load([a, b], body, args.requests, args.concurrency)
        ran = [_completed(a) - before[0], _completed(b) - before[1]]
        ok1, ok2 = codes1.count(200), codes2.count(200)
        print(f"\n{args.requests} requests {args.size} steps {args.steps}, concurrency {args.concurrency}, "
              f"one CPU thread per replica")  # fmt: skip
        print(f"{'replicas':>9} {'ok':>5} {'seconds':>8} {'images/s':>9}  ran (A, B)")
        print(f"{1:>9} {ok1:>5} {t1:>8.1f} {ok1 / t1:>9.2f}  ({args.requests}, 0)")
        print(f"{2:>9} {ok2:>5} {t2:>8.1f} {ok2 / t2:>9.2f}  ({int(ran[0])}, {int(ran[1])})")
        print(f"two replicas / one: {ok2 / t2 / (ok1 / t1):.2f}x")

        # failover: A dies while it runs jobs; B re-runs them after the lease
        with b.client() as c:
            ids = [c.post("/v1/jobs", json=job).json()["id"] for _ in range(args.jobs)]
        logs: dict[str, list[tuple[float, str]]] = {i: [] for i in ids}
        threads = [threading.Thread(target=_follow, args=(b, i, logs[i]), daemon=True) for i in ids]
        for t in threads:
            t.start()
        wait_for(lambda: a.info()["workers"][0]["in_flight"] > 0, 120, "A runs jobs")
        on_a = a.info()["workers"][0]["in_flight"]
        t0 = time.monotonic()
        os.killpg(a.proc.pid, signal.SIGKILL)
        for t in threads:
            t.join(600)
        rerun = []
        for log in logs.values():
            names = [n for _, n in log]
            if "requeued" in names:
                k = names.index("requeued")
                started = next(ts for ts, n in log[k:] if n == "started")
                rerun.append(started - t0)
        done = max(log[-1][0] for log in logs.values()) - t0
        ok = sum(1 for log in logs.values() if log and log[-1][1] == "completed")
        print(f"\nfailover: {args.jobs} jobs {args.job_size} steps {args.job_steps}, lease {args.lease_s:g}s; "
              f"A ran {on_a} when killed (kill -9 of its process group)")  # fmt: skip
        if rerun:
            print(f"kill -> re-run started on B: min {min(rerun):.1f}s, max {max(rerun):.1f}s ({len(rerun)} job(s) "
                  f"requeued); kill -> last image {done:.1f}s; {ok}/{args.jobs} completed")  # fmt: skip
        else:
            print(f"no job was requeued (A's jobs finished before the kill); {ok}/{args.jobs} completed")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for s in servers:
            s.kill()
        red.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
