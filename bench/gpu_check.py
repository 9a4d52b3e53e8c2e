"""One device check: the engine's GPU promises measured in one short run, printed as one table.

    bash bench/gpu_check.sh             # a GPU machine: under 8 minutes on one H200
    bash bench/gpu_check.sh --smoke     # CPU, tiny shapes, about a minute: the same code paths (CI)
    python bench/gpu_check.py --json    # the rows as JSON

Rows (check, measured, target, verdict PASS / FAIL / INFO / SKIP):

1. bf16 vs fp32 on the golden fixture (``bench_bf16.measure``): token bits at the first AR step (``--smoke``:
   the first case);
2. xformers vs SDPA: the fixture's requests through each backend (SKIP without xformers);
3. sync-free warm steps: ``torch.cuda.set_sync_debug_mode("error")`` around the runner's warm steps
   (on CPU the dispatch-mode proxy: ``aten.item`` / ``_local_scalar_dense`` / device-to-host copies fail);
4. CUDA graphs on == off: the fixture's requests, token for token, an engine with graphs on (FAIL when no
   graph was captured or a capture failed) against one with graphs off; on CPU "on" is the recording stand-in
   (``recorded_graph.py``: the recorded kernels replayed on the captured storages);
5. ``bench_gpu.measure`` on random 14B-64x weights: batch-1 latency against the bandwidth floor
   (target <= 1.3x) and images/s at 16 concurrent against the bf16 compute ceiling (target >= 50%);
6. memory: the peak allocated during the 16-request run against the plan's prediction for the same
   engine (``memory_plan.measure_peaks``): the plan must not be below it (on CPU: the live bytes of the
   real run against the fake one);
7. ``--quantize int8`` and ``fp8`` (issue #12): the same measure with the prior quantised, batch-1 latency and
   throughput next to the bf16 rows (INFO; fp8 is skipped, with the device's capability, where unsupported);
8. class-conditional models (``gpu_check_class.py``): bf16 vs fp32 on their golden fixture, B-4x images/s at 8
   and 64 concurrent against the official-style batch sampler on the same random weights, H-1x batch-1 latency.

A row whose target cannot be judged here says SKIP or INFO, never PASS.

Exit status 1 when a row FAILs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_bf16  # noqa: E402
import bench_gpu  # noqa: E402
import gpu_check_class  # noqa: E402

from bitdance_core.engine.engine import Engine, EngineConfig  # noqa: E402
from bitdance_core.engine.recorded_graph import RecordingBackend  # noqa: E402
from bitdance_core.families.text_to_image.loader import load_model  # noqa: E402
from bitdance_core.models import attention  # noqa: E402
from bitdance_core.worker.worker import engine_for  # noqa: E402

FIXTURE = bench_bf16.FIXTURE
aten = torch.ops.aten
_SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}


class _NoHostSync(TorchDispatchMode):
    """CPU proxy of the CUDA sync-debug mode: an op that reads a tensor on the host raises."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            raise RuntimeError(f"host sync in a warm step: {func}")
        return func(*args, **(kwargs or {}))


def _tokens(model, reqs, engine: Engine | None = None, **cfg) -> dict:
    engine = engine or engine_for(model, EngineConfig(max_batch_requests=max(4, len(reqs)), **cfg))
    return {rid: data["tokens"] for rid, data in bench_bf16.drain(engine, reqs).items()}


def _agreement(a: dict, b: dict) -> float:
    return min(float((a[k] == b[k]).float().mean()) for k in a)


def check_bf16(device: str, smoke: bool = False) -> tuple:
    res = bench_bf16.measure(FIXTURE, device, cases=[1] if smoke else None, invariance=False)  # smoke: the cheapest
    first = min(c["first_step_bits"] for c in res["cases"])
    image = min(c["image_bits"] for c in res["cases"])
    return ("bf16 vs fp32 (fixture)", f"step-0 bits {first:.4f}, image bits {image:.4f}", "step-0 bits >= 0.95",
            "PASS" if first >= 0.95 else "FAIL")


def check_attention(device: str) -> tuple:
    name = "xformers vs SDPA (fixture)"
    if not attention.xformers_available() or device == "cpu":
        return name, "xformers not available here", "token bits >= 0.99", "SKIP"
    model = load_model(FIXTURE, device, "float32")
    reqs = bench_bf16.golden_requests(FIXTURE)
    try:
        attention.set_backend("sdpa")
        a = _tokens(model, reqs, cuda_graphs="off")
        attention.set_backend("xformers")
        b = _tokens(model, reqs, cuda_graphs="off")
    finally:
        attention.set_backend("auto")
    agree = _agreement(a, b)
    return name, f"token bits {agree:.4f}", "token bits >= 0.99", "PASS" if agree >= 0.99 else "FAIL"


