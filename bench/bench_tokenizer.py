"""Round trip of the binary tokenizer: PSNR of ``detokenize(tokenize(x))`` on demo-like images.

    python bench/bench_tokenizer.py [--model DIR_OR_AE_FILE] [--n 32] [--seed 7] [--threads 1]

Default: the embedded demo model's autoencoder on ``n`` scenes of the demo's own generator
(``bitdance_core.demo.data.make_dataset``, a seed its training does not use), CPU, float32. Prints one JSON
line: mean / min / max PSNR (dB, on uint8 RGB) and the per-image encode and decode times.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bitdance_core.demo.data import make_dataset
from bitdance_core.tokenize_cli import load_tokenizer


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(model=args.model, ae_config=None, vae=None, model_args=None, device="cpu",
                            dtype="float32")
    tok = load_tokenizer(ns)
    h, w = tok.spec.sizes[0] if tok.spec.sizes else (64, 64)
    images, _, _ = make_dataset(args.n, args.seed, size=h)
    scores, t_enc, t_dec = [], 0.0, 0.0
    for img in images:
        t0 = time.perf_counter()
        tokens = tok.tokenize(img)
        t1 = time.perf_counter()
        out = tok.detokenize(tokens, h, w)
        t_dec += time.perf_counter() - t1
        t_enc += t1 - t0
        scores.append(psnr(img, out))
    print(json.dumps({"model": tok.name, "images": len(scores), "size": f"{w}x{h}", "bits_per_token":
                      tok.spec.z_channels, "downsample": tok.spec.downsample,
                      "psnr_mean_db": round(float(np.mean(scores)), 2), "psnr_min_db": round(min(scores), 2),
                      "psnr_max_db": round(max(scores), 2), "encode_ms": round(1e3 * t_enc / len(scores), 1),
                      "decode_ms": round(1e3 * t_dec / len(scores), 1)}))


if __name__ == "__main__":
    main()
