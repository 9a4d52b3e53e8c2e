"""The fault ladder by fault injection (CPU): device errors are fatal, an out-of-memory fails its
step only and lowers the admission limit, a request's bad data fails that request alone; in the
engine, in ``AsyncEngine`` and through a real server with a real worker process."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine import FIXTURE, run_all

from bitdance_core.engine.async_engine import AsyncEngine
from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.faults import EngineDead, Fault, classify
from bitdance_core.engine.protocol import EventKind, GenerationRequest


@pytest.fixture(scope="module")
def model():
    from bitdance_core.families.text_to_image.loader import load_model

    return load_model(FIXTURE)


def req(rid: str, prompt: str = "a red circle", seed: int = 1, size: int = 64) -> GenerationRequest:
    return GenerationRequest(rid, prompt, size, size, seed=seed, steps=2, guidance_scale=3.0, preview_every=0)


def solo_tokens(model, r: GenerationRequest) -> torch.Tensor:
    results, _, _ = run_all(Engine(model, EngineConfig(max_batch_requests=1)), [r])
    return results[r.request_id].data["tokens"]


@pytest.mark.parametrize("exc,kind", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), Fault.DEVICE),
    (RuntimeError("CUDA error: device-side assert triggered"), Fault.DEVICE),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"), Fault.DEVICE),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), Fault.OUT_OF_MEMORY),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), Fault.OUT_OF_MEMORY),
    (RuntimeError("CUDA error: out of memory"), Fault.OUT_OF_MEMORY),
    (ValueError("token id 99999 out of range"), Fault.REQUEST),
    (IndexError("index 7 is out of bounds"), Fault.REQUEST),
    (RuntimeError("shape '[2, 4]' is invalid for input of size 7"), Fault.REQUEST),
])
def test_classify(exc, kind):
    assert classify(exc) is kind


def _raise_in_prior(monkeypatch, model, exc, times: int = 1):
    real = model.llm.forward
    left = [times]

    def forward(*a, **kw):
        if left[0] > 0:
            left[0] -= 1
            raise exc
        return real(*a, **kw)

    monkeypatch.setattr(model.llm, "forward", forward)


def test_device_error_is_fatal(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    for i in range(2):
        engine.add_request(req(f"r{i}", seed=i))
    engine.step()
    _raise_in_prior(monkeypatch, model, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(EngineDead, match="illegal memory access"):
        engine.step()


def test_out_of_memory_fails_the_step_lowers_the_limit_and_keeps_serving(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    for i in range(3):
        engine.add_request(req(f"r{i}", seed=i))
    engine.step()
    _raise_in_prior(monkeypatch, model, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    events = engine.step()
    failed = {e.request_id: e.data for e in events if e.kind is EventKind.FAILED}
    assert set(failed) == {"r0", "r1", "r2"}
    for data in failed.values():
        assert data["code"] == "out_of_memory"
        assert "3 requests" in data["message"] and "64x64" in data["message"] and "at most 1" in data["message"]
    assert engine.scheduler.max_batch_requests == 1 and not engine.has_work() and engine.scheduler.used_rows == 0
    # it keeps serving, one request at a time now, and the images are unchanged
    after = [req("a0", seed=5), req("a1", seed=6)]
    results, _, batches = run_all(engine, after)
    assert max(batches) == 1
    for r in after:
        assert results[r.request_id].kind is EventKind.COMPLETED
        assert torch.equal(results[r.request_id].data["tokens"], solo_tokens(model, r))


def test_bad_data_in_one_request_fails_it_alone(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    real = engine.runner.prefill

    def prefill(batch):
        if any(st.req.prompt == "poison" for st in batch):
            raise ValueError("token id 99999 is out of range for this vocabulary")
        return real(batch)

    monkeypatch.setattr(engine.runner, "prefill", prefill)
    good = [req("g0", seed=1), req("g1", seed=2)]
    results, _, batches = run_all(engine, [good[0], req("bad", "poison"), good[1]])
    assert results["bad"].kind is EventKind.FAILED and results["bad"].data["code"] == "internal_error"
    assert "out of range" in results["bad"].data["message"]
    assert batches[1:] and max(batches[1:]) == 2 and engine.scheduler.max_batch_requests == 4
    for r in good:
        assert results[r.request_id].kind is EventKind.COMPLETED
        assert torch.equal(results[r.request_id].data["tokens"], solo_tokens(model, r))


def test_other_step_failures_fail_that_batch_only(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    engine.add_request(req("r0"))
    engine.step()
    _raise_in_prior(monkeypatch, model, RuntimeError("shape '[2, 4]' is invalid for input of size 7"))
    events = engine.step()
    assert [(e.request_id, e.data["code"]) for e in events if e.kind is EventKind.FAILED] == [("r0", "internal_error")]
    results, _, _ = run_all(engine, [req("r1")])
    assert results["r1"].kind is EventKind.COMPLETED


def test_async_engine_device_error_ends_every_stream(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    aengine = AsyncEngine(engine)
    _raise_in_prior(monkeypatch, model, RuntimeError("CUDA error: device-side assert triggered"), times=100)

    async def main():
        last = [ev async for ev in aengine.generate(req("x"))][-1]
        assert last.kind is EventKind.FAILED and last.data["code"] == "worker_died"
        again = [ev async for ev in aengine.generate(req("y"))]
        assert len(again) == 1 and again[0].data["code"] == "worker_died"

    try:
        asyncio.run(main())
    finally:
        aengine.close()
    assert aengine.dead is not None and "device-side assert" in aengine.dead


@pytest.mark.slow
def test_real_worker_fault_ladder_over_http():
    """A real server and a real worker process (faults injected into its engine step, tests/faulty_worker.py):
    an OOM is a 503 out_of_memory and the same worker serves on; a device error is a 503 worker_died,
    the worker exits non-zero and the pool restarts it."""
    from server_harness import LiveServer, metric, wait_for

    srv = LiveServer("--devices", "cpu", "--restart-backoff-s", "0.2", fake=False,
                     env={"BITDANCE_WORKER_TARGET": "faulty_worker:worker_main"})
    fast = {"width": 64, "height": 64, "steps": 2}
    try:
        srv.wait_ready(180)
        pid = srv.info()["workers"][0]["pid"]
        with srv.client() as c:
            r = c.post("/generate", json={"prompt": "__oom__", **fast})
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "out_of_memory" and "64x64" in err["message"]
            assert "retry-after" in r.headers
            assert c.post("/generate", json={"prompt": "fine", **fast}).status_code == 200
            assert srv.info()["workers"][0]["pid"] == pid  # the same process, no restart
            restarts = metric(srv.metrics(), "bitdance_worker_restarts_total")

            r = c.post("/generate", json={"prompt": "__device_error__", **fast})
            assert r.status_code == 503 and r.json()["error"]["code"] == "worker_died", r.text
            assert "device-side assert" in r.json()["error"]["message"]
        wait_for(lambda: metric(srv.metrics(), "bitdance_worker_restarts_total") >= restarts + 1, 60, "a restart")
        srv.wait_ready(180)
        wait_for(lambda: srv.info()["workers"][0]["state"] == "ready", 120, "the worker back")
        assert srv.info()["workers"][0]["pid"] != pid
        with srv.client() as c:
            assert c.post("/generate", json={"prompt": "back", **fast}).status_code == 200
        assert "exit code 1" in srv.log_text() or "fatal" in srv.log_text()
    finally:
        srv.kill()