def check_sync(device: str, warm_steps: int = 4) -> tuple:
    """Warm steps with a running batch (no admission, no finish): the runner's step must not sync."""
    model = load_model(FIXTURE, device, None)
    engine = engine_for(model, EngineConfig(max_batch_requests=4))
    reqs = bench_bf16.golden_requests(FIXTURE)
    for r in reqs:
        engine.add_request(r)
    engine.step()  # admission + first step (may sync: prefill bookkeeping)
    engine.step()  # warm
    real = engine.runner.step
    checked, errors = [0], []

    def guarded(running, tick):
        cuda = engine.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return real(running, tick)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            with _NoHostSync():
                return real(running, tick)
        except Exception as e:  # the engine's fault ladder would swallow it: record it first
            errors.append(str(e).splitlines()[0])
            raise
        finally:
            checked[0] += 1

    engine.runner.step = guarded
    for _ in range(warm_steps):
        if not engine.has_work():
            break
        engine.step()
    ok = not errors and checked[0] > 0
    mode = "set_sync_debug_mode(error)" if engine.device.type == "cuda" else "dispatch-mode proxy"
    measured = f"{checked[0]} warm steps under {mode}" + (f": {errors[0]}" if errors else "")
    return "no host sync in warm steps", measured, "0 syncs", "PASS" if ok else "FAIL"


def check_graphs(device: str) -> tuple:
    """An engine with graphs on (on CPU: the recording stand-in) against one with graphs off."""
    model = load_model(FIXTURE, device, None)
    reqs = bench_bf16.golden_requests(FIXTURE)
    engine = engine_for(model, EngineConfig(max_batch_requests=max(4, len(reqs)), cuda_graphs="on"))
    if engine.device.type != "cuda":
        engine.runner.set_graph_backend(RecordingBackend())
    on, off = _tokens(model, reqs, engine), _tokens(model, reqs, cuda_graphs="off")
    g = engine.runner.graphs
    same = sum(torch.equal(on[k], off[k]) for k in on)
    measured = (f"{same}/{len(on)} requests identical; {g.captures} graphs captured, {len(g.failed)} failed"
                + (" (cpu: the recording stand-in)" if engine.device.type != "cuda" else ""))
    ok = same == len(on) and g.captures > 0 and not g.failed
    return "CUDA graphs on == off", measured, "identical, all captured", "PASS" if ok else "FAIL"


def check_bench(args) -> tuple[list[tuple], dict]:
    out = bench_gpu.measure(args.preset, args.device, args.dtype, args.size, args.steps, args.guidance,
                            args.batches, log=lambda s: print(s, file=sys.stderr))
    b1, bn = out["batches"][min(args.batches)], out["batches"][max(args.batches)]
    floor = out["bandwidth_floor_s"]
    rows = []
    if floor:
        x = b1["first_s"] / floor
        rows.append((f"batch-1 latency ({args.preset} {args.size})", f"{b1['first_s']:.2f}s = {x:.2f}x the floor "
                     f"{floor:.2f}s", "<= 1.3x", "PASS" if x <= 1.3 else "FAIL"))
    else:
        rows.append((f"batch-1 latency ({args.preset} {args.size})", f"{b1['first_s']:.2f}s (no floor for "
                     f"{out['gpu']})", "<= 1.3x floor", "INFO"))
    n = max(args.batches)
    frac = bn.get("compute_fraction")
    if frac is not None:
        rows.append((f"throughput at {n} concurrent", f"{bn['images_per_s']:.3f} img/s = {100 * frac:.0f}% of "
                     "bf16 peak", ">= 50%", "PASS" if frac >= 0.5 else "FAIL"))
    else:
        rows.append((f"throughput at {n} concurrent", f"{bn['images_per_s']:.3f} img/s", ">= 50% of bf16 peak",
                     "INFO"))
    return rows, out


