"""Latency and throughput of the engine with the real 14B shapes on one GPU (random weights).

    python bench/bench_gpu.py                         # 14b-64x preset, cuda, bf16, 1024x1024, 50 steps, g 7.5
    python bench/bench_gpu.py --preset tiny --device cpu --size 128x128 --steps 4 --batches 1,2   # smoke test

Prints batch-1 latency against the memory-bandwidth floor (every AR step reads the head's weights S+1
times and the prior's once) and images/s at saturation against the compute ceiling (FLOPs per image
from the cost model: 2 x params x tokens for prior and head). Uses ``EngineConfig(profile=True)`` for an
exact per-phase split. Nothing is downloaded: the model is built on the device by
``bitdance_core.families.text_to_image.random_checkpoint.build_random_model``.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.engine.serving_config import ServingConfig
from bitdance_core.families.text_to_image.random_checkpoint import build_random_model
from bitdance_core.loading.quantize import MODES, quantize_module_, tensor_bytes
from bitdance_core.models import attention
from bitdance_core.worker.worker import engine_for

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
BF16_FLOPS = {"H200": 989e12, "H100": 989e12}


def params_bytes(module) -> int:
    return sum(tensor_bytes(p) for p in module.parameters())  # quantised weights as stored


def run(engine: Engine, n: int, h: int, w: int, steps: int, guidance: float) -> tuple[float, float]:
    t0 = time.perf_counter()
    for i in range(n):
        engine.add_request(GenerationRequest(f"b{n}-{i}-{time.time_ns()}", f"benchmark prompt {i}", h, w, seed=i,
                                             steps=steps, guidance_scale=guidance, preview_every=0))
    first_done = None
    while engine.has_work():
        for ev in engine.step():
            if ev.kind is EventKind.COMPLETED and first_done is None:
                first_done = time.perf_counter() - t0
            if ev.kind is EventKind.FAILED:
                raise RuntimeError(ev.data)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, first_done or 0.0


def measure(preset: str = "14b-64x", device: str = "cuda", dtype: str | None = None, size: str = "1024x1024",
            steps: int = 50, guidance: float = 7.5, batches=(1, 4, 16), log=print, quantize: str = "none") -> dict:
    """Build the random model, warm up, run each batch size; returns the numbers the table and
    ``bench/gpu_check.py`` use (peak memory measured on CUDA during the largest batch)."""
    w, h = (int(x) for x in size.split("x"))
    t0 = time.perf_counter()
    model = build_random_model(preset, device, dtype)
    quantize_module_(model.llm, quantize, model.placement)  # as a --quantize load keeps the prior
    serving = ServingConfig.for_model(model.config, {"sizes": [[h, w]], "default_size": [h, w]})
    engine = engine_for(model, EngineConfig(max_batch_requests=max(batches), profile=True), serving)
    log(f"built {preset} (quantize {quantize}) on {device} in {time.perf_counter() - t0:.1f}s; attention "
        f"{attention.resolve_backend(engine.device)}; KV rows {engine.cache.rows} x {engine.max_seq_len}")
    run(engine, 1, h, w, 2, guidance)  # warm-up
    T = engine.sizes.ar_steps(h, w)
    head_b, prior_b = params_bytes(model.head), params_bytes(model.llm) - tensor_bytes(model.llm.embed_tokens.weight)
    cuda = engine.device.type == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in gpu), None)
    peak_flops = next((v for k, v in BF16_FLOPS.items() if k in gpu), None)
    tokens = (h // model.config.downsample) * (w // model.config.downsample)
    rows = 2 if guidance > 1 else 1
    flops = 2 * rows * tokens * ((steps + 1) * sum(p.numel() for p in model.head.parameters())
                                 + sum(p.numel() for p in model.llm.parameters()))
    floor = (head_b * T * (steps + 1) + prior_b * T) / bw if bw else None
    log(f"{gpu}: T={T} AR steps, head {head_b / 1e9:.2f} GB, prior {prior_b / 1e9:.2f} GB, "
        f"{flops / 1e15:.3f} PFLOP per image")
    out = {"gpu": gpu, "ar_steps": T, "flops_per_image": flops, "bandwidth_floor_s": floor, "batches": {},
           "engine": engine, "size": (h, w)}
    for n in batches:
        if cuda and n == max(batches):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        total, first = run(engine, n, h, w, steps, guidance)
        res = {"total_s": total, "first_s": first, "images_per_s": n / total}
        if cuda and n == max(batches):
            res["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if peak_flops:
            res["compute_fraction"] = n * flops / total / peak_flops
        out["batches"][n] = res
        split = ", ".join(f"{k} {v * 1e3:.1f}ms" for k, v in engine.last_phases.items())
        line = f"batch {n:>3}: {total:.2f}s total, first image {first:.2f}s, {n / total:.3f} img/s"
        if floor:
            line += f"; bandwidth floor {floor:.2f}s (x{first / floor:.2f})"
        if peak_flops:
            line += f"; {n * flops / total / 1e15:.2f} PFLOP/s = {100 * res['compute_fraction']:.0f}% of bf16 peak"
        log(line)
        log(f"   last step: {split}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="14b-64x")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--size", default="1024x1024", help="WxH")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--quantize", default="none", choices=MODES, help="quantise the prior's linears (as a "
                    "--quantize load does) after building it; run once per mode to compare")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    attention.set_backend(args.attention)
    measure(args.preset, args.device, args.dtype, args.size, args.steps, args.guidance,
            [int(x) for x in args.batches.split(",")], quantize=args.quantize)


if __name__ == "__main__":
    main()
