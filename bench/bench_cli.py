"""``bitdance generate`` against the server for the same demo request, side by side, idle and next to a torch process.

Both use the one CPU thread policy (``bitdance_core.cpu_threads``: threads from the usable CPUs, OpenMP passive
waiting, one inter-op thread). One server (``bitdance serve``, one CPU worker, warmed up) stays up; then, per
repetition and condition (idle; another torch process multiplying 1024x1024 matrices with its default threads),
the same request (demo model, its default size and steps, one prompt, one seed) goes once through the server
(``timings.generation_s`` of ``POST /generate``) and once through a fresh ``bitdance generate`` process (its printed
``generation:`` time: the pipeline call, without start-up and model load; the process's wall time is shown too).
Conditions and paths are interleaved so machine-wide noise hits them alike; the report gives medians, the CLI/server
ratio (target <= 1.2) and the load average before and after.

    .venv/bin/python bench/bench_cli.py                    # 3 repetitions, the policy's default threads
    .venv/bin/python bench/bench_cli.py --reps 5 --threads 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TORCH = "import time, torch\na = torch.randn(1024, 1024)\nt = time.time() + {s}\nwhile time.time() < t:\n    a @ a\n"
CONDITIONS = ("idle", "torch 1024^2")
PROMPT = "a red circle above a blue square"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "BITDANCE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _neighbour(cond: str, seconds: float) -> subprocess.Popen | None:
    if cond == "idle":
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}  # the neighbour's defaults
    return subprocess.Popen([sys.executable, "-c", TORCH.format(s=seconds)], env=env)


def _server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--devices", "cpu", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server was not ready after {args.ready_timeout_s} s")


def _via_server(url: str, seed: int) -> float:
    r = httpx.post(url + "/generate", json={"prompt": PROMPT, "seed": seed}, timeout=600)
    r.raise_for_status()
    return float(r.json()["timings"]["generation_s"])


def _via_cli(args: argparse.Namespace, seed: int, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "bitdance_core.cli", "generate", "--prompt", PROMPT, "--seed", str(seed),
           "--output", str(out), "--no-progress", "--device", "cpu"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    m = re.search(r"^generation: ([0-9.]+) s$", r.stdout, re.M)
    if r.returncode != 0 or m is None:
        raise SystemExit(f"bitdance generate failed ({r.returncode}): {r.stderr[-2000:]}")
    return float(m.group(1)), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded demo model)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every condition (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: the policy's)")
    ap.add_argument("--neighbour-s", type=float, default=120.0, help="self-limit of the neighbour process")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0, help="how long to wait for the server")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    load_before = os.getloadavg()
    server, url = _server(args)
    times: dict[str, dict[str, list[float]]] = {c: {"server": [], "cli": [], "cli_wall": []} for c in CONDITIONS}
    try:
        _via_server(url, 0)  # the first request after the worker's warm-up
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.reps):
                for cond in CONDITIONS:
                    neighbour = _neighbour(cond, args.neighbour_s)
                    try:
                        time.sleep(0.5 if neighbour else 0.0)
                        seed = 1000 + rep
                        times[cond]["server"].append(_via_server(url, seed))
                        gen, wall = _via_cli(args, seed, Path(tmp) / "out.png")
                        times[cond]["cli"].append(gen)
                        times[cond]["cli_wall"].append(wall)
                    finally:
                        if neighbour is not None:
                            neighbour.kill()
                            neighbour.wait()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    load_after = os.getloadavg()
    rows = []
    for cond in CONDITIONS:
        t = times[cond]
        srv, cli, wall = (statistics.median(t[k]) for k in ("server", "cli", "cli_wall"))
        rows.append({"condition": cond, "server_s": round(srv, 3), "cli_s": round(cli, 3), "cli_wall_s": round(wall, 2),
                     "ratio": round(cli / srv, 2), "runs": {k: [round(x, 3) for x in v] for k, v in t.items()}})
    report = {"reps": args.reps, "threads": args.threads or "policy default", "cpus": len(os.sched_getaffinity(0)),
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
              "rows": rows}
    if args.json:
        print(json.dumps(report))
        return
    print(f"demo request, {args.reps} reps, threads: {report['threads']}, usable CPUs: {report['cpus']}; "
          f"load average before {report['load_before']}, after {report['load_after']}")
    print(f"{'condition':<14}{'server gen s':>14}{'CLI gen s':>12}{'CLI / server':>14}{'CLI process s':>15}")
    for r in rows:
        print(f"{r['condition']:<14}{r['server_s']:>14.3f}{r['cli_s']:>12.3f}{r['ratio']:>13.2f}x{r['cli_wall_s']:>15.2f}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst CLI / server ratio: {worst:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
