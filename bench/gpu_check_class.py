"""The class-conditional rows of the device check (bench/gpu_check.py): bf16 vs fp32, B-4x throughput against
the official-style batch sampler, H-1x latency.

* **bf16 vs fp32** on the class-conditional golden fixture (``reference-imagenet-tiny-a``): the engine's tokens
  in bfloat16 against float32, at the first AR step and over the image (the text-to-image row's target).
* **Throughput**: N concurrent one-image requests through the engine (each its own seed and generator) against
  the official way of sampling, ``model.sample`` on one batch of the N labels under one seed, which
  ``ClassConditionalPipeline`` reproduces bit for bit (``bench/bench_imagenet.py``), on the same random weights.
  The autoencoder decode is the same network on both sides and is excluded from both (stubbed).
* **Latency**: one request of one image, engine against that batch sampler with one label.

On a GPU the ratios have targets (PASS / FAIL); on CPU (``--smoke``: tiny presets) they are measured (INFO).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from bench_bf16 import drain

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import GenerationRequest
from bitdance_core.families.class_conditional.config import DEFAULT_STEPS
from bitdance_core.families.class_conditional.loader import load_class_model
from bitdance_core.families.class_conditional.pipeline import ClassConditionalPipeline
from bitdance_core.families.class_conditional.random_checkpoint import build_random_class_model
from bitdance_core.worker.worker import engine_for

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference-imagenet-tiny-a"
THROUGHPUT_TARGET = 0.9  # engine images/s over the batch sampler's: per-request generators and row buckets cost
LATENCY_TARGET = 1.1  # engine batch-1 latency over the batch sampler's


def _labels(n: int) -> list[int]:
    return [(207 + 131 * i) % 1000 for i in range(n)]


def _sync(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def check_bf16(device: str, smoke: bool) -> tuple:
    import json

    name = "class-conditional bf16 vs fp32 (fixture)"
    cases = json.loads((FIXTURE / "golden.json").read_text())["cases"]
    reqs = [GenerationRequest(f"case{i}", "", 256, 256, seed=c["seed"], steps=c["sample_steps"],
                              guidance_scale=c["cfg_scale"], num_images=c["n"], class_label=tuple(c["labels"]),
                              cfg_schedule=c["cfg_schedule"], preview_every=0) for i, c in enumerate(cases)
            if not smoke or i == 2]  # smoke: the cheapest guided case
    runs = {}
    try:
        for dtype in ("float32", "bfloat16"):
            model = load_class_model(FIXTURE / "BitDance_tiny_a_4x.pt", device, dtype,
                                     model_args=FIXTURE / "model_args_4x.json")
            if smoke:  # a bf16 decode at 256x256 takes minutes on a CPU: tokens only
                _stub_decode(model.ae)
            runs[dtype] = drain(engine_for(model, EngineConfig(max_batch_requests=4)), reqs)
    except Exception as e:  # noqa: BLE001 - the row reports it
        return name, f"failed: {type(e).__name__}: {str(e)[:160]}", "step-0 bits >= 0.95", "FAIL"
    P = model.config.parallel_num
    first = min(float((runs["float32"][k]["tokens"][:, :P] == runs["bfloat16"][k]["tokens"][:, :P]).float().mean())
                for k in runs["float32"])
    image = min(float((runs["float32"][k]["tokens"] == runs["bfloat16"][k]["tokens"]).float().mean())
                for k in runs["float32"])
    diff = max(float(np.abs(runs["float32"][k]["images"].astype(float) - runs["bfloat16"][k]["images"]).mean())
               for k in runs["float32"])
    pixels = "decode skipped" if smoke else f"image mean |d| {diff:.1f} levels"
    return (name, f"step-0 bits {first:.4f}, image bits {image:.4f}, {pixels} ({len(reqs)} cases)",
            "step-0 bits >= 0.95", "PASS" if first >= 0.95 else "FAIL")


def _stub_decode(ae) -> None:
    f = 2 ** (len(ae.decoder.up) - 1)
    ae.decode = lambda z, generator=None: torch.zeros(z.shape[0], 3, z.shape[2] * f, z.shape[3] * f, device=z.device)


def _model(preset: str, device: str, dtype: str | None):
    model = build_random_class_model(preset, device, dtype)
    _stub_decode(model.ae)  # the same network on both sides: excluded
    return model


def _engine_vs_batch(model, device: str, n: int, steps: int, engine: Engine) -> tuple[float, float]:
    g = model.config.default_guidance
    pipe = ClassConditionalPipeline(model)
    reqs = [GenerationRequest(f"n{n}-{i}", "", model.config.size[0], model.config.size[1], seed=1000 + i,
                              steps=steps, guidance_scale=g, class_label=(lab,), preview_every=0)
            for i, lab in enumerate(_labels(n))]
    t0 = _sync(device)
    drain(engine, reqs)
    t1 = _sync(device)
    pipe(_labels(n), seed=11, steps=steps, guidance_scale=g)
    t2 = _sync(device)
    return t1 - t0, t2 - t1


def check_throughput(device: str, dtype: str | None, smoke: bool) -> list[tuple]:
    preset, ns, steps = ("imagenet-tiny", [2], 2) if smoke else ("imagenet-b-4x", [8, 64], DEFAULT_STEPS)
    model = _model(preset, device, dtype)
    engine = engine_for(model, EngineConfig(max_batch_requests=max(ns)))
    _engine_vs_batch(model, device, 1, 1, engine)  # warm both sides
    rows = []
    for n in ns:
        eng_s, batch_s = _engine_vs_batch(model, device, n, steps, engine)
        ratio = batch_s / eng_s
        verdict = "INFO" if device == "cpu" else ("PASS" if ratio >= THROUGHPUT_TARGET else "FAIL")
        rows.append((f"class throughput at {n} concurrent ({preset} {steps} steps)",
                     f"engine {n / eng_s:.2f} img/s, official-style batch {n / batch_s:.2f} img/s = {ratio:.2f}x",
                     f">= {THROUGHPUT_TARGET}x the batch", verdict))
    return rows


def check_latency(device: str, dtype: str | None, smoke: bool) -> tuple:
    preset, steps = ("imagenet-tiny-1x", 2) if smoke else ("imagenet-h-1x", 50)
    model = _model(preset, device, dtype)
    engine = engine_for(model, EngineConfig(max_batch_requests=1))
    if not smoke:
        _engine_vs_batch(model, device, 1, 1, engine)  # warm both sides
    eng_s, batch_s = _engine_vs_batch(model, device, 1, steps, engine)
    x = eng_s / batch_s
    verdict = "INFO" if device == "cpu" else ("PASS" if x <= LATENCY_TARGET else "FAIL")
    return (f"class batch-1 latency ({preset} {steps} steps)", f"engine {eng_s:.2f}s, official-style {batch_s:.2f}s "
            f"= {x:.2f}x", f"<= {LATENCY_TARGET}x", verdict)
