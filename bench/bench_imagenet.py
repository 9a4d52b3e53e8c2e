"""Class-conditional serving speed and loading memory, side by side in one run (CPU).

    python bench/bench_imagenet.py                                  # random B-4x at real shapes, 4 steps, N = 1, 8
    python bench/bench_imagenet.py --official-src /path/to/BitDance/imagenet_gen   # + the official sampler itself
    python bench/bench_imagenet.py --model /path/BitDance_B_4x.pt --steps 8 --n 1,8

1. **Batch of N labels vs N concurrent requests.** The official way to sample (``imagenet_gen`` ``sample_ddp*.py``)
   is one batch of N labels under one global seed. Against it, our engine serves N concurrent one-image requests,
   each with its own seed and generator. Baselines, on the same weights:

   * ``official``: the fetched official code itself, when ``--official-src`` points at its ``imagenet_gen``
     directory (kept out of this repository; it needs ``einops``; ``flash_attn`` is stubbed as it is never called
     by sampling, and ``torch.compile`` is replaced by eager execution, so both sides run eager float32);
   * ``reference batch``: ``ClassConditionalPipeline`` with the N labels in one request, which is the official
     batch algorithm (one generator, the reference's draw order; verified bit-exact against the official code)
     without its wasted work.

   The autoencoder decode is the same network on every side and costs the same per image: it is excluded from
   the timed loops (stubbed) and measured once, then added back in the "with decode" column.
2. **1x vs 4x vs 16x.** The engine on random B-1x / B-4x / B-16x weights built in memory (real shapes, same steps,
   N concurrent requests), next to the paper's GPU throughputs (about 11 / 24 / 90 images/s).
3. **Loading memory.** A fresh subprocess loads the B checkpoint with ``load_class_model`` and reports the peak
   RSS of the load and after every kept weight was touched once (the resident cost of serving), against the bytes
   of the weights kept; next to the official pattern (build the model, then ``torch.load`` the whole file).

Times are process CPU seconds with one intra-op thread (``--threads``; the machine is shared and noisy, CPU time
is the contention-robust number); wall seconds are printed too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.families.class_conditional.loader import load_class_model
from bitdance_core.families.class_conditional.pipeline import ClassConditionalPipeline
from bitdance_core.families.class_conditional.random_checkpoint import build_random_class_model, write_class_checkpoint
from bitdance_core.worker.worker import engine_for

PAPER_IMG_S = {"imagenet-b-1x": 11.0, "imagenet-b-4x": 24.0, "imagenet-b-16x": 90.0}


def labels_for(n: int) -> list[int]:
    return [(207 + 131 * i) % 1000 for i in range(n)]


class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def stub_decode(ae) -> None:
    """Make ``ae.decode`` free (returns zeros of the image shape); the decode is timed separately."""
    f = 2 ** (len(ae.decoder.up) - 1)
    ae.decode = lambda z, generator=None: torch.zeros(z.shape[0], 3, z.shape[2] * f, z.shape[3] * f)


def run_engine(engine: Engine, n: int, steps: int, guidance: float, tag: str) -> Clock:
    reqs = [GenerationRequest(f"{tag}{i}", "", 256, 256, seed=1000 + i, steps=steps, guidance_scale=guidance,
                              class_label=(lab,), preview_every=0) for i, lab in enumerate(labels_for(n))]
    with Clock() as c:
        for r in reqs:
            engine.add_request(r)
        done = 0
        while engine.has_work():
            for ev in engine.step():
                if ev.kind is EventKind.FAILED:
                    raise RuntimeError(ev.data)
                done += ev.kind is EventKind.COMPLETED
    assert done == n
    return c


def load_official(src: str, ckpt: Path, vae: Path):
    """The official imagenet_gen model class on CPU, eager, loaded as sample_ddp_parallel.py does."""
    import argparse as ap

    sys.path.insert(0, src)
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)  # eager (bench process only)
    if "flash_attn" not in sys.modules:
        stub = types.ModuleType("flash_attn")
        stub.flash_attn_func = None  # imported by layers.py, never called when sampling with the KV cache
        sys.modules["flash_attn"] = stub
    with torch.serialization.safe_globals([ap.Namespace]):
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    args = ck["args"]
    args.trained_vae = str(vae)
    mod = __import__("src.model_parallel" if getattr(args, "parallel_num", 1) > 1 else "src.model",
                     fromlist=["create_model"])
    model = mod.create_model(args, "cpu")
    model.load_state_dict(ck["ema"] if "ema" in ck else ck["model"], strict=True)
    del ck
    model.load_vae_weight()
    return model.eval()


def section_batch(args, model_path: Path) -> dict:
    model = load_class_model(model_path, "cpu")
    cfg = model.config
    stub_decode(model.ae)
    pipe = ClassConditionalPipeline(model)
    engine = engine_for(model, EngineConfig(max_batch_requests=max(args.n), kv_budget_bytes=None))
    official = None
    if args.official_src:
        official = load_official(args.official_src, model_path, Path(model.vae_path))
        official.decode_in_chunks = lambda x, chunk_size=64: x  # the decode is timed separately
        official.vae.decode = lambda x: x
    g = args.guidance if args.guidance is not None else cfg.default_guidance
    print(f"\n[1] {cfg.name}: {cfg.kind}, P = {cfg.parallel_num} ({cfg.ar_steps} AR steps), {args.steps} steps, "
          f"guidance {g} linear, threads {torch.get_num_threads()}")
    # warm every side once (allocator, kernels)
    pipe([1], seed=0, steps=1, guidance_scale=g)
    run_engine(engine, 1, 1, g, "warm")
    if official is not None:
        torch.manual_seed(0)
        with torch.no_grad():
            official.sample(torch.tensor([1]), sample_steps=1, cfg_scale=g, chunk_size=64)
    rows = {}
    for n in args.n:
        labels = labels_for(n)
        res = {}
        for _ in range(args.repeat):
            if official is not None:
                torch.manual_seed(11)
                with Clock() as c, torch.no_grad():
                    official.sample(torch.tensor(labels), sample_steps=args.steps, cfg_scale=g, chunk_size=64)
                res.setdefault("official", []).append(c)
            with Clock() as c:
                pipe(labels, seed=11, steps=args.steps, guidance_scale=g)
            res.setdefault("reference batch", []).append(c)
            res.setdefault("engine", []).append(run_engine(engine, n, args.steps, g, f"n{n}-"))
        rows[n] = {k: min(v, key=lambda c: c.cpu) for k, v in res.items()}
    # the decode, once (the same network on every side; per-image cost in a batch measured the same: 12.2 vs 12.0 s)
    real = load_class_model(model_path, "cpu")
    z = torch.sign(torch.randn(1, cfg.latent_dim, cfg.grid, cfg.grid, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode(), Clock() as d1:
        real.ae.decode(z)
    per_dec = d1.cpu
    print(f"    decode (same network on every side): {per_dec:.2f} CPU s per image")
    print("    N | side            | CPU s  | wall s | img/s (CPU) | vs engine | img/s with decode")
    out = {}
    for n, sides in rows.items():
        eng = sides["engine"].cpu
        for name, c in sides.items():
            ips = n / c.cpu
            with_dec = n / (c.cpu + n * per_dec)
            print(f"    {n:>2} | {name:<15} | {c.cpu:6.2f} | {c.wall:6.2f} | {ips:11.3f} | "
                  f"{eng / c.cpu:8.2f}x | {with_dec:.3f}")
            out[f"{n}/{name}"] = {"cpu_s": c.cpu, "wall_s": c.wall, "img_s": ips, "img_s_with_decode": with_dec}
        for base in ("official", "reference batch"):
            if base in sides:
                print(f"    N = {n}: engine / {base} images/s = {sides[base].cpu / eng:.2f}x "
                      f"(with decode {(sides[base].cpu + n * per_dec) / (eng + n * per_dec):.2f}x)")
    return out


def section_speedup(args) -> dict:
    print(f"\n[2] 1x vs 4x vs 16x: engine, random B weights at real shapes, N = {max(args.n)} requests, "
          f"{args.steps} steps (decode excluded)")
    out = {}
    for preset in ("imagenet-b-1x", "imagenet-b-4x", "imagenet-b-16x"):
        model = build_random_class_model(preset, "cpu")
        stub_decode(model.ae)
        engine = engine_for(model, EngineConfig(max_batch_requests=max(args.n)))
        g = model.config.default_guidance
        run_engine(engine, 1, 1, g, "warm")
        c = run_engine(engine, max(args.n), args.steps, g, preset)
        out[preset] = max(args.n) / c.cpu
        del engine, model
    base = out["imagenet-b-4x"]
    print("    model  | img/s (CPU) | vs 4x | paper img/s (GPU) | paper vs 4x")
    for p, ips in out.items():
        print(f"    {p[9:]:<6} | {ips:11.3f} | {ips / base:5.2f} | {PAPER_IMG_S[p]:17.0f} | "
              f"{PAPER_IMG_S[p] / PAPER_IMG_S['imagenet-b-4x']:.2f}")
    return out


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def measure_load(path: str, official_pattern: bool) -> dict:
    """In a fresh process: peak RSS of loading (ours: and after touching every weight kept)."""
    import argparse as ap

    import bitdance_core.families.class_conditional.loader as L
    from bitdance_core.families.class_conditional.heads import ClassHead
    from bitdance_core.families.class_conditional.resolve import resolve_config
    from bitdance_core.families.class_conditional.transformer import ClassTransformer
    from bitdance_core.models.autoencoder import BinaryAutoencoder

    with tempfile.TemporaryDirectory() as tmp:  # warm torch.load's lazy imports before measuring
        torch.save({"x": torch.zeros(1)}, Path(tmp) / "w.pt")
        torch.load(Path(tmp) / "w.pt", mmap=True, weights_only=True)
    rss0 = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    if official_pattern:  # sample_ddp*.py: create_model (random init, encoder included), torch.load the whole file
        ck0 = L.load_pickle(Path(path))
        vae = L.load_pickle(L.find_vae(Path(path), None))["state_dict"]
        cfg = resolve_config(Path(path), ck0["model"], vars(ck0["args"]), vae, "ae")
        del ck0, vae
        t = ClassTransformer(cfg)
        h = ClassHead(cfg.latent_dim, cfg.dim, cfg.diff_dim, cfg.diff_layers, cfg.diff_adanln_layers,
                      parallel=cfg.parallel_num > 1)
        ae = BinaryAutoencoder(dict(cfg.vae_ddconfig), with_encoder=True)
        with torch.serialization.safe_globals([ap.Namespace]):
            ck = torch.load(path, map_location="cpu", weights_only=True)
        sd = ck["ema"] if "ema" in ck else ck["model"]
        t.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("head.", "vae."))})
        h.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
        ae.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vae.")})
        del ck, sd
        kept = sum(p.numel() * p.element_size() for m in (t, h, ae) for p in m.parameters())
        return {"rss_before_kb": rss0, "peak_load_kb": _status_kb("VmHWM"), "kept_bytes": kept,
                "load_s": time.perf_counter() - t0}
    m = L.load_class_model(path, "cpu")
    load_s = time.perf_counter() - t0
    peak_load = _status_kb("VmHWM")
    kept = 0
    for mod in (m.transformer, m.head, m.ae):
        for t in mod.parameters():
            kept += t.numel() * t.element_size()
            t.sum()  # page every weight in, as serving does
    return {"rss_before_kb": rss0, "peak_load_kb": peak_load, "peak_touched_kb": _status_kb("VmHWM"),
            "kept_bytes": kept, "load_s": load_s}


def _sub(path: Path, official: bool) -> dict:
    here = str(Path(__file__).parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import bench_imagenet as b; "
            f"print(json.dumps(b.measure_load({str(path)!r}, {official!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def section_memory(path: Path) -> dict:
    ours, off = _sub(path, False), _sub(path, True)
    kept = ours["kept_bytes"] / 2**20
    print(f"\n[3] loading {path.name} ({path.stat().st_size / 2**30:.2f} GiB file; weights kept {kept:.0f} MiB: "
          "transformer + head + decoder)")
    load = (ours["peak_load_kb"] - ours["rss_before_kb"]) / 1024
    touched = (ours["peak_touched_kb"] - ours["rss_before_kb"]) / 1024
    official = (off["peak_load_kb"] - off["rss_before_kb"]) / 1024
    print(f"    ours: peak RSS of the load {load:.0f} MiB above the pre-load RSS ({ours['load_s']:.1f} s; mmap, "
          f"weights adopted without a copy); after touching every kept weight {touched:.0f} MiB = "
          f"{touched / kept:.2f}x the weights kept")
    print(f"    official pattern (random-init model with encoder, then torch.load of the whole file): peak "
          f"{official:.0f} MiB = {official / kept:.2f}x ({off['load_s']:.1f} s)")
    return {"ours": ours, "official_pattern": off}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a BitDance_*.pt (default: make-checkpoint imagenet-b-4x, temp dir)")
    ap.add_argument("--official-src", default=None, help="the fetched official imagenet_gen directory")
    ap.add_argument("--steps", type=int, default=4, help="diffusion steps per AR step (the paper: 100)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the file's released guidance")
    ap.add_argument("--n", default="1,8", help="batch sizes")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per side (the lowest CPU time is kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: batch,speedup,memory")
    args = ap.parse_args()
    args.n = [int(x) for x in args.n.split(",")]
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="bitdance-imnet-bench-") as tmp:
        path = Path(args.model) if args.model else None
        if path is None and not {"batch", "memory"} <= skip:
            t0 = time.perf_counter()
            path = write_class_checkpoint("imagenet-b-4x", tmp, seed=0)
            print(f"wrote random B-4x ({path.stat().st_size / 2**30:.2f} GiB + autoencoder) in "
                  f"{time.perf_counter() - t0:.0f} s")
        result = {}
        if "memory" not in skip:
            result["memory"] = section_memory(path)
        if "batch" not in skip:
            result["batch"] = section_batch(args, path)
        if "speedup" not in skip:
            result["speedup"] = section_speedup(args)
    print("\n" + json.dumps(result, default=lambda o: None))


if __name__ == "__main__":
    main()
