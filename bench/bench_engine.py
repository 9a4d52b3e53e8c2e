"""Engine throughput vs the single-request pipeline, side by side in one run.

Throughput is measured without previews on both sides (the pipeline renders none, and the server asks for
none on non-streaming requests); time to first preview comes from a second engine run of the same requests
with the default preview cadence.

    python bench/bench_engine.py                      # the golden tiny checkpoint, CPU
    python bench/bench_engine.py --model DIR --size 64x64 --steps 20 --guidance 4

For N in 1, 2, 4, 8: N requests run one after another through ``BitDancePipeline`` and the same
N requests submitted together to the ``Engine``; prints images/s of each and the ratio, the
engine's time to first preview, and where an engine step spends its time (prefill / head /
projector / prior / decode / preview). Ratios come from the same process and the same minutes,
so machine noise mostly cancels; "cpu ratio" is the same ratio in process CPU time, the number to
trust on a loaded machine with one intra-op thread (``--threads 1``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.families.text_to_image.pipeline import BitDancePipeline
from bitdance_core.worker.worker import engine_for

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference-tiny-a"


def requests(n: int, h: int, w: int, steps: int, guidance: float, tag: str, preview_every: int | None):
    return [GenerationRequest(f"{tag}{i}", f"a test prompt number {i}", h, w, seed=1000 + i, steps=steps,
                              guidance_scale=guidance, preview_every=preview_every) for i in range(n)]


def run_engine(engine: Engine, reqs) -> tuple[float, list[float], dict[str, float], int]:
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    first_preview: dict[str, float] = {}
    phases: dict[str, float] = {}
    steps = 0
    while engine.has_work():
        for ev in engine.step():
            if ev.kind is EventKind.PREVIEW and ev.request_id not in first_preview:
                first_preview[ev.request_id] = time.perf_counter() - t0
        steps += 1
        for k, v in engine.last_phases.items():
            phases[k] = phases.get(k, 0.0) + v
    return time.perf_counter() - t0, list(first_preview.values()), phases, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--size", default="128x128", help="WxH")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per N; medians are printed")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(x) for x in args.size.split("x"))
    pipe = BitDancePipeline.from_pretrained(args.model)
    engine = engine_for(pipe.model, EngineConfig(max_batch_requests=16))
    T = engine.sizes.ar_steps(h, w)
    every = engine.preview_every_for(h, w)
    engine.warmup()  # measures a step and picks the preview method as the server does
    print(f"model {pipe.config.name}  size {w}x{h}  AR steps {T}  diffusion steps {args.steps}  guidance "
          f"{args.guidance}  threads {torch.get_num_threads()}  preview every {every} ({engine.previews.method})")
    run_engine(engine, requests(2, h, w, args.steps, args.guidance, "warm", 0))  # warm-up
    pipe("warm", h, w, steps=args.steps, guidance_scale=args.guidance, seed=0)
    header = ("N", "pipeline img/s", "engine img/s", "ratio", "cpu ratio", "first preview s", "preview overhead",
              "engine steps")
    print(" ".join(f"{x:>{w}}" for x, w in zip(header, (3, 15, 13, 6, 9, 16, 18, 12))))
    split_total: dict[str, float] = {}
    for n in (int(x) for x in args.concurrency.split(",")):
        seqs, engs, cpu_ratios, firsts, overheads, steps = [], [], [], [], [], 0
        for rep in range(args.repeats):  # alternate the two paths so machine noise hits both alike
            reqs = requests(n, h, w, args.steps, args.guidance, f"n{n}-{rep}-", 0)
            t0, c0 = time.perf_counter(), time.process_time()
            for r in reqs:
                pipe(r.prompt, h, w, steps=r.steps, guidance_scale=r.guidance_scale, seed=r.seed)
            seqs.append(time.perf_counter() - t0)
            c1 = time.process_time()
            eng, _, phases, steps = run_engine(engine, reqs)
            engs.append(eng)
            cpu_ratios.append((c1 - c0) / max(1e-9, time.process_time() - c1))
            # the same requests again, streaming previews at the default cadence (not in the img/s figures)
            with_previews, first, pphases, _ = run_engine(engine, requests(n, h, w, args.steps, args.guidance,
                                                                            f"p{n}-{rep}-", None))
            firsts += first
            # what previews add, timed inside the same steps (a difference of two runs is mostly noise here)
            overheads.append(pphases["preview"] / max(1e-9, with_previews - pphases["preview"]))
            for k, v in phases.items():
                split_total[k] = split_total.get(k, 0.0) + v
        seq, eng = statistics.median(seqs), statistics.median(engs)
        ratio = statistics.median(s / e for s, e in zip(seqs, engs))
        fp = statistics.median(firsts) if firsts else float("nan")
        ov = 100 * statistics.median(overheads)
        cpu = statistics.median(cpu_ratios)
        print(f"{n:>3} {n / seq:>15.2f} {n / eng:>13.2f} {ratio:>6.2f} {cpu:>9.2f} {fp:>16.3f} {ov:>17.1f}% "
              f"{steps:>12}")
    total = sum(split_total.values()) or 1.0
    print("engine step split: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in split_total.items()))


if __name__ == "__main__":
    main()
