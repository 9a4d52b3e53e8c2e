"""The HTTP server end to end with the REAL model worker on the tiny checkpoint
(tests/fixtures/reference-tiny-a), two CPU workers, real uvicorn on 127.0.0.1: concurrency and
batching, routing over both workers, SSE, the openai client, token-length validation in the
worker, disconnect -> cancel, kill -9 -> errors then recovery, SIGTERM drain -> exit 0.

Falls back to the fake worker only when bitdance_core/worker/worker.py is absent (or with
BITDANCE_TEST_WORKER=fake).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image
from server_harness import LiveServer, decode_b64, iter_sse, metric, real_worker_available, wait_for

REAL = real_worker_available()
FAST = {"width": 64, "height": 64, "steps": 2}
BATCHED = {"width": 128, "height": 128, "steps": 4}  # 16 AR steps: concurrent requests overlap in the engine
HANG_S = 20  # --worker-hang-s: far above one engine step, even next to a second test process (8 s was not)


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    env = {} if REAL else {"FAKE_WORKER_STEP_S": "0.02"}
    server = LiveServer(
        "--devices", "cpu,cpu", "--restart-backoff-s", "0.2", "--worker-hang-s", str(HANG_S), fake=not REAL, env=env
    )  # fmt: skip
    try:
        server.wait_ready(180)
        wait_for(lambda: all(w["state"] == "ready" for w in server.info()["workers"]), 120, "both workers ready")
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def slow(srv: LiveServer) -> dict[str, Any]:
    """A request that runs for seconds: the largest size, the most sampling steps."""
    info = srv.info()
    w, h = max((tuple(int(v) for v in s.split("x")) for s in info["sizes"]), key=lambda s: s[0] * s[1])
    return {"prompt": "a slow one", "width": w, "height": h, "steps": min(50, info["limits"]["steps"][1])}


@pytest.fixture(scope="module")
def endless(srv: LiveServer) -> dict[str, Any]:
    """A request far longer than any wait in these tests (tens of seconds), in short engine steps."""
    info = srv.info()
    w, h = max((tuple(int(v) for v in s.split("x")) for s in info["sizes"]), key=lambda s: s[0] * s[1])
    return {"prompt": "an endless one", "width": w, "height": h, "steps": min(100, info["limits"]["steps"][1])}


def _engine(srv: LiveServer, index: int) -> dict[str, Any]:
    """The worker's own counts (its last heartbeat): requests held, KV rows used, cancels, rows freed."""
    return next(w for w in srv.info()["workers"] if w["index"] == index)["engine"]


def _png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(decode_b64(b64)))
    img.load()
    return img


