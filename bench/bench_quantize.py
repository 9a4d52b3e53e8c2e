"""Weight-only quantisation (issue #12), measured side by side in one run: quality, error, speed, memory.

    python bench/bench_quantize.py [--sections golden,layers,speed,memory,demo] [--threads 1] [--repeat 3]

Sections (all by default except ``demo-bits`` and ``demo``, which take ~5 and ~60 minutes on 2 cores):

* ``golden``: the golden fixture (tests/fixtures/reference-tiny-a, made by the official code in float32): token-bit
  agreement with it at the first AR step and over the whole image, and the mean / max image difference (uint8
  levels), for ``none``, ``int8-linears`` (the prior's linears only, the embedding table unquantised),
  ``int8`` (linears and token embedding table, what ``--quantize int8`` does) and ``int8+head`` (also the
  diffusion head's linears: measured, not shipped);
* ``layers``: relative error ``|y_q - y| / |y|`` of int8 (and fp8 when the machine supports it) linears against
  bf16 on random BitDance-14B-shaped layers (Qwen3-14B q/k/o, gate/up, down; head-sized 5120x5120), weights ~
  N(0, 0.02) as initialised, activations ~ N(0, 1);
* ``speed``: CPU seconds per image (process CPU time, one intra-op thread: contention-robust) of the single-request
  pipeline with and without int8, alternating runs, on a random ``bench`` preset checkpoint and the demo model,
  and of one prior block-step forward alone; the ratios are int8 / none;
* ``memory``: peak RSS of a quantised load (fresh subprocess, VmHWM reset after the imports, as
  ``tests/test_core_loading.py``) over the bytes kept, on the ``bench-mem`` preset, for an on-the-fly int8 load
  and for a pre-quantised directory; and the kept bytes of the 14B presets per mode;
* ``demo-bits``: the demo model, paired with its unquantised self (same captions and seeds): bit agreement at the
  first AR step and over the image, image difference, for ``int8-linears``, ``int8`` and ``int8+head``;
* ``demo``: ``eval-demo`` scores of the demo model for none / int8 / int8+head with seeds 0 and 1 (the seed-to-seed
  spread of the unquantised model is the noise floor the quantised differences are judged against).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bitdance_core import default_model_dir
from bitdance_core.families.text_to_image.loader import load_model
from bitdance_core.families.text_to_image.pipeline import BitDancePipeline
from bitdance_core.loading import quantize as q

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "reference-tiny-a"


def quantize_head(model) -> None:
    """Also quantise every linear of the diffusion head (int8), in place: the ``int8+head`` variant."""
    keys = {f"{n}.weight" for n, m in model.head.named_modules() if isinstance(m, torch.nn.Linear)}
    q.quantize_module_(model.head, "int8", model.placement, keys)


def load_variant(model_dir, variant: str, **kw):
    m = load_model(model_dir, "cpu", quantize="none" if variant == "none" else "int8", **kw)
    if variant == "int8+head":
        quantize_head(m)
    if variant == "int8-linears":  # the embedding table as stored (what --quantize int8 did before format 2)
        m.llm.embed_tokens = load_model(model_dir, "cpu", **kw).llm.embed_tokens
    return m


VARIANTS = ("none", "int8-linears", "int8", "int8+head")


def golden() -> None:
    cases = json.loads((FIXTURE / "golden.json").read_text())["cases"]
    want = load_file(FIXTURE / "golden.safetensors")
    print("\n## golden fixture (reference-tiny-a, float32 official tokens and images)")
    print("| variant | case | first AR step bits | all bits | image mean abs diff | max |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        pipe = BitDancePipeline(load_variant(FIXTURE, variant))
        p = pipe.config.parallel_num
        first, whole, diffs = [], [], []
        for i, c in enumerate(cases):
            out = pipe(c["prompt"], c["height"], c["width"], steps=c["steps"], guidance_scale=c["cfg"], seed=c["seed"],
                       num_images=c["n"])
            t, wt = out.tokens, want[f"case{i}.tokens"]
            img = np.stack([np.asarray(x) for x in out.images]).astype(np.float64)
            d = np.abs(img - want[f"case{i}.image"].numpy().astype(np.float64))
            first.append((t[:, :p] == wt[:, :p]).float().mean().item())
            whole.append((t == wt).float().mean().item())
            diffs.append(d.mean())
            print(f"| {variant} | {i} ({c['height']}x{c['width']}, cfg {c['cfg']}) | {first[-1]:.2%} | {whole[-1]:.2%} "
                  f"| {d.mean():.2f} | {d.max():.0f} |")
        print(f"| {variant} | mean | {np.mean(first):.2%} | {np.mean(whole):.2%} | {np.mean(diffs):.2f} | |")


def layers() -> None:
    print("\n## relative error of a quantised linear vs bf16 (random 14B-shaped layers, 16 activation rows)")
    shapes = {"q_proj / o_proj 5120x5120": (5120, 5120), "k_proj / v_proj 1024x5120": (1024, 5120),
              "gate_proj / up_proj 17408x5120": (17408, 5120), "down_proj 5120x17408": (5120, 17408)}
    modes = ["int8"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= q.FP8_MIN_CAPABILITY:
        modes.append("fp8")
    g = torch.Generator().manual_seed(0)
    print("| layer (out x in) | " + " | ".join(modes) + " | weight bytes bf16 -> int8 |")
    print("|---|" + "---|" * len(modes) + "---|")
    for name, (o, i) in shapes.items():
        w = (torch.randn(o, i, generator=g) * 0.02).to(torch.bfloat16)
        x = torch.randn(16, i, generator=g).to(torch.bfloat16)
        ref = x.float() @ w.float().t()  # the bf16 linear, accumulated exactly enough (float32)
        errs = []
        for mode in modes:
            dev = "cuda" if mode == "fp8" else "cpu"
            wq = q.quantize_weight(w, mode, dev, torch.float32 if mode == "int8" else torch.bfloat16)
            xin = x.float() if mode == "int8" else x.to(dev)
            y = torch.nn.functional.linear(xin, wq).float().cpu()
            errs.append(f"{((y - ref).norm() / ref.norm()).item():.3%}")
            del wq
        print(f"| {name} | " + " | ".join(errs) + f" | {o * i * 2 / 2**20:.0f} MiB -> "
              f"{q.linear_weight_bytes(o, i, 'int8') / 2**20:.0f} MiB |")


def speed(repeat: int, bench_dir: Path) -> None:
    print(f"\n## CPU speed, int8 vs none (process CPU seconds, {torch.get_num_threads()} thread(s), best of {repeat})")
    print("| checkpoint | request | none s/image | int8 s/image | int8/none | prior block step none | int8 | "
          "int8/none | bits equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [("bench preset", bench_dir, dict(prompt="a photo of a red circle", height=256, width=256, steps=20,
                                             guidance_scale=7.5, seed=1)),
            ("demo model", Path(default_model_dir()), dict(prompt="a red circle", height=64, width=64, steps=20,
                                                           guidance_scale=6.0, seed=1))]
    for name, d, args in runs:
        pipes = {v: BitDancePipeline(load_variant(d, v)) for v in ("none", "int8")}
        best = {v: float("inf") for v in pipes}
        step = {v: float("inf") for v in pipes}
        outs = {}
        for _ in range(repeat):
            for v, pipe in pipes.items():
                t0 = time.process_time()
                outs[v] = pipe(**args)
                best[v] = min(best[v], time.process_time() - t0)
                step[v] = min(step[v], _prior_step(pipe))
        agree = (outs["none"].tokens == outs["int8"].tokens).float().mean().item()
        print(f"| {name} | {args['width']}x{args['height']}, {args['steps']} steps, cfg {args['guidance_scale']} | "
              f"{best['none']:.3f} | {best['int8']:.3f} | **{best['int8'] / best['none']:.2f}x** | "
              f"{step['none'] * 1e3:.2f} ms | {step['int8'] * 1e3:.2f} ms | {step['int8'] / step['none']:.2f}x | "
              f"{agree:.1%} |")


def _prior_step(pipe, rows: int = 2, iters: int = 5) -> float:
    """CPU seconds of one prior forward over a P-token block for ``rows`` rows (no cache: the linears dominate)."""
    llm = pipe.model.llm
    p = pipe.config.parallel_num
    x = torch.randn(rows, max(p, 16), llm.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    plan = llm.plan_full(rows, x.shape[1], causal=True)
    with torch.inference_mode():
        llm(x, plan)
        best = float("inf")
        for _ in range(iters):
            t0 = time.process_time()
            llm(x, plan)
            best = min(best, time.process_time() - t0)
        return best


_PEAK = r"""
import json, sys
from pathlib import Path
from bitdance_core.loading.quantize import tensor_bytes, torchao
from bitdance_core.families.text_to_image.loader import load_model, load_tokenizer
load_tokenizer(sys.argv[1]); torchao()
def kb(f):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(f + ":"))
before = kb("VmRSS"); Path("/proc/self/clear_refs").write_text("5")
m = load_model(sys.argv[1], device="cpu", quantize=sys.argv[2])
kept = sum(tensor_bytes(t) for mod in (m.llm, m.head, m.projector, m.ae) for t in mod.parameters())
print(json.dumps({"peak": (kb("VmHWM") - before) * 1024, "kept": kept}))
"""


def memory(tmp: Path) -> None:
    from bitdance_core.families.text_to_image.quantized_checkpoint import write_quantized
    from bitdance_core.families.text_to_image.random_checkpoint import write_checkpoint

    print("\n## loading memory (bench-mem preset: LLM stored bf16, kept float32 or int8 on CPU)")
    d = write_checkpoint("bench-mem", tmp / "mem", seed=0)
    qd = write_quantized(d, tmp / "mem-int8", "int8")
    print("| load | weights kept | peak RSS above pre-load | ratio |")
    print("|---|---|---|---|")
    for label, path, mode in (("none", d, "none"), ("int8 on the fly", d, "int8"), ("pre-quantised int8", qd, "none")):
        r = subprocess.run([sys.executable, "-c", _PEAK, str(path), mode], capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {label} | {res['kept'] / 2**20:.0f} MiB | {res['peak'] / 2**20:.0f} MiB | "
              f"**{res['peak'] / res['kept']:.2f}x** |")
    from bitdance_core.families.text_to_image.random_checkpoint import get_preset

    print("\nBitDance-14B weights kept on a GPU (bf16 compute), by mode (analytic, as the plan counts them):")
    for preset in ("14b-64x", "14b-16x"):
        cfg = get_preset(preset).llm
        h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        qo, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
        shapes = [(qo, h), (kv, h), (kv, h), (h, qo), (i, h), (i, h), (h, i)]
        row = {m: n * sum(q.linear_weight_bytes(o, k, m) for o, k in shapes) for m in ("none", "int8")}
        emb = {m: q.linear_weight_bytes(cfg["vocab_size"], h, m) for m in ("none", "int8")}  # same per-row layout
        print(f"  {preset}: prior linears {row['none'] / 1e9:.2f} GB bf16 -> {row['int8'] / 1e9:.2f} GB int8; "
              f"token embedding table {emb['none'] / 1e9:.2f} GB -> {emb['int8'] / 1e9:.2f} GB")


def demo_bits(n_prompts: int = 24) -> None:
    """Paired, low-noise: same prompt and seed, quantised vs unquantised demo model; the first AR step's bits
    differ only through the quantisation error (later steps also through the diverged trajectory)."""
    from bitdance_core.demo import data as demo_data

    sets = demo_data.evaluation_captions(8, 0)
    prompts = [sc.caption for k in sorted(sets) for sc in sets[k]][:n_prompts]
    pipes = {v: BitDancePipeline(load_variant(default_model_dir(), v)) for v in VARIANTS}
    p = pipes["none"].config.parallel_num
    print(f"\n## demo model: bits vs the unquantised model ({len(prompts)} captions, 64x64, 20 steps, cfg 6, paired "
          "seeds)")
    print("| variant | first AR step bits | all bits | image mean abs diff |")
    print("|---|---|---|---|")
    ref = {i: pipes["none"](c, 64, 64, steps=20, guidance_scale=6.0, seed=i) for i, c in enumerate(prompts)}
    for v in VARIANTS[1:]:
        first, whole, diff = [], [], []
        for i, c in enumerate(prompts):
            out = pipes[v](c, 64, 64, steps=20, guidance_scale=6.0, seed=i)
            t, r = out.tokens, ref[i].tokens
            first.append((t[:, :p] == r[:, :p]).float().mean().item())
            whole.append((t == r).float().mean().item())
            diff.append(np.abs(np.asarray(out.images[0], np.float64) - np.asarray(ref[i].images[0], np.float64)).mean())
        print(f"| {v} | {np.mean(first):.2%} | {np.mean(whole):.2%} | {np.mean(diff):.2f} |", flush=True)


def demo(tmp: Path, runs: str) -> None:
    from bitdance_core.demo.evaluate import evaluate

    print("\n## eval-demo scores (demo model, 4 images per caption), seeds 0 and 1")
    cols = ["single_color", "single_shape", "single_position", "two_color", "two_shape", "two_order", "two_all"]
    print("| variant | seed | split | " + " | ".join(cols) + " | s/image |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    for run in runs.split(","):
        variant, seed = run.split(":")[0], int(run.split(":")[1])
        pipe = BitDancePipeline(load_variant(default_model_dir(), variant))
        rep = evaluate(default_model_dir(), images_per_caption=4, seed=seed, progress=False, pipe=pipe)
        for split in ("seen", "heldout"):
            vals = " | ".join(f"{100 * rep[split][c]:.1f}" for c in cols)
            print(f"| {variant} | {seed} | {split} | {vals} | {rep['seconds_per_image']:.2f} |", flush=True)
        (tmp / f"demo-{variant}-{seed}.json").write_text(json.dumps(rep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="golden,layers,speed,memory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--demo-runs", default="none:0,int8:0,int8+head:0,none:1,int8:1,int8+head:1",
                    help="variant:seed pairs of the demo section, in order")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    print(f"torch {torch.__version__}, torchao {q.torchao().__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory(prefix="bitdance-bench-q-") as t:
        tmp = Path(t)
        if "golden" in sections:
            golden()
        if "layers" in sections:
            layers()
        if "speed" in sections:
            from bitdance_core.families.text_to_image.random_checkpoint import write_checkpoint

            speed(args.repeat, write_checkpoint("bench", tmp / "bench", seed=0))
        if "memory" in sections:
            memory(tmp)
        if "demo-bits" in sections:
            demo_bits()
        if "demo" in sections:
            demo(tmp, args.demo_runs)


if __name__ == "__main__":
    main()
