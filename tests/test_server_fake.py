"""The HTTP server against the torch-free fake worker (tests/fake_worker.py), over real uvicorn on
127.0.0.1: validation, limits, auth, CORS, SSE, coalescing, timeouts, disconnects, crashes, drain.
These are the fault paths that are hard to trigger on a real model; test_server_real.py covers the
real worker."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
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
from server_harness import REPO, LiveServer, decode_b64, iter_sse, metric, wait_for

KEY = "test-key-123"
SLOW = {"width": 256, "height": 256}  # 64 AR steps x 20 ms = ~1.3 s on the fake worker


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    server = LiveServer(
        "--devices", "cpu", "--max-batch-requests", "2", "--max-queue", "2", "--request-timeout-s", "4",
        "--max-body-bytes", "4096", "--cors-origins", "http://ui.test", "--restart-backoff-s", "0.5",
        api_key=KEY, env={"FAKE_WORKER_STEP_S": "0.02"},
    )  # fmt: skip
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.kill() if server.stop() is None else None


@pytest.fixture()
def client(srv: LiveServer) -> Iterator[httpx.Client]:
    with srv.client() as c:
        yield c


def _stream(c: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> list[tuple[str, dict[str, Any]]]:
    with c.stream("POST", path, json=body, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(iter_sse(r.iter_lines()))


# ---- auth, CORS, limits -----------------------------------------------------------------------
def test_auth(srv: LiveServer) -> None:
    with httpx.Client(base_url=srv.url, timeout=10) as anon:
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            assert anon.get(path).status_code == 200, path
        r = anon.post("/generate", json={"prompt": "a"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert anon.get("/info").status_code == 401
        bad = anon.post("/v1/images/generations", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape
        assert bad.json()["error"]["type"] == "authentication_error" and "field" not in bad.json()["error"]
        assert anon.get("/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    # the two generation requests count; /info is not a generation route
    assert metric(srv.metrics(), "bitdance_requests_rejected_total", 'reason="unauthorized"') >= 2


def test_cors_only_for_configured_origins(client: httpx.Client) -> None:
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = client.options("/generate", headers={"Origin": "http://ui.test", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ui.test"
    other = client.options("/generate", headers={"Origin": "http://evil.test", **pre})
    assert "access-control-allow-origin" not in other.headers


def test_body_limit_413(client: httpx.Client) -> None:
    r = client.post("/generate", json={"prompt": "a" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must still hold
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# ---- validation -------------------------------------------------------------------------------
BAD_GENERATE = [
    ({"prompt": "a", "steps": 500}, "steps", "between 1 and 64"),
    ({"prompt": "a", "steps": 0}, "steps", "between 1 and 64"),
    ({"prompt": "a", "guidance_scale": 100}, "guidance_scale", "between"),
    ({"prompt": "a", "num_images": 9}, "num_images", "between 1 and 4"),
    ({"prompt": "a", "width": 100, "height": 100}, "size", "64x64"),
    ({"prompt": "a", "width": 64}, "height", "together"),
    ({"prompt": "a", "output_format": "gif"}, "output_format", "'webp'"),
    ({}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "at least 1"),
    ({"prompt": "x" * 1001}, "prompt", "at most 1000"),
    ({"prompt": "a", "guidance": 3}, "guidance", "not a known parameter"),
    ({"prompt": "a", "seed": -1}, "seed", "greater than or equal"),
    ({"prompt": "a", "steps": "4"}, "steps", "integer"),
    ({"prompt": " ".join(["word"] * 40)}, "prompt", "tokens"),  # rejected by the worker (token count)
]


@pytest.mark.parametrize(
    ("body", "field", "text"), BAD_GENERATE, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_GENERATE)]
)
def test_generate_validation_422(client: httpx.Client, body: dict[str, Any], field: str, text: str) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and err["field"] == field and text in err["message"], err


def test_broken_json_422(client: httpx.Client) -> None:
    r = client.post("/generate", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body" and "JSON" in r.json()["error"]["message"]
    r = client.post("/generate", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    # not UTF-8: the same answer as any other bad body, in each route's shape
    r = client.post("/generate", content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body" and "UTF-8" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", content=b"\xff{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "field" not in r.json()["error"]
    r = client.post("/v1/jobs", content=b"\xff{", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_streaming_token_limit_is_still_a_422(client: httpx.Client) -> None:
    r = client.post("/generate", json={"prompt": " ".join(["w"] * 40), "stream": True})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt"


BAD_OPENAI = [
    ({"prompt": "a", "size": "100x100"}, "size"),
    ({"prompt": "a", "size": "big"}, "size"),
    ({"prompt": "a", "response_format": "url"}, "response_format"),
    ({"prompt": "a", "n": 9}, "n"),
    ({"prompt": "a", "stream": True, "partial_images": 5}, "partial_images"),
    ({"prompt": "a", "background": "transparent"}, "background"),
    ({"prompt": "a", "style": "vivid"}, "style"),
    ({"prompt": "a", "output_compression": 50}, "output_compression"),  # png
    ({"prompt": "a", "quality": "high", "steps": 3}, "quality"),
    ({"prompt": "a", "moderation": "low"}, "moderation"),
]


@pytest.mark.parametrize(("body", "field"), BAD_OPENAI, ids=[c[1] for c in BAD_OPENAI])
def test_openai_validation_400_in_openai_shape(client: httpx.Client, body: dict[str, Any], field: str) -> None:
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == field, err
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"


# ---- responses --------------------------------------------------------------------------------
def test_generate_json_with_tokens_and_png_parameters(client: httpx.Client) -> None:
    r = client.post("/generate", json={"prompt": "a red cube", "seed": 7, "num_images": 2, "return_tokens": True,
                                       "width": 128, "height": 64})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["seed"], body["width"], body["height"]) == (7, 128, 64)
    assert set(body["timings"]) == {"queue_s", "generation_s", "total_s"}
    assert body["token_shape"] == [4 * 8, 16] and len(body["images"]) == 2
    for image in body["images"]:
        assert len(decode_b64(image["tokens"])) == 4 * 8 * 16 // 8
        png = Image.open(io.BytesIO(decode_b64(image["b64_json"])))
        assert png.format == "PNG" and png.size == (128, 64)
        params = json.loads(png.text["bitdance"])
        assert params["prompt"] == "a red cube" and params["seed"] == 7


def test_raw_image_by_accept(client: httpx.Client) -> None:
    r = client.post("/generate", json={"prompt": "a", "seed": 3}, headers={"Accept": "image/jpeg"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    assert r.headers["x-seed"] == "3" and float(r.headers["x-total-time"]) > 0
    r = client.post("/generate", json={"prompt": "a", "num_images": 2}, headers={"Accept": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "num_images"


def test_sse_framing_and_order(client: httpx.Client) -> None:
    for kw in ({"json_stream": True}, {"accept": True}):
        body = {"prompt": "a", "width": 128, "height": 128, "seed": 11, "stream": "json_stream" in kw}
        headers = {"Accept": "text/event-stream"} if "accept" in kw else {}
        events = _stream(client, "/generate", body, headers=headers)
        kinds = [k for k, _ in events]
        assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("completed") == 1
        assert set(kinds) <= {"queued", "started", "progress", "preview", "completed"} and "preview" in kinds
        assert len(events[0][1]["id"]) == 32
        steps = [d["step"] for k, d in events if k == "progress"]
        assert steps == sorted(steps) and steps[-1] == 16
        assert all(d["total_steps"] == d["patches"] == 16 for k, d in events if k in ("progress", "preview"))
        assert all(d["patch"] == d["step"] and d["diffusion_steps"] == 4 for k, d in events if k == "progress")
        for k, d in events:
            if k == "preview":
                assert decode_b64(d["b64_json"])[:4] == b"\x89PNG" and d["step"] < 16 and d["format"] == "png"
        done = events[-1][1]
        assert done["seed"] == 11 and done["width"] == 128 and len(done["images"]) == 1


def test_slow_sse_client_gets_coalesced_previews(srv: LiveServer) -> None:
    """A client that stops reading gets the newest preview later, not a backlog; the end is never lost."""
    payload = json.dumps({"prompt": "a", **SLOW, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    sock.recv(1)
    time.sleep(3.0)  # generation (~1.3 s) finishes while we do not read
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    sock.close()
    text = data.decode().split("\r\n\r\n", 1)[1]
    # undo chunked transfer encoding
    out, rest = "", text
    while rest:
        size_line, rest = rest.split("\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    events = list(iter_sse(iter(out.split("\n"))))
    previews = [d["step"] for k, d in events if k == "preview"]
    assert events[-1][0] == "completed"
    assert previews[-1] == 63 and len(previews) < 50, f"{len(previews)} previews, not coalesced: {previews}"
    assert previews == sorted(previews)


# ---- admission, timeouts, disconnects ---------------------------------------------------------
def test_overload_is_429_with_retry_after(srv: LiveServer) -> None:
    with srv.client() as c, ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda _: c.post("/generate", json={"prompt": "a", **SLOW}), range(6)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(429) >= 2 and codes.count(200) >= 2 and set(codes) <= {200, 429}, codes
    rejected = [r for r in results if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
    assert rejected[0].json()["error"]["code"] in ("overloaded", "queue_full")


def test_timeout_504_and_error_event(srv: LiveServer) -> None:
    before = metric(srv.metrics(), "bitdance_requests_total", 'status="timeout"')
    with srv.client() as c, ThreadPoolExecutor(2) as ex:
        plain = ex.submit(c.post, "/generate", json={"prompt": "__hang__"})
        streamed = ex.submit(_stream, c, "/generate", {"prompt": "__hang__", "stream": True})
        r, events = plain.result(30), streamed.result(30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert events[-1] == ("error", {"code": "timeout", "message": events[-1][1]["message"]})
    # the worker confirmed both cancels (the request left the engine)
    wait_for(lambda: metric(srv.metrics(), "bitdance_requests_total", 'status="timeout"') >= before + 2, 10, "timeouts")


def test_disconnect_cancels_in_the_worker(srv: LiveServer) -> None:
    def cancelled() -> float:
        return metric(srv.metrics(), "bitdance_requests_total", 'status="cancelled"')

    before = cancelled()
    with srv.client() as c, c.stream("POST", "/generate", json={"prompt": "a", **SLOW, "stream": True}) as r:
        for kind, _ in iter_sse(r.iter_lines()):
            if kind == "progress":
                break
    wait_for(lambda: cancelled() >= before + 1, 10, "streaming cancel confirmed by the worker")
    with srv.client(timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/generate", json={"prompt": "a", **SLOW})
    wait_for(lambda: cancelled() >= before + 2, 10, "non-streaming cancel confirmed by the worker")
    wait_for(lambda: metric(srv.metrics(), "bitdance_num_requests_running") == 0, 10, "rows freed")


# ---- worker faults ----------------------------------------------------------------------------
def test_worker_crash_fails_in_flight_then_recovers(srv: LiveServer) -> None:
    restarts = metric(srv.metrics(), "bitdance_worker_restarts_total")
    with srv.client() as c, ThreadPoolExecutor(2) as ex:
        victim = ex.submit(_stream, c, "/generate", {"prompt": "a", **SLOW, "stream": True})
        wait_for(lambda: srv.info()["workers"][0]["in_flight"] == 1, 10, "victim in flight")
        t0 = time.monotonic()
        r = c.post("/generate", json={"prompt": "__crash__"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_died"
        events = victim.result(10)
        assert time.monotonic() - t0 < 5
    assert events[-1][0] == "error" and events[-1][1]["code"] == "worker_died"
    assert [k for k, _ in events].count("error") == 1
    assert httpx.get(srv.url + "/readyz").status_code == 503  # within the 0.5 s restart back-off
    srv.wait_ready(30)
    assert metric(srv.metrics(), "bitdance_worker_restarts_total") == restarts + 1
    with srv.client() as c:
        assert c.post("/generate", json={"prompt": "a"}).status_code == 200


def test_worker_fatal_message(srv: LiveServer, client: httpx.Client) -> None:
    r = client.post("/generate", json={"prompt": "__fatal__"})
    assert r.status_code == 503 and "simulated fatal error" in r.json()["error"]["message"]
    srv.wait_ready(30)
    assert client.post("/generate", json={"prompt": "a"}).status_code == 200


def test_web_page_and_static(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "swagger" in client.get("/docs").text.lower()  # the README points users at /docs
    assert client.get("/static/no-such-file.js").status_code == 404


# ---- readiness and SIGTERM drain (own server) -------------------------------------------------
def test_not_ready_then_sigterm_drain_exits_0() -> None:
    server = LiveServer("--devices", "cpu", "--drain-grace-s", "4",
                        env={"FAKE_WORKER_STEP_S": "0.02", "FAKE_WORKER_LOAD_S": "2"})  # fmt: skip
    try:
        wait_for(lambda: _get(server.url + "/healthz") == 200, 30, "healthz")
        assert _get(server.url + "/readyz") == 503
        r = httpx.post(server.url + "/generate", json={"prompt": "a"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        server.wait_ready(30)
        results: dict[str, Any] = {}

        def call(name: str, prompt: str) -> None:
            results[name] = httpx.post(server.url + "/generate", json={"prompt": prompt, **SLOW}, timeout=30)

        threads = [threading.Thread(target=call, args=(n, p)) for n, p in (("slow", "a"), ("hang", "__hang__"))]
        for t in threads:
            t.start()
        wait_for(lambda: server.info()["workers"][0]["in_flight"] == 2, 10, "two requests in flight")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _get(server.url + "/readyz") == 503, 5, "readyz 503 while draining")
        late = httpx.post(server.url + "/generate", json={"prompt": "a"}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(30) == 0, server.log_text()
        for t in threads:
            t.join(10)
        assert results["slow"].status_code == 200  # finished within the grace period
        assert results["hang"].status_code == 503 and results["hang"].json()["error"]["code"] == "shutting_down"
        assert 3.5 < time.monotonic() - t0 < 20
    finally:
        server.kill()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def test_load_test_script_loses_nothing(srv: LiveServer) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load_test.py"), "--url", srv.url, "--api-key", KEY, "--requests", "24",
         "--concurrency", "4", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["completed"] + report["errors"] == 24 and report["lost"] == 0
    assert report["images"] == report["completed"] > 0 and report["latency_p95_s"] >= report["latency_p50_s"]


def test_openai_client_errors(srv: LiveServer) -> None:
    client = OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError, match="64x64"):
        client.images.generate(prompt="a", size="100x100")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="a")
    res = client.images.generate(prompt="a", size="128x64", output_format="webp")
    assert Image.open(io.BytesIO(decode_b64(res.data[0].b64_json))).format == "WEBP" and res.size == "128x64"
    with pytest.raises(openai.APIError, match="died"):
        list(client.images.generate(prompt="__crash__", stream=True, partial_images=1))
    srv.wait_ready(30)


def test_openai_models_retrieve_partial_format_and_unknown_routes(srv: LiveServer, client: httpx.Client) -> None:
    oc = OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    model = srv.info()["model"]
    got = oc.models.retrieve(model)
    assert got.id == model and got.object == "model" and got.owned_by == "bitdance"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oc.models.retrieve("dall-e-3")
    # partial images say the format of their own bytes (the fake worker's previews are PNG), not the final one's
    events = list(oc.images.generate(prompt="a", size="128x64", stream=True, partial_images=2, output_format="jpeg"))
    partial, done = events[:-1], events[-1]
    assert partial and all(e.type == "image_generation.partial_image" for e in partial)
    for e in partial:
        fmt = Image.open(io.BytesIO(decode_b64(e.b64_json))).format
        assert e.output_format == fmt.lower() == "png", (e.output_format, fmt)
    assert done.output_format == "jpeg" and Image.open(io.BytesIO(decode_b64(done.b64_json))).format == "JPEG"
    # unknown routes and wrong methods: client errors in OpenAI's shape, on the OpenAI paths and elsewhere
    for method, path, status in [("GET", "/v1/nope", 404), ("GET", "/nope", 404),
                                 ("GET", "/v1/images/generations", 405), ("DELETE", "/generate", 405)]:
        r = client.request(method, path)
        err = r.json()["error"]
        assert r.status_code == status and err["type"] == "invalid_request_error", (path, r.text)
        assert set(err) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        oc.get("/nope", cast_to=object)


def test_unclear_inputs_get_answers_that_name_the_real_problem(client: httpx.Client) -> None:
    for bad in ("not-a-job", "0" * 31, "A" * 32, "g" * 32, "a b"):  # malformed ids are unknown jobs, as the README says
        r = client.get(f"/v1/jobs/{bad}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (bad, r.text)
        assert client.delete(f"/v1/jobs/{bad}").status_code == 404
    deep = client.post("/generate", content=b"[" * 3000, headers={"Content-Type": "application/json"})
    err = deep.json()["error"]
    assert deep.status_code == 422 and err["field"] == "body" and "deeply" in err["message"], deep.text
    assert "UTF-8" not in err["message"]
    latin = client.post("/generate", content='{"prompt": "caf\xe9"}'.encode("latin-1"),
                        headers={"Content-Type": "application/json"})
    assert latin.status_code == 422 and "UTF-8" in latin.json()["error"]["message"], latin.text
    # a union-typed field is named as the client sent it, with what it may be
    r = client.post("/generate", json={"prompt": "a", "class_label": "1"})
    err = r.json()["error"]
    assert r.status_code == 422 and err["field"] == "class_label" and err["param"] == "class_label", r.text
    assert "an integer or a list of integers" in err["message"] and "class_label.int" not in r.text


def test_second_signal_forces_exit_and_kills_workers() -> None:
    server = LiveServer("--devices", "cpu", "--drain-grace-s", "60")
    try:
        server.wait_ready(30)
        pid = server.info()["workers"][0]["pid"]
        t = threading.Thread(target=lambda: _post_quietly(server.url + "/generate", {"prompt": "__hang__"}))
        t.start()
        wait_for(lambda: server.info()["workers"][0]["in_flight"] == 1, 10, "hanging request in flight")
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _get(server.url + "/readyz") == 503, 5, "draining")
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(20) == 1
        wait_for(lambda: not _alive(pid), 10, "worker gone")
        t.join(10)
    finally:
        server.kill()


def _post_quietly(url: str, body: dict[str, Any]) -> None:
    with contextlib.suppress(httpx.TransportError):
        httpx.post(url, json=body, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


def test_metric_names(srv: LiveServer, client: httpx.Client) -> None:
    assert client.post("/generate", json={"prompt": "a"}).status_code == 200
    assert client.post("/generate", json={"prompt": "a", "steps": 0}).status_code == 422
    text = srv.metrics()
    for name, kind in [
        ("bitdance_requests_total", "counter"), ("bitdance_requests_rejected_total", "counter"),
        ("bitdance_request_queue_time_seconds", "histogram"), ("bitdance_e2e_request_latency_seconds", "histogram"),
        ("bitdance_time_to_first_preview_seconds", "histogram"), ("bitdance_batch_size", "histogram"),
        ("bitdance_images_generated_total", "counter"), ("bitdance_num_requests_running", "gauge"),
        ("bitdance_num_requests_waiting", "gauge"), ("bitdance_worker_restarts_total", "counter"),
        ("bitdance_kv_cache_usage_ratio", "gauge"), ("bitdance_step_duration_seconds", "histogram"),
        ("bitdance_workers_ready", "gauge"),
    ]:  # fmt: skip
        assert f"# TYPE {name} {kind}" in text, name
    assert 'bitdance_step_duration_seconds_count{phase="step"}' in text
    assert 'bitdance_requests_rejected_total{reason="validation"}' in text
