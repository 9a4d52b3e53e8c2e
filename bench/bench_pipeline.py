"""Per-image speed of our pipeline vs a reference-style baseline, side by side, plus loading memory.

    python bench/bench_pipeline.py [--model DIR] [--height 512 --width 512 --steps 50 --guidance 7.5]

Without --model a random checkpoint of the ``bench`` preset
(``bitdance_core.families.text_to_image.random_checkpoint``) is written to a temp
directory. Both pipelines run on the same checkpoint, device and dtype (float32 on CPU by default), same seed:

1. ``baseline``: written here, it mirrors the official pipeline's call pattern (spec §4.5-4.6, §5.4, §10):
   transformers' ``Qwen3Model`` with a ``DynamicCache`` per stream and all-true 4-D boolean block masks (sized
   from the conditional cache, as the reference does), two separate CFG forwards per step, the diffusion head
   called with ``cat([x]*2)`` rows and the raw condition (so ``cond_embed`` is recomputed at each of the S+1
   evaluations), the sampler returning both identical halves, the projector run on the duplicated rows, and the
   final wasted prior call. The head, projector and decoder modules are ours (same arithmetic as the reference's).
2. ``ours``: ``bitdance_core.families.text_to_image.pipeline.BitDancePipeline``.

Each prints seconds per image and a profile split (prior / head / decoder / other), timed by wrapping the module
calls; both wall time and process CPU time are reported (on a shared machine the CPU time, with one intra-op
thread, is the contention-robust number). The two must sample the same tokens (printed as a bit-match check).
Then (3) the load's peak resident memory (VmHWM, in a fresh subprocess, with the peak reset after the imports)
above the pre-load RSS, against the bytes of the weights kept; without --model this uses a larger random
checkpoint (preset ``bench-mem``, ~460 MiB kept) so fixed costs do not blur the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bitdance_core.families.text_to_image.pipeline import BitDancePipeline
from bitdance_core.families.text_to_image.prompts import COND_TEMPLATE, UNCOND_TEXT
from bitdance_core.models.autoencoder import to_uint8
from bitdance_core.models.projector import pos2d_table, sincos_1d, unpatchify_tokens
from bitdance_core.resolutions import POS_TABLE_ROWS
from bitdance_core.sampling import LAST_STEP, time_increments


class Profile:
    """Wall and process-CPU time per category; nested timed calls count only in the outermost category.

    On a shared machine other processes steal cycles from both pipelines alike; with one intra-op thread the
    process CPU time is the contention-robust measure, so both are reported.
    """

    def __init__(self, device: torch.device):
        self.t: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._depth = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self._depth:
            yield
            return
        self._depth += 1
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            self.t[name] += time.perf_counter() - t0
            self.cpu[name] += time.process_time() - c0
            self.calls[name] += 1
            self._depth -= 1

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            with self(name):
                return fn(*a, **k)

        return timed

    def reset(self) -> None:
        self.t.clear()
        self.cpu.clear()
        self.calls.clear()


# ---- 1) the reference-style baseline ---------------------------------------------------------------------------


class ReferenceStyle:
    """The official pipeline's call pattern on the same weights (see the module docstring)."""

    def __init__(self, model_dir: Path, ours: BitDancePipeline, prof: Profile):
        from transformers import Qwen3ForCausalLM

        m = ours.model
        self.cfg = ours.config
        self.device, self.dtype = m.placement.device, m.placement.dtype
        hf = Qwen3ForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype, attn_implementation="sdpa")
        self.llm = hf.model.to(self.device).eval()  # the reference calls llm_model.model only
        # own copies, so the instrumentation of ours never runs inside the baseline
        self.tokenizer = m.tokenizer
        self.head, self.projector, self.ae = (copy.deepcopy(x) for x in (m.head, m.projector, m.ae))
        self.prof = prof
        self.pos_1d = sincos_1d(self.cfg.llm.hidden_size // 2, POS_TABLE_ROWS)

    def _llm(self, embeds, cache, mask=None):
        with self.prof("prior"):
            out = self.llm(inputs_embeds=embeds.to(self.dtype), past_key_values=cache, attention_mask=mask,
                           use_cache=True)
        return out.last_hidden_state

    def _block_mask(self, rows: int, p: int, cache) -> torch.Tensor:
        return torch.ones(rows, 1, p, p + cache.get_seq_length(), dtype=torch.bool, device=self.device)

    def _sample(self, c: torch.Tensor, g: float, steps: int, gen: torch.Generator) -> torch.Tensor:
        """The reference's ``DiffHead.sample``: net(cat([x]*m), t, c) with the raw condition at every evaluation."""
        with self.prof("head"):
            rows = c.shape[0]
            m = 2 if g > 1.0 else 1
            x = torch.randn((rows // m, *c.shape[1:-1], self.cfg.z_channels), generator=gen, device=self.device)
            dt = time_increments(steps, self.cfg.time_shift, device=self.device)
            t = torch.tensor(0.0, device=self.device)

            def velocity(x, t):
                xx = torch.cat([x] * m)
                tt = t * torch.ones(rows, device=self.device)
                x_hat = self.head(xx, tt, c).float()  # forward = cond_embed(c) + the net, every time
                v = (x_hat - xx) / (1 - tt).clamp_min(LAST_STEP).view(-1, 1, 1)
                if m == 2:
                    v_c, v_u = v.chunk(2)
                    v = v_u + g * (v_c - v_u)
                return v

            for i in range(steps):
                v = velocity(x, t)
                score = (t * v - x) / ((1 - t) ** 2 - t * -1 * (1 - t))
                drift = v + (1 - t) * score
                noise = torch.randn(x.shape, generator=gen, device=self.device)
                x = x + drift * dt[i] + (2.0 * (1.0 - t) * dt[i]) ** 0.5 * noise
                t = t + dt[i]
            x = x + velocity(x, torch.tensor(1 - LAST_STEP, device=self.device)) * LAST_STEP
            return torch.cat([x] * m)

    @torch.inference_mode()
    def __call__(self, prompt, height, width, steps, guidance_scale, seed, num_images=1):
        from transformers import DynamicCache

        cfg, B, P = self.cfg, num_images, self.cfg.parallel_num
        f, ps = cfg.downsample, cfg.patch_side
        h, w = height // f, width // f
        gen = torch.Generator(device=self.device).manual_seed(seed)
        use_cfg = guidance_scale > 1.0
        tok = self.tokenizer
        prefix = [tok.convert_tokens_to_ids(s) for s in
                  ["<|vision_start|>", f"<|res_{h}|>", f"<|res_{w}|>"] + [f"<|query_{i}|>" for i in range(1, P)]]
        streams = [tok.encode(COND_TEMPLATE.format(prompt=prompt))] + ([tok.encode(UNCOND_TEXT)] if use_cfg else [])
        caches, hids = [], []
        for ids in streams:
            x = self.llm.embed_tokens(torch.tensor(ids + prefix, device=self.device))[None].repeat(B, 1, 1)
            cache = DynamicCache()
            self._llm(x[:, :-P], cache)
            hids.append(self._llm(x[:, -P:], cache, self._block_mask(B, P, cache))[:, -P:])
            caches.append(cache)
        pe = pos2d_table(h, w, ps, cfg.llm.hidden_size, self.pos_1d).to(self.device)
        tokens = []
        for s in range(h * w // P):
            pe_s = pe[s * P : (s + 1) * P]
            cond = torch.cat(hids).float() + pe_s
            lat = self._sample(cond, guidance_scale, steps, gen)
            bits = torch.sign(lat)
            tokens.append(bits[:B])
            with self.prof("other"):
                emb = self.projector(bits).float() + pe_s  # on the duplicated rows
            mask = self._block_mask(B, P, caches[0])  # sized from the conditional cache, reused (spec §10.3)
            hids = [self._llm(emb[i * B : (i + 1) * B], cache, mask) for i, cache in enumerate(caches)]  # + final
        tok_all = torch.cat(tokens, dim=1)
        with self.prof("decoder"):
            img = self.ae.decode(unpatchify_tokens(tok_all, h, w, ps).to(self.ae.dtype), generator=gen)
        return tok_all, to_uint8(img)


# ---- 2) ours, instrumented --------------------------------------------------------------------------------------


def instrument(pipe: BitDancePipeline, prof: Profile) -> None:
    import bitdance_core.families.text_to_image.pipeline as pl

    m = pipe.model
    m.llm.forward = prof.wrap("prior", m.llm.forward)
    m.llm.embed_tokens.forward = prof.wrap("prior", m.llm.embed_tokens.forward)
    m.head.condition = prof.wrap("head", m.head.condition)
    pl.euler_maruyama = prof.wrap("head", pl.euler_maruyama)
    m.projector.forward = prof.wrap("other", m.projector.forward)
    m.ae.decode = prof.wrap("decoder", m.ae.decode)


def run_ours(pipe, prompt, height, width, steps, g, seed):
    out = pipe(prompt, height, width, steps=steps, guidance_scale=g, seed=seed)
    return out.tokens, np.stack([np.asarray(i) for i in out.images])


# ---- 3) loading memory ------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_load(model_dir: str) -> dict:
    """In this (fresh) process: import, reset the RSS peak, load, report."""
    import resource

    from bitdance_core.families.text_to_image.loader import load_model, load_tokenizer

    load_tokenizer(model_dir)  # warm transformers' lazy imports: library code is not the load
    rss0 = _status_kb("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        reset = False
    t0 = time.perf_counter()
    m = load_model(model_dir, device="cpu")
    dt = time.perf_counter() - t0
    kept = sum(t.numel() * t.element_size() for mod in (m.llm, m.head, m.projector, m.ae)
               for t in list(mod.parameters()) + list(mod.buffers()))
    files = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_before_kb": rss0, "peak_kb": peak, "rss_after_kb": _status_kb("VmRSS"), "kept_bytes": kept,
            "file_bytes": files, "peak_reset": reset, "load_s": dt}


def load_memory(model_dir: str) -> dict:
    here = str(Path(__file__).parent)
    code = f"import json, sys; sys.path.insert(0, {here!r}); import bench_pipeline as b; " \
           f"print(json.dumps(b.measure_load({model_dir!r})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- main -------------------------------------------------------------------------------------------------------


def _split(times: dict[str, float]) -> str:
    total = sum(times.values())
    return "  ".join(f"{k} {times.get(k, 0.0):6.2f}s ({100 * times.get(k, 0.0) / total:4.1f}%)"
                     for k in ("prior", "head", "decoder", "other"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a random 'bench' checkpoint)")
    ap.add_argument("--preset", default="bench", help="preset written when --model is absent")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a photo of a red circle next to a blue square")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per pipeline (alternating; min is kept)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable on a shared 2-core box; 0 = torch's default)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-model", default=None,
                    help="checkpoint for the loading-memory measurement (default: --model, else a random 'bench-mem')")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    tmp = None
    model_dir = args.model
    if model_dir is None:
        from bitdance_core.families.text_to_image.random_checkpoint import write_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="bitdance-bench-")
        t0 = time.perf_counter()
        model_dir = str(write_checkpoint(args.preset, Path(tmp.name) / args.preset, seed=0))
        print(f"wrote a random '{args.preset}' checkpoint in {time.perf_counter() - t0:.1f}s")
    pipe = BitDancePipeline.from_pretrained(model_dir, device=args.device, dtype=args.dtype)
    dev = pipe.device
    cfg = pipe.config
    h, w = pipe.sizes.grid(args.height, args.width)
    T = h * w // cfg.parallel_num
    n_params = sum(p.numel() for mod in (pipe.model.llm, pipe.model.head, pipe.model.projector, pipe.model.ae)
                   for p in mod.parameters())
    print(f"model {model_dir}: {n_params / 1e6:.1f}M params, hidden {cfg.llm.hidden_size} x {cfg.llm.num_layers} "
          f"layers, head Dh {cfg.head['ch_latent']} x {cfg.head['depth_latent']}, P={cfg.parallel_num}, "
          f"dtype {pipe.model.placement.dtype}, device {dev}")
    print(f"{args.width}x{args.height}: {T} AR steps x {args.steps + 1} head evaluations, guidance {args.guidance}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs")

    prof_base, prof_ours = Profile(dev), Profile(dev)
    base = ReferenceStyle(Path(model_dir), pipe, prof_base)
    instrument(pipe, prof_ours)
    run = dict(prompt=args.prompt, height=args.height, width=args.width, g=args.guidance, seed=args.seed)

    # warm-up (one diffusion step) so one-time costs are not timed
    base(args.prompt, args.height, args.width, 1, args.guidance, args.seed)
    run_ours(pipe, **{**run, "steps": 1})
    best: dict[str, tuple[float, float, dict, dict, dict]] = {}
    for _ in range(args.repeat):
        for name, fn, prof in (("baseline", lambda: base(args.prompt, args.height, args.width, args.steps,
                                                         args.guidance, args.seed), prof_base),
                               ("ours", lambda: run_ours(pipe, **{**run, "steps": args.steps}), prof_ours)):
            prof.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            tokens, images = fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            prof.t["other"] += dt - sum(prof.t.values())
            prof.cpu["other"] += dc - sum(prof.cpu.values())
            if name not in best or dc < best[name][1]:
                best[name] = (dt, dc, dict(prof.t), dict(prof.cpu), {"tokens": tokens, "images": images})

    print()
    for name in ("baseline", "ours"):
        dt, dc, wall, cpu, _ = best[name]
        print(f"{name:9s} wall {dt:7.2f} s/image  cpu {dc:7.2f} s/image   cpu split: {_split(cpu)}")
    print(f"speed-up  {best['baseline'][1] / best['ours'][1]:.2f}x in CPU time, "
          f"{best['baseline'][0] / best['ours'][0]:.2f}x in wall time (baseline / ours)")
    for name in ("baseline", "ours"):
        print(f"          {name} wall split: {_split(best[name][2])}")
    a, b = best["baseline"][4], best["ours"][4]
    bits = (a["tokens"].to(torch.int8).cpu() == b["tokens"]).float().mean().item()
    mad = np.abs(a["images"].astype(np.float64) - b["images"].astype(np.float64)).mean()
    print(f"same result: {100 * bits:.3f}% of token bits equal, image mean abs diff {mad:.3f} levels")
    print(f"prior calls: baseline {prof_base.calls['prior']}, ours {prof_ours.calls['prior']}")

    if not args.skip_memory:
        mem_dir = args.memory_model or model_dir
        if args.memory_model is None and args.model is None:  # a bigger random checkpoint: fixed costs blur a small one
            from bitdance_core.families.text_to_image.random_checkpoint import write_checkpoint

            mem_dir = str(write_checkpoint("bench-mem", Path(tmp.name) / "bench-mem", seed=0))
        print(f"\nloading {mem_dir} in a fresh process ...")
        mem = load_memory(mem_dir)
        delta = (mem["peak_kb"] - mem["rss_before_kb"]) * 1024
        print(f"load memory: weights kept {mem['kept_bytes'] / 2**20:.1f} MiB (files {mem['file_bytes'] / 2**20:.1f}"
              f" MiB); peak RSS during load {delta / 2**20:.1f} MiB above the post-import RSS "
              f"({mem['rss_before_kb'] / 1024:.0f} MiB) -> ratio {delta / mem['kept_bytes']:.2f}x (target <= 1.2x), "
              f"load {mem['load_s']:.2f}s{'' if mem['peak_reset'] else ' [peak not reset: includes imports]'}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
