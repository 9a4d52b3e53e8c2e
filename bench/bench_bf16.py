"""How close bfloat16 comes to float32 on the golden fixture, through the engine (CPU or GPU).

    python bench/bench_bf16.py                       # tests/fixtures/reference-tiny-a, CPU
    python bench/bench_bf16.py --device cuda         # the same on a GPU
    python bench/bench_bf16.py --json
    python bench/bench_bf16.py --family class-conditional   # tests/fixtures/reference-imagenet-tiny-a (4x)

For every golden case it runs the request alone through a float32 engine and a bfloat16 engine
(same seed) and prints: the token-bit agreement at the first AR step (same prompt, same noise: the
direct effect of the dtype), over the whole image (later blocks are conditioned on earlier,
possibly different, bits), and the mean / max absolute difference of the uint8 images. Then it
runs all cases together with an extra request in one bfloat16 engine and reports batch
invariance: the fraction of requests whose tokens equal their lone bfloat16 run, and the bit
agreement between the two. float32 batch invariance is a tested promise; bfloat16's is measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.families.text_to_image.loader import load_model
from bitdance_core.worker.worker import engine_for

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference-tiny-a"
CLASS_FIXTURE = FIXTURE.parent / "reference-imagenet-tiny-a"


def golden_requests(model_dir: Path) -> list[GenerationRequest]:
    cases = json.loads((model_dir / "golden.json").read_text())["cases"]
    return [GenerationRequest(f"case{i}", c["prompt"], c["height"], c["width"], seed=c["seed"], steps=c["steps"],
                              guidance_scale=c["cfg"], num_images=c["n"], preview_every=0)
            for i, c in enumerate(cases)]


def run(model, reqs) -> dict[str, dict]:
    return drain(engine_for(model, EngineConfig(max_batch_requests=max(4, len(reqs)), cuda_graphs="off")), reqs)


def drain(engine: Engine, reqs) -> dict[str, dict]:
    """Submit ``reqs`` and step ``engine`` until they are done: each request's ``completed`` data by id."""
    out = {}
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        for ev in engine.step():
            if ev.kind is EventKind.FAILED:
                raise RuntimeError(f"{ev.request_id}: {ev.data}")
            if ev.kind is EventKind.COMPLETED:
                out[ev.request_id] = ev.data
    return out


def compare(r, a: dict, b: dict, P: int) -> dict:
    """One request's float32 (``a``) vs bfloat16 (``b``) results: first-block and whole-image token bits, pixels."""
    ta, tb = a["tokens"], b["tokens"]
    ia, ib = a["images"].astype(np.float64), b["images"].astype(np.float64)
    return {"case": r.request_id, "size": f"{r.width}x{r.height}", "guidance": r.guidance_scale,
            "first_step_bits": float((ta[:, :P] == tb[:, :P]).float().mean()),
            "image_bits": float((ta == tb).float().mean()),
            "image_mean_abs": float(np.abs(ia - ib).mean()), "image_max_abs": float(np.abs(ia - ib).max())}


def measure(model_dir: Path = FIXTURE, device: str = "cpu", cases: list[int] | None = None,
            invariance: bool = True) -> dict:
    """``cases``: these golden cases only (indices); ``invariance``: also the bf16 alone-vs-mixed run."""
    reqs = [r for i, r in enumerate(golden_requests(model_dir)) if cases is None or i in cases]
    fp32, bf16 = load_model(model_dir, device, "float32"), load_model(model_dir, device, "bfloat16")
    P = fp32.config.parallel_num
    cases = []
    alone16 = {}
    for r in reqs:
        a, b = run(fp32, [r])[r.request_id], run(bf16, [r])[r.request_id]
        alone16[r.request_id] = b
        cases.append(compare(r, a, b, P))
    if not invariance:
        return {"device": device, "cases": cases}
    extra = GenerationRequest("extra", "an extra request sharing the batch", 64, 64, seed=99, steps=6,
                              guidance_scale=5.0, num_images=2, preview_every=0)
    mixed = run(bf16, [*reqs, extra])
    same = [bool(torch.equal(mixed[r.request_id]["tokens"], alone16[r.request_id]["tokens"])) for r in reqs]
    bits = [float((mixed[r.request_id]["tokens"] == alone16[r.request_id]["tokens"]).float().mean()) for r in reqs]
    return {"device": device, "cases": cases,
            "bf16_batch_invariance": {"identical_requests": f"{sum(same)}/{len(same)}",
                                      "min_bit_agreement": min(bits)}}


def class_requests(fixture: Path = CLASS_FIXTURE) -> list[GenerationRequest]:
    cases = json.loads((fixture / "golden.json").read_text())["cases"]
    h = w = 256
    return [GenerationRequest(f"case{i}", "", h, w, seed=c["seed"], steps=c["sample_steps"],
                              guidance_scale=c["cfg_scale"], num_images=len(c["labels"]),
                              class_label=tuple(c["labels"]), cfg_schedule=c["cfg_schedule"], preview_every=0)
            for i, c in enumerate(cases)]


def measure_class(fixture: Path = CLASS_FIXTURE, device: str = "cpu") -> dict:
    """The same comparison for the class-conditional golden fixture (each case alone, float32 vs bfloat16)."""
    from bitdance_core.families.class_conditional.loader import load_class_model

    ckpt, args = fixture / "BitDance_tiny_a_4x.pt", fixture / "model_args_4x.json"
    fp32 = load_class_model(ckpt, device, "float32", model_args=args)
    bf16 = load_class_model(ckpt, device, "bfloat16", model_args=args)
    P = fp32.config.parallel_num
    cases = []
    for r in class_requests(fixture):
        a, b = run(fp32, [r])[r.request_id], run(bf16, [r])[r.request_id]
        cases.append(compare(r, a, b, P))
    return {"device": device, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(FIXTURE), help="a checkpoint dir with golden.json (the fixture)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--family", choices=("text-to-image", "class-conditional"), default="text-to-image")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family == "class-conditional":
        res = measure_class(CLASS_FIXTURE, args.device)
        args.model = str(CLASS_FIXTURE)
    else:
        res = measure(Path(args.model), args.device)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"bf16 vs fp32 through the engine on {args.device}, {Path(args.model).name}")
    cols = ("step-0 bits", "image bits", "img mean|d|", "img max|d|")
    print(f"{'case':6} {'size':8} {'cfg':>4} " + " ".join(f"{c:>12}" for c in cols))
    for c in res["cases"]:
        print(f"{c['case']:6} {c['size']:8} {c['guidance']:4.1f} {c['first_step_bits']:12.4f} {c['image_bits']:12.4f} "
              f"{c['image_mean_abs']:12.2f} {c['image_max_abs']:12.0f}")
    inv = res.get("bf16_batch_invariance")
    if inv is None:
        return
    print(f"bf16 batch invariance (alone vs mixed in one batch): {inv['identical_requests']} requests identical, "
          f"lowest bit agreement {inv['min_bit_agreement']:.4f}")


if __name__ == "__main__":
    main()
