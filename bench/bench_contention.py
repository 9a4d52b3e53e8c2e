"""A demo request's time idle vs next to CPU neighbours, for two CPU-thread policies, side by side.

Policies (each in a fresh worker-like process, so OpenMP reads its environment at start):

- ``torch-default``: torch's own thread count, OpenMP's default (spin-waiting) policy, default
  inter-op threads (what the server did before ``usable_cpus``);
- ``bitdance``: the server's defaults (``server.settings``): intra-op threads = usable CPUs
  (affinity, cgroup quota) / CPU workers, 1 inter-op thread, ``OMP_WAIT_POLICY=PASSIVE``;
- ``BITDANCE_THREADS=1`` (with the other defaults), unless that is already the default;
- optionally ``--also-active`` adds ``bitdance`` threads with OpenMP's default wait policy, to
  show what PASSIVE alone buys.

All policies are loaded first (one process each), then every request runs alone: for each
repetition, for each condition, each policy in turn, so background noise hits them alike.
Neighbours, each bounded (killed after the measurement, and self-limited to ``--neighbour-s``):
a Python busy loop; another torch process multiplying 1024x1024 matrices with its default
threads; both at once. Conditions are interleaved within each repetition (idle, busy, torch,
both, idle, ...) so that machine-wide noise hits them alike; every run is kept and the report
gives the median and the worst ratio to the policy's idle median: the bad runs are intermittent.

    .venv/bin/python bench/bench_contention.py                # demo model, its default request, 5 reps
    .venv/bin/python bench/bench_contention.py --reps 10 --also-active
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUSY = "import time\nt = time.time() + {s}\nwhile time.time() < t:\n    pass\n"
TORCH = (
    "import time, torch\na = torch.randn(1024, 1024)\nt = time.time() + {s}\n"
    "while time.time() < t:\n    a @ a\n"
)
CONDITIONS = ("idle", "busy loop", "torch 1024^2", "both")
BASELINES = ("torch-default", "bitdance, OMP active")


def _neighbours(cond: str, seconds: float) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}  # the neighbour's defaults
    codes = {"idle": [], "busy loop": [BUSY], "torch 1024^2": [TORCH], "both": [BUSY, TORCH]}[cond]
    return [subprocess.Popen([sys.executable, "-c", c.format(s=seconds)], env=env) for c in codes]


def child(args: argparse.Namespace) -> None:
    """Load the engine once with this process's thread policy; then, per line on stdin (a seed),
    time one demo request and print the seconds. Idle (blocked on stdin) between requests."""
    import torch

    from bitdance_core import default_model_dir
    from bitdance_core.engine.protocol import GenerationRequest, WorkerConfig
    from bitdance_core.worker.worker import build_engine

    model = args.model or default_model_dir()
    cfg = WorkerConfig(model_dir=model, threads=args.threads or None, interop_threads=args.interop or None)
    engine = build_engine(cfg)
    info = engine.info()
    h, w = info["default_size"]
    steps, guidance = args.steps or info["defaults"]["steps"], info["defaults"]["guidance_scale"]

    def one(i: int) -> float:
        req = GenerationRequest(f"bench-{i}", "a red circle on a blue square", h, w, seed=i % 7, steps=steps,
                                guidance_scale=guidance, preview_every=0)  # fmt: skip
        t0 = time.perf_counter()
        engine.add_request(req)
        while engine.has_work():
            engine.step()
        return time.perf_counter() - t0

    one(0)  # warm: the first request at this size
    print(json.dumps({"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "size": f"{w}x{h}",
                      "steps": steps, "model": info["model"]}), flush=True)  # fmt: skip
    for line in sys.stdin:
        print(json.dumps(one(int(line))), flush=True)


class Policy:
    """A child process holding a loaded engine under one thread policy."""

    def __init__(self, name: str, threads: int, interop: int, wait: str | None, args: argparse.Namespace) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
        if wait:
            env["OMP_WAIT_POLICY"] = wait
        env["PYTHONPATH"] = str(REPO)
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--interop", str(interop),
               "--steps", str(args.steps)]  # fmt: skip
        if args.model:
            cmd += ["--model", args.model]
        self.name = name
        self.baseline = name in BASELINES
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.meta = json.loads(self.proc.stdout.readline())
        self.times: dict[str, list[float]] = {c: [] for c in CONDITIONS}

    def run(self, seed: int) -> float:
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        return float(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded demo model)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of every condition (default 5)")
    ap.add_argument("--baseline-reps", type=int, default=None,
                    help="repetitions for the baseline policies (torch-default, OMP active); default: --reps")
    ap.add_argument("--steps", type=int, default=0, help="diffusion steps per patch (default: the model's)")
    ap.add_argument("--neighbour-s", type=float, default=120.0, help="self-limit of each neighbour process")
    ap.add_argument("--also-active", action="store_true", help="also: bitdance threads, OpenMP default waiting")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--interop", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from server.settings import Settings, usable_cpus

    s = Settings(devices=["cpu"])
    ours = s.worker_configs()[0]
    policies = [("torch-default", 0, 0, None), ("bitdance", ours.threads, s.interop_threads, "PASSIVE")]
    if args.also_active:
        policies.append(("bitdance, OMP active", ours.threads, s.interop_threads, None))
    if ours.threads != 1:
        policies.append(("BITDANCE_THREADS=1", 1, s.interop_threads, "PASSIVE"))
    print(f"usable CPUs: {usable_cpus()} (os.cpu_count() {os.cpu_count()}); {args.reps} reps per condition",
          flush=True)  # fmt: skip
    loaded = [Policy(*p, args) for p in policies]  # loaded one after another, then measured interleaved
    n = 0
    try:
        for rep in range(args.reps):
            for cond in CONDITIONS:
                procs = _neighbours(cond, args.neighbour_s)
                try:
                    time.sleep(0.5 if procs else 0.0)  # let the neighbours get going
                    for pol in loaded:
                        if pol.baseline and rep >= (args.reps if args.baseline_reps is None else args.baseline_reps):
                            continue
                        n += 1
                        t = pol.run(n)
                        pol.times[cond].append(t)
                        print(f"  rep {rep + 1} {cond:<13} {pol.name:<22} {t:7.2f} s", file=sys.stderr, flush=True)
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
    finally:
        for pol in loaded:
            pol.close()
    results = [{"policy": p.name, "times": p.times, **p.meta} for p in loaded if p.times["idle"]]  # (--baseline-reps 0)
    if args.json:
        print(json.dumps(results, indent=1))
    head = f"{'policy':<22}{'threads':>8}  " + "  ".join(f"{c:>22}" for c in CONDITIONS)
    print(f"demo request: {results[0]['model']} {results[0]['size']}, {results[0]['steps']} steps; seconds "
          "median [worst] and the ratio to the policy's idle median")  # fmt: skip
    print(head)
    for r in results:
        idle = statistics.median(r["times"]["idle"])
        cells = []
        for c in CONDITIONS:
            t = r["times"][c]
            cells.append(f"{statistics.median(t):6.2f} [{max(t):6.2f}] {max(t) / idle:5.1f}x")
        print(f"{r['policy']:<22}{r['threads']:>4}/{r['interop']:<3}  " + "  ".join(f"{x:>22}" for x in cells))
    for r in results:
        idle = statistics.median(r["times"]["idle"])
        worst = max(max(r["times"][c]) / idle for c in CONDITIONS[1:])
        print(f"{r['policy']}: worst run next to a neighbour = {worst:.1f}x idle (target <= 3x)")


if __name__ == "__main__":
    main()
