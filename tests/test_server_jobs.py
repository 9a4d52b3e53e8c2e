"""Async jobs and request accounting against the fake worker over real uvicorn on 127.0.0.1:
submit -> poll -> events (replayed, reopened without cancelling) -> result; DELETE cancels in the
worker and deletes; TTL and count eviction (410) vs unknown (404); queue limits (429); worker
death -> failed worker_died; a streaming /generate is a job too; every generation-route request
ends in exactly one bitdance_requests_total{status}. The real worker runs the same flows in
test_server_real.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from server_harness import LiveServer, iter_sse, metric, wait_for

SLOW = {"width": 256, "height": 256}  # 64 AR steps x 20 ms on the fake worker
OUTCOMES = ("completed", "invalid", "rejected", "too_large", "cancelled", "timeout", "worker_died", "worker_hung",
            "error")  # fmt: skip


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    server = LiveServer(
        "--devices", "cpu", "--max-batch-requests", "2", "--max-queue", "2", "--restart-backoff-s", "0.3",
        "--job-ttl-s", "3", "--job-max-results", "4", "--max-body-bytes", "4096", "--request-timeout-s", "5",
        env={"FAKE_WORKER_STEP_S": "0.02"},
    )  # fmt: skip
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.kill()


@pytest.fixture()
def c(srv: LiveServer) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


def _events(c: httpx.Client, url: str, stop_after: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with c.stream("GET", url) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for ev in iter_sse(r.iter_lines()):
            out.append(ev)
            if ev[0] == stop_after:
                break
    return out


def _totals(srv: LiveServer) -> dict[str, float]:
    text = srv.metrics()
    return {s: metric(text, "bitdance_requests_total", f'status="{s}"') for s in OUTCOMES}


def test_submit_poll_events_result(srv: LiveServer, c: httpx.Client) -> None:
    r = c.post("/v1/jobs", json={"prompt": "a cube", "seed": 4, "width": 128, "height": 128})
    assert r.status_code == 202, r.text
    job = r.json()
    assert set(job) == {"id", "status", "status_url", "events_url"} and job["status"] in ("queued", "running")
    assert r.headers["location"] == job["status_url"] == f"/v1/jobs/{job['id']}"
    # drop the event stream after two events, reopen it: the job keeps running, the replay starts over
    first = _events(c, job["events_url"], stop_after="progress")
    assert first[0][0] == "queued" and first[0][1]["id"] == job["id"]
    wait_for(lambda: c.get(job["status_url"]).json()["status"] == "succeeded", 20, "job done")
    replay = _events(c, job["events_url"])
    kinds = [k for k, _ in replay]
    assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("completed") == 1
    assert [d["patch"] for k, d in replay if k == "progress"] == list(range(1, 17))
    assert kinds.count("preview") <= 1  # previews are state: only the newest stays in the log
    body = c.get(job["status_url"], params={"preview": "true"}).json()
    assert body["status"] == "succeeded" and body["result"] == replay[-1][1]
    assert body["result"]["seed"] == 4 and len(body["result"]["images"]) == 1
    assert body["progress"]["patch"] == body["progress"]["patches"] == 16 and body["progress"]["fraction"] == 1.0
    assert body["preview"]["b64_json"] and body["position"] is None


@pytest.mark.slow
def test_queued_position_and_running_progress(srv: LiveServer, c: httpx.Client) -> None:
    ids = [c.post("/v1/jobs", json={"prompt": f"q{i}", **SLOW}).json()["id"] for i in range(3)]
    third = c.get(f"/v1/jobs/{ids[2]}").json()
    assert third["status"] == "queued" and third["position"] == 0 and third["progress"] is None
    wait_for(lambda: (c.get(f"/v1/jobs/{ids[0]}").json()["progress"] or {}).get("patch", 0) > 3, 10, "progress")
    running = c.get(f"/v1/jobs/{ids[0]}").json()
    assert running["status"] == "running" and 0 < running["progress"]["fraction"] < 1
    for job_id in ids:
        c.delete(f"/v1/jobs/{job_id}")


@pytest.mark.slow
def test_delete_cancels_in_the_worker_and_deletes(srv: LiveServer, c: httpx.Client) -> None:
    def engine() -> dict[str, Any]:
        return srv.info()["workers"][0]["engine"]

    before = wait_for(lambda: (e := engine()).get("requests") == 0 and e, 10, "an idle engine (earlier tests)")
    job = c.post("/v1/jobs", json={"prompt": "__hang__"}).json()  # can never finish by itself
    wait_for(lambda: c.get(job["status_url"]).json()["status"] == "running", 10, "running")
    r = c.delete(job["status_url"])
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["deleted"] is True
    assert c.get(job["status_url"]).status_code == 410 and c.get(job["events_url"]).status_code == 410
    # the worker dropped it: its own count of cancels and freed rows moved (a heartbeat reports them)
    after = wait_for(lambda: (e := engine())["cancelled"] == before["cancelled"] + 1 and e, 10, "engine cancel")
    assert after["freed_rows"] > before["freed_rows"]
    wait_for(lambda: engine()["requests"] == 0, 10, "the engine holds nothing")


@pytest.mark.slow
def test_streaming_generate_is_a_job_cancellable_by_id(srv: LiveServer, c: httpx.Client) -> None:
    with c.stream("POST", "/generate", json={"prompt": "__hang__", "stream": True}) as r:
        rid = r.headers["x-request-id"]
        events = iter_sse(r.iter_lines())
        kind, data = next(events)
        assert kind == "queued" and data["id"] == rid
        assert c.get(f"/v1/jobs/{rid}").json()["status"] in ("queued", "running")
        assert c.delete(f"/v1/jobs/{rid}").status_code == 200
        rest = list(events)
    assert rest[-1][0] == "error" and rest[-1][1]["code"] == "cancelled"


@pytest.mark.slow
def test_unknown_404_evicted_410_ttl_and_count(srv: LiveServer, c: httpx.Client) -> None:
    assert c.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert c.get("/v1/jobs/not-a-job-id").status_code == 404  # malformed: unknown, not a 422 with a regex
    ids = []
    for i in range(5):  # --job-max-results 4: the oldest of five finished results goes first
        job = c.post("/v1/jobs", json={"prompt": f"e{i}"}).json()
        wait_for(lambda job=job: c.get(job["status_url"]).json()["status"] == "succeeded", 10, "done")
        ids.append(job["id"])
    r = c.get(f"/v1/jobs/{ids[0]}")
    assert r.status_code == 410 and r.json()["error"]["code"] == "job_expired" and "evicted" in r.text
    assert all(c.get(f"/v1/jobs/{i}").status_code == 200 for i in ids[1:])
    time.sleep(3.2)  # --job-ttl-s 3
    assert all(c.get(f"/v1/jobs/{i}").status_code == 410 for i in ids[1:])


@pytest.mark.slow
def test_jobs_share_the_queue_limits(srv: LiveServer, c: httpx.Client) -> None:
    codes = [c.post("/v1/jobs", json={"prompt": "__hang__"}) for _ in range(6)]
    statuses = [r.status_code for r in codes]
    assert statuses.count(202) == 4 and statuses.count(429) == 2, statuses  # 2 running + 2 waiting
    assert all(int(r.headers["retry-after"]) >= 1 for r in codes if r.status_code == 429)
    for r in codes:
        if r.status_code == 202:
            c.delete(r.json()["status_url"])


@pytest.mark.slow
def test_worker_death_fails_the_job(srv: LiveServer, c: httpx.Client) -> None:
    victim = c.post("/v1/jobs", json={"prompt": "a", **SLOW}).json()
    wait_for(lambda: c.get(victim["status_url"]).json()["status"] == "running", 10, "running")
    assert c.post("/generate", json={"prompt": "__crash__"}).status_code == 503
    body = c.get(victim["status_url"]).json()
    assert body["status"] == "failed" and body["error"]["code"] == "worker_died"
    assert _events(c, victim["events_url"])[-1] == ("error", body["error"])
    srv.wait_ready(30)


@pytest.mark.slow
def test_every_generation_request_ends_in_exactly_one_status(srv: LiveServer) -> None:
    srv.wait_ready(30)
    before = _totals(srv)
    bodies: list[tuple[str, dict[str, Any] | bytes]] = [
        *[("/generate", {"prompt": "ok"})] * 3,
        *[("/generate", {"prompt": "a", "steps": 0})] * 5,  # invalid (API)
        *[("/generate", {"prompt": " ".join(["w"] * 40)})] * 2,  # invalid (worker: tokens)
        ("/generate", b'{"prompt": '),  # invalid (JSON)
        ("/generate", b"\xff\xfe{}"),  # invalid (not UTF-8)
        ("/generate", {"prompt": "x" * 5000}),  # too_large (body limit)
        ("/v1/images/generations", {"prompt": "a", "model": "dall-e-9"}),  # invalid (model_not_found)
        ("/v1/images/generations", {"prompt": "a", "n": 1}),
        ("/v1/jobs", {"prompt": "a", "num_images": 9}),
        *[("/generate", {"prompt": "a", **SLOW})] * 8,  # a burst: some completed, some rejected
    ]

    def call(item: tuple[str, Any]) -> int:
        path, body = item
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            if isinstance(body, bytes):
                return client.post(path, content=body, headers={"Content-Type": "application/json"}).status_code
            return client.post(path, json=body).status_code

    with ThreadPoolExecutor(8) as ex:
        statuses = list(ex.map(call, bodies))
    expected_invalid = sum(1 for s in statuses if s in (400, 404, 422))
    wait_for(lambda: sum(_totals(srv).values()) - sum(before.values()) >= len(bodies), 10, "all counted")
    time.sleep(0.3)
    delta = {k: v - before[k] for k, v in _totals(srv).items()}
    assert sum(delta.values()) == len(bodies), (delta, statuses)
    assert delta["invalid"] == expected_invalid == 11, (delta, statuses)
    assert delta["too_large"] == statuses.count(413) == 1
    assert delta["completed"] == statuses.count(200) and delta["rejected"] == statuses.count(429)
    assert statuses.count(429) >= 1, statuses
    text = srv.metrics()
    assert metric(text, "bitdance_requests_rejected_total", 'reason="queue_full"') >= statuses.count(429)
