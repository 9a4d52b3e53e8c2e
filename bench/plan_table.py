"""The README's table: GPU memory x quantisation x max concurrent requests, from ``bitdance plan``.

    python bench/plan_table.py [--preset 14b-64x] [--memory 24GiB,48GiB,80GiB] [--sizes 512,1024]

Each cell is ``memory_plan.plan_preset(preset, memory, "bfloat16", (s, s), build=quantize.fake_build(mode))``: the
real engine's step measured under FakeTensorMode on the model as a ``--quantize MODE`` load keeps it (guidance on,
one image per request, the longest prompts). No weights are read; 14-97 s of CPU per cell (2026-12-05: more
with more requests, each 16 admitted one more measured step).
"""

from __future__ import annotations

import argparse

from bitdance_core.loading.quantize import MODES, fake_build
from bitdance_core.planning.memory_plan import parse_bytes, plan_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="14b-64x")
    ap.add_argument("--memory", default="24GiB,48GiB,80GiB")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{args.preset}, bfloat16 compute, guidance on, one image per request: max_concurrent_requests "
          "(weights GiB)")
    print("| GPU memory | --quantize | " + " | ".join(f"{s}x{s}" for s in sizes) + " | weights |")
    print("|---|---|" + "---|" * len(sizes) + "---|")
    for mem in args.memory.split(","):
        for mode in args.modes.split(","):
            cells, weights = [], 0
            for s in sizes:
                p = plan_preset(args.preset, parse_bytes(mem), "bfloat16", (s, s), build=fake_build(mode))
                cells.append(str(p.max_concurrent_requests) if p.fits else "does not fit")
                weights = p.weights_bytes
            print(f"| {mem} | {mode} | " + " | ".join(cells) + f" | {weights / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