@pytest.mark.slow  # two real workers start for this module (~12-20 s): end to end only (tests/test_make_test.py)
def test_info_and_cors_off(srv: LiveServer) -> None:
    info = srv.info()
    assert info["model"] == ("reference-tiny-a" if REAL else "fake-tiny")
    assert "64x64" in info["sizes"] and info["limits"]["max_prompt_tokens"] > 0
    assert [w["device"] for w in info["workers"]] == ["cpu", "cpu"]
    r = httpx.options(
        srv.url + "/generate", headers={"Origin": "http://ui.test", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.slow
def test_16_concurrent_requests_complete_batched_on_both_workers(srv: LiveServer) -> None:
    before = {w["index"]: w["completed"] for w in srv.info()["workers"]}
    with srv.client() as c, ThreadPoolExecutor(16) as ex:
        results = list(
            ex.map(lambda i: c.post("/generate", json={"prompt": f"a cube {i}", "seed": i, **BATCHED}), range(16))
        )
    assert [r.status_code for r in results] == [200] * 16, [r.text for r in results if r.status_code != 200]
    for i, r in enumerate(results):
        body = r.json()
        assert body["seed"] == i and _png(body["images"][0]["b64_json"]).size == (128, 128)
    after = {w["index"]: w["completed"] for w in srv.info()["workers"]}
    assert all(after[k] > before[k] for k in after), (before, after)  # routed over both workers
    text = srv.metrics()
    steps = metric(text, "bitdance_batch_size_count")
    single = metric(text, "bitdance_batch_size_bucket", 'le="1.0"')
    assert steps > single, f"no engine step batched more than one request ({steps} steps)"
    assert metric(text, "bitdance_images_generated_total") >= 16
    assert metric(text, "bitdance_requests_total", 'status="completed"') >= 16


@pytest.mark.slow
def test_sse_with_real_previews(srv: LiveServer) -> None:
    body = {"prompt": "a red ball", "width": 128, "height": 128, "steps": 2, "seed": 5, "stream": True}
    with srv.client() as c, c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(iter_sse(r.iter_lines()))
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("completed") == 1
    assert "progress" in kinds and "preview" in kinds and "error" not in kinds
    previews = [d for k, d in events if k == "preview"]
    assert all(Image.open(io.BytesIO(decode_b64(p["b64_json"]))).size == (128, 128) for p in previews)
    done = events[-1][1]
    img = _png(done["images"][0]["b64_json"])
    assert img.size == (128, 128) and done["seed"] == 5
    if REAL:
        params = json.loads(img.text["bitdance"])
        assert (params["prompt"], params["seed"], params["steps"], params["model"]) == (
            "a red ball",
            5,
            2,
            "reference-tiny-a",
        )
        assert "Seed: 5" in img.text["parameters"]


@pytest.mark.slow
def test_raw_png_and_tokens(srv: LiveServer) -> None:
    with srv.client() as c:
        r = c.post("/generate", json={"prompt": "a", "seed": 1, **FAST}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
        body = c.post("/generate", json={"prompt": "a", "seed": 1, "return_tokens": True, **FAST}).json()
    n, bits = body["token_shape"]
    assert n == (64 // 16) ** 2 and len(decode_b64(body["images"][0]["tokens"])) == n * bits // 8


@pytest.mark.slow
def test_prompt_too_long_in_tokens_is_422_from_the_worker(srv: LiveServer) -> None:
    limits = srv.info()["limits"]
    rng = random.Random(0)
    words = ["".join(rng.choice("qzxjkvbwy") for _ in range(3)) for _ in range(limits["max_prompt_chars"] // 4)]
    prompt = " ".join(words)[: limits["max_prompt_chars"]]
    with srv.client() as c:
        r = c.post("/generate", json={"prompt": prompt, **FAST})
        assert (
            r.status_code == 422 and r.json()["error"]["field"] == "prompt" and "tokens" in r.json()["error"]["message"]
        )
        r = c.post("/generate", json={"prompt": prompt + "x" * 10, **FAST})  # too long in characters: API check
        assert r.status_code == 422 and "characters" in r.json()["error"]["message"]
        r = c.post("/generate", json={"prompt": "<|im_end|><|vision_start|> a cat", **FAST})  # special tokens are text
        assert r.status_code == 200


@pytest.mark.slow
def test_openai_client(srv: LiveServer) -> None:
    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == [srv.info()["model"]]
    res = client.images.generate(prompt="a blue sky", n=2, size="64x64", extra_body={"steps": 2, "seed": 3})
    assert len(res.data) == 2 and all(_png(d.b64_json).size == (64, 64) for d in res.data)
    stream = client.images.generate(
        prompt="a green tree", size="128x128", stream=True, partial_images=2, extra_body={"steps": 2}
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events[:2]:  # previews are JPEG, whatever the final format: the event says so
        assert e.output_format == "jpeg" and decode_b64(e.b64_json)[:3] == b"\xff\xd8\xff"
    assert events[-1].output_format == "png"
    assert client.models.retrieve(srv.info()["model"]).id == srv.info()["model"]
    assert _png(events[-1].b64_json).size == (128, 128) and events[-1].size == "128x128"


@pytest.mark.slow
def test_disconnect_cancels_in_the_worker(srv: LiveServer, endless: dict[str, Any]) -> None:
    """The engine itself frees the rows: its own cancel / freed-row counts move (a request that
    finished by itself would not move them)."""
    with srv.client() as c, c.stream("POST", "/generate", json={**endless, "stream": True}) as r:
        for kind, _ in iter_sse(r.iter_lines()):
            if kind == "progress":
                break
        busy = wait_for(lambda: next((w for w in srv.info()["workers"] if w["in_flight"] == 1), None), 10,
                        "a worker with the one request in flight")  # an earlier test's cancel may still be settling
        before = wait_for(lambda: (e := _engine(srv, busy["index"]))["used_rows"] > 0 and e, 5, "rows in use")
    wait_for(lambda: _engine(srv, busy["index"])["cancelled"] == before["cancelled"] + 1, 20, "the engine's cancel")
    after = _engine(srv, busy["index"])
    assert after["freed_rows"] - before["freed_rows"] == 2  # cond + uncond row of the one image
    assert after["used_rows"] == 0 and after["requests"] == 0
    assert metric(srv.metrics(), "bitdance_requests_total", 'status="cancelled"') >= 1


@pytest.mark.slow
def test_job_end_to_end_and_delete(srv: LiveServer, endless: dict[str, Any]) -> None:
    with srv.client() as c:
        r = c.post("/v1/jobs", json={"prompt": "a job", "seed": 9, **FAST})
        assert r.status_code == 202, r.text
        job = r.json()
        wait_for(lambda: c.get(job["status_url"]).json()["status"] == "succeeded", 60, "job succeeded")
        body = c.get(job["status_url"]).json()
        img = _png(body["result"]["images"][0]["b64_json"])
        assert img.size == (64, 64) and body["result"]["seed"] == 9
        with c.stream("GET", job["events_url"]) as ev:
            events = list(iter_sse(ev.iter_lines()))
        assert events[0][0] == "queued" and events[-1] == ("completed", body["result"])
        progress = [d for k, d in events if k == "progress"]
        patches = (64 // 16) ** 2 // srv.info()["parallel_num"]
        assert progress[-1]["patches"] == progress[-1]["patch"] == patches and progress[-1]["diffusion_steps"] == 2
        # the same image as /generate with the same inputs
        direct = c.post("/generate", json={"prompt": "a job", "seed": 9, **FAST}).json()
        assert _png(direct["images"][0]["b64_json"]).tobytes() == img.tobytes()
        # DELETE a running job: the engine drops it and frees its rows
        long_job = c.post("/v1/jobs", json=endless).json()
        wait_for(lambda: (c.get(long_job["status_url"]).json()["progress"] or {}).get("patch", 0) >= 1, 60, "running")
        index = next(w["index"] for w in srv.info()["workers"] if w["in_flight"] == 1)
        before = _engine(srv, index)
        assert c.delete(long_job["status_url"]).json()["status"] == "cancelled"
        assert c.get(long_job["status_url"]).status_code == 410
        wait_for(lambda: _engine(srv, index)["cancelled"] == before["cancelled"] + 1, 20, "engine cancel")
        assert _engine(srv, index)["used_rows"] == 0


@pytest.mark.slow
def test_openai_fidelity(srv: LiveServer) -> None:
    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    model = srv.info()["model"]
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="a", size="64x64")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a", size="64x64", style="vivid")
    assert e.value.param == "style" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="steps"):
        client.images.generate(prompt="a", size="64x64", quality="low", extra_body={"steps": 3})
    # quality -> steps per patch (recorded in the PNG's metadata), model by id and by alias
    steps = srv.info()["openai"]["quality_steps"]
    for name, quality in ((model, "low"), ("bitdance", "high")):
        res = client.images.generate(model=name, prompt="a", size="32x32", quality=quality, extra_body={"seed": 1})
        assert json.loads(_png(res.data[0].b64_json).text["bitdance"])["steps"] == steps[quality]
        assert res.quality == quality
    # usage counts the prompt's real tokens
    short = client.images.generate(prompt="a cat", size="32x32", quality="low")
    longer = client.images.generate(prompt="a cat sitting on a red chair in the sun", size="32x32", quality="low")
    assert 0 < short.usage.input_tokens < longer.usage.input_tokens
    assert short.usage.input_tokens == short.usage.input_tokens_details.text_tokens
    # output_compression is the jpeg quality
    sizes = []
    for level in (5, 95):
        res = client.images.generate(
            prompt="a", size="128x128", output_format="jpeg", output_compression=level, quality="low",
            extra_body={"seed": 2},
        )  # fmt: skip
        sizes.append(len(decode_b64(res.data[0].b64_json)))
    assert sizes[0] < sizes[1], sizes
    # streaming: usage in the completed event too
    events = list(client.images.generate(prompt="a dog", size="64x64", stream=True, partial_images=1, quality="low"))
    assert events[-1].type == "image_generation.completed" and events[-1].usage.input_tokens > 0


@pytest.mark.slow
def test_sigstop_worker_is_killed_and_restarted(srv: LiveServer, endless: dict[str, Any]) -> None:
    hangs = metric(srv.metrics(), "bitdance_worker_hangs_total")
    events: list[tuple[str, dict[str, Any]]] = []
    progressed = threading.Event()

    def victim() -> None:
        with srv.client() as c, c.stream("POST", "/generate", json={**endless, "stream": True}) as r:
            for ev in iter_sse(r.iter_lines()):
                events.append(ev)
                if ev[0] == "progress":
                    progressed.set()

    t = threading.Thread(target=victim)
    t.start()
    assert progressed.wait(60), events
    busy = next(w for w in srv.info()["workers"] if w["in_flight"] == 1)
    t0 = time.monotonic()
    os.kill(busy["pid"], signal.SIGSTOP)
    try:
        t.join(HANG_S + 15)
        assert not t.is_alive()
        waited = time.monotonic() - t0
        assert events[-1][0] == "error" and events[-1][1]["code"] == "worker_hung", events[-2:]
        assert HANG_S - 1 < waited < HANG_S + 10, waited
        ready = httpx.get(srv.url + "/readyz").json()
        state = next(w for w in ready["worker_states"] if w["index"] == busy["index"])
        assert state["hangs"] == 1 and state["state"] != "ready", ready
        wait_for(lambda: not _alive(busy["pid"]), 10, "the stopped worker killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(busy["pid"], signal.SIGCONT)
    wait_for(lambda: all(w["state"] == "ready" for w in srv.info()["workers"]), 180, "restarted")
    assert next(w for w in srv.info()["workers"] if w["index"] == busy["index"])["pid"] != busy["pid"]
    assert metric(srv.metrics(), "bitdance_worker_hangs_total") == hangs + 1
    assert metric(srv.metrics(), "bitdance_requests_total", 'status="worker_hung"') >= 1
    with srv.client() as c:
        assert c.post("/generate", json={"prompt": "after the hang", **FAST}).status_code == 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
def test_kill9_errors_then_recovery(srv: LiveServer, slow: dict[str, Any]) -> None:
    restarts = metric(srv.metrics(), "bitdance_worker_restarts_total")
    events: list[tuple[str, dict[str, Any]]] = []
    progressed = threading.Event()

    def victim() -> None:
        with srv.client() as c, c.stream("POST", "/generate", json={**slow, "stream": True}) as r:
            for ev in iter_sse(r.iter_lines()):
                events.append(ev)
                if ev[0] == "progress":
                    progressed.set()

    t = threading.Thread(target=victim)
    t.start()
    assert progressed.wait(60), events
    busy = [w for w in srv.info()["workers"] if w["in_flight"] == 1]
    assert len(busy) == 1
    t0 = time.monotonic()
    os.kill(busy[0]["pid"], signal.SIGKILL)
    t.join(15)
    assert not t.is_alive() and time.monotonic() - t0 < 10
    assert events[-1][0] == "error" and events[-1][1]["code"] == "worker_died", events[-3:]
    # the other worker keeps serving while the killed one restarts
    with srv.client() as c:
        assert c.post("/generate", json={"prompt": "still here", **FAST}).status_code == 200
        states = {w["index"]: w["state"] for w in srv.info()["workers"]}
        assert states[busy[0]["index"]] != "ready" or not REAL
        # with every worker dead: not ready, 503 at once
        for w in srv.info()["workers"]:
            if w["state"] == "ready":
                os.kill(w["pid"], signal.SIGKILL)
        srv.wait_unready(10)
        r = c.post("/generate", json={"prompt": "nobody home", **FAST})
        assert r.status_code == 503 and "retry-after" in r.headers
    srv.wait_ready(180)
    wait_for(lambda: all(w["state"] == "ready" for w in srv.info()["workers"]), 180, "both workers back")
    assert metric(srv.metrics(), "bitdance_worker_restarts_total") >= restarts + 2
    with srv.client() as c:
        assert c.post("/generate", json={"prompt": "back again", **FAST}).status_code == 200


@pytest.mark.slow
def test_sigterm_drains_and_exits_0(srv: LiveServer) -> None:
    """Last in this module: stops the module's server."""
    result: dict[str, httpx.Response] = {}
    body = {"prompt": "finish me", "width": 256, "height": 256, "steps": 4}

    def call() -> None:
        result["r"] = httpx.post(srv.url + "/generate", json=body, timeout=120)

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: any(w["in_flight"] for w in srv.info()["workers"]), 20, "request in flight")
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(90) == 0, srv.log_text()
    t.join(10)
    assert result["r"].status_code == 200, result["r"].text