def check_quantize(args, bf16_out: dict) -> list[tuple]:
    """int8 and fp8 (``--quantize``) latency and throughput next to the bf16 run (issue #12); fp8 only where the
    device supports it (else one INFO row with the reason)."""
    from bitdance_core.device import resolve
    from bitdance_core.loading import quantize as q

    rows = []
    n1, n = min(args.batches), max(args.batches)
    ref1, refn = bf16_out["batches"][n1], bf16_out["batches"][n]
    for mode in ("int8", "fp8"):
        try:
            q.check_supported(mode, resolve(args.device, args.dtype))
        except q.QuantizeError as e:
            rows.append((f"{mode} vs bf16", f"skipped: {e}", "runs where supported", "INFO"))
            continue
        out = bench_gpu.measure(args.preset, args.device, args.dtype, args.size, args.steps, args.guidance,
                                [n1, n], log=lambda s: print(s, file=sys.stderr), quantize=mode)
        b1, bn = out["batches"][n1], out["batches"][n]
        weights = sum(q.module_bytes(m) for m in (out["engine"].model.llm, out["engine"].model.head))
        rows.append((f"{mode} vs bf16 ({args.preset} {args.size})",
                     f"batch-1 {b1['first_s']:.2f}s vs {ref1['first_s']:.2f}s "
                     f"({b1['first_s'] / ref1['first_s']:.2f}x); "
                     f"{n} concurrent {bn['images_per_s']:.3f} vs {refn['images_per_s']:.3f} img/s "
                     f"({bn['images_per_s'] / refn['images_per_s']:.2f}x); prior+head {weights / 1e9:.1f} GB",
                     "measured", "INFO"))
        del out
    return rows


def check_plan(bench_out: dict, n: int) -> tuple:
    """The plan's prediction for the bench's engine at n requests against what that run held."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bitdance_core.planning import memory_plan as mp

    engine = bench_out["engine"]
    model, size = engine.model, bench_out["size"]
    cfg = EngineConfig(max_batch_requests=n)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = mp.measure_peaks(mp.fake_model(model.config, model.tokenizer, model.llm.dtype), engine.serving, cfg,
                                size, n)
    predicted_peak = max(fake["prefill"], fake["step"])
    if engine.device.type == "cuda":
        weights = sum(mp.module_bytes(model).values())
        predicted = weights + engine.cache.nbytes + predicted_peak
        measured = bench_out["batches"][n]["peak_allocated_bytes"]
        verdict = "PASS" if measured <= predicted else "FAIL"
        return ("peak memory vs bitdance plan", f"measured {mp.gib(measured)}, plan {mp.gib(predicted)} "
                f"({100 * measured / predicted:.0f}%)", "measured <= plan", verdict)
    real = mp.measure_peaks(model, engine.serving, cfg, size, n)  # the same accounting on real tensors
    measured = max(real["prefill"], real["step"])
    ok = abs(measured / predicted_peak - 1) <= 0.01
    return ("peak memory vs bitdance plan", f"real run {measured / 2**20:.2f} MiB, fake plan "
            f"{predicted_peak / 2**20:.2f} MiB (cpu: live bytes)", "within 1%", "PASS" if ok else "FAIL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (CI)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
        args.device = args.device or "cpu"
        args.preset, args.dtype, args.size, args.steps, args.guidance, args.batches = (
            "tiny", None, "128x128", 2, 3.0, [1, 2])
    else:
        args.device = args.device or "cuda"
        args.preset, args.dtype, args.size, args.steps, args.guidance, args.batches = (
            "14b-64x", "bfloat16", "1024x1024", 50, 7.5, [1, 16])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    rows = [check_bf16(args.device, args.smoke), check_attention(args.device), check_sync(args.device),
            check_graphs(args.device)]
    bench_rows, out = check_bench(args)
    rows += bench_rows
    rows.append(check_plan(out, max(args.batches)))
    bf16_engine, out["engine"] = out.pop("engine"), None
    del bf16_engine  # free the bf16 model before the quantised ones are built
    rows += check_quantize(args, out)
    rows.append(gpu_check_class.check_bf16(args.device, args.smoke))
    rows += gpu_check_class.check_throughput(args.device, args.dtype, args.smoke)
    rows.append(gpu_check_class.check_latency(args.device, args.dtype, args.smoke))
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"device": args.device, "elapsed_s": elapsed,
                          "rows": [dict(zip(("check", "measured", "target", "verdict"), r)) for r in rows]}))
    else:
        widths = [max(len(str(r[i])) for r in rows + [("check", "measured", "target", "verdict")]) for i in range(4)]
        print(f"gpu check on {args.device} ({out['gpu']}), {elapsed:.0f}s")
        for r in [("check", "measured", "target", "verdict"), *rows]:
            print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return 1 if any(r[3] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
