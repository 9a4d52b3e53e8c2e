"""bfloat16 everywhere it runs: the engine and a real server in bf16 on CPU, and how close bf16 comes to
float32 on the golden fixture (bench/bench_bf16.py holds the measurement; the numbers are in bench/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.families.text_to_image.loader import load_model
from bitdance_core.worker.worker import pack_tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_bf16  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"


@pytest.fixture(scope="module")
def bf16():
    return load_model(FIXTURE, "cpu", "bfloat16")


def _run(model, reqs):
    engine = Engine(model, EngineConfig(max_batch_requests=8))
    assert engine.info()["dtype"] == str(model.llm.dtype).removeprefix("torch.")
    out = {}
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        for ev in engine.step():
            assert ev.kind is not EventKind.FAILED, ev.data
            if ev.kind is EventKind.COMPLETED:
                out[ev.request_id] = ev.data
    return out


# bf16 on CPU is slow: make test-fast runs the cheapest case (64x128, 4 steps, unguided, 2 images; ~4 s), the CI gate
# all three together in one engine
@pytest.mark.parametrize("cases", [pytest.param((1,), id="case1"),
                                   pytest.param((0, 1, 2), id="all", marks=pytest.mark.slow)])
def test_engine_runs_in_bf16_close_to_the_float32_golden_tokens(bf16, cases):
    """Every layer runs in bf16 (weights, KV cache, activations); the first block is sampled from the
    same noise as float32, so its bits mostly agree, and the images stay close to float32's."""
    from safetensors.torch import load_file

    assert bf16.llm.dtype == bf16.head.dtype == torch.bfloat16
    golden = load_file(str(FIXTURE / "golden.safetensors"))
    reqs = bench_bf16.golden_requests(FIXTURE)
    out = _run(bf16, [reqs[i] for i in cases])
    P = bf16.config.parallel_num
    for i, r in enumerate(reqs):
        if i not in cases:
            continue
        tok, want = out[r.request_id]["tokens"], golden[f"case{i}.tokens"]
        assert tok.shape == want.shape and set(tok.unique().tolist()) <= {-1, 1}
        assert (tok[:, :P] == want[:, :P]).float().mean() >= 0.95  # measured 0.984 on every case
        assert (tok == want).float().mean() >= 0.90  # measured 0.957-0.994
        img = out[r.request_id]["images"].astype(np.float64)
        assert np.abs(img - golden[f"case{i}.image"].numpy()).mean() < 40  # measured 7.5-18.3 (random: ~80)


@pytest.mark.slow  # over 40 s at load 10: the CI gate runs it, make test-fast does not
def test_bf16_measurement_reports_every_number(monkeypatch):
    res = bench_bf16.measure(FIXTURE, "cpu")
    assert len(res["cases"]) == 3
    for c in res["cases"]:
        assert 0.9 <= c["first_step_bits"] <= 1 and 0.85 <= c["image_bits"] <= 1
        assert 0 <= c["image_mean_abs"] < 40
    inv = res["bf16_batch_invariance"]
    assert inv["identical_requests"].endswith("/3") and inv["min_bit_agreement"] >= 0.9


@pytest.mark.slow
def test_real_server_serves_bfloat16():
    """``--dtype bfloat16`` through a real uvicorn + worker: /info says so and the tokens are the
    in-process bf16 engine's."""
    from server_harness import LiveServer, decode_b64

    # no warm-up: it measures step costs for the preview method and does not change what is checked here
    server = LiveServer("--devices", "cpu", "--dtype", "bfloat16", "--no-warmup", fake=False)
    try:
        server.wait_ready(180)
        info = server.info()
        assert [w.get("dtype") for w in info["workers"]] == ["bfloat16"] or info.get("dtype") == "bfloat16", info
        req = {"prompt": "a red circle", "seed": 3, "width": 64, "height": 64, "steps": 3, "guidance_scale": 4.0,
               "return_tokens": True}
        with server.client() as c:
            body = c.post("/generate", json=req).json()
    finally:
        server.kill()
    want = _run(load_model(FIXTURE, "cpu", "bfloat16"),
                [GenerationRequest("x", "a red circle", 64, 64, seed=3, steps=3, guidance_scale=4.0)])["x"]
    assert decode_b64(body["images"][0]["tokens"]) == pack_tokens(want["tokens"][0].numpy())


@pytest.mark.slow  # 3 cases in bf16 and float32 with 256x256 decodes: minutes on CPU; the CI gate runs it
def test_class_conditional_engine_runs_in_bf16_close_to_float32():
    """A class-conditional model in bfloat16 (the CUDA default) runs: its 2-D RoPE tables stay float32 (the
    reference rotates in float32) and the runner keeps the dtype the prior's ``rope`` returns. Agreement with
    float32 on the class-conditional golden fixture (bench_bf16.py --family class-conditional)."""
    res = bench_bf16.measure_class(bench_bf16.CLASS_FIXTURE, "cpu")
    assert len(res["cases"]) == 3
    for c in res["cases"]:
        # measured on case0 (2026-12-05): step-0 bits 0.9961, but image bits 0.5439 and mean |d| 49 of 255: later
        # blocks drift much further from float32 than text-to-image's (0.957-0.994); asserted: what holds
        assert c["first_step_bits"] >= 0.95, c
        assert 0.5 <= c["image_bits"] <= 1 and c["image_mean_abs"] < 80, c


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_real_server_serves_a_class_conditional_model_in_bfloat16(tmp_path):
    """``bitdance serve --model <imagenet-tiny .pt> --dtype bfloat16`` becomes ready and serves an image (its warm-up
    used to fail on every step and the worker restarted forever)."""
    from unittest import mock

    from server_harness import LiveServer, decode_b64

    from bitdance_core.families.class_conditional.random_checkpoint import (
        CLASS_PRESETS,
        TINY,
        TINY_DDCONFIG,
        ClassPreset,
        write_class_checkpoint,
    )

    # 64x64 (4 AR steps): a 256x256 decode in bf16 on a CPU without bf16 kernels takes minutes; the step is the bug
    small = ClassPreset("BitDance_tiny_4x.pt", "BitDance-Tiny", {**TINY, "image_size": 64}, 4, 4, TINY_DDCONFIG)
    with mock.patch.dict(CLASS_PRESETS, {"bf16-64": small}):
        ckpt = write_class_checkpoint("bf16-64", tmp_path)
    server = LiveServer("--model", str(ckpt), "--devices", "cpu", "--dtype", "bfloat16", fake=False)
    try:
        server.wait_ready(600)  # the warm-up (a 256x256 image end to end) is what used to fail, forever
        info = server.info()
        assert info["kind"] == "class-conditional"
        assert [w.get("dtype") for w in info["workers"]] == ["bfloat16"] or info.get("dtype") == "bfloat16", info
        with server.client(timeout=600) as c:
            r = c.post("/generate", json={"class_label": 3, "seed": 1, "steps": 2, "guidance_scale": 2.0})
    finally:
        server.kill()
    assert r.status_code == 200, r.text
    png = decode_b64(r.json()["images"][0]["b64_json"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and r.json()["width"] == 64
