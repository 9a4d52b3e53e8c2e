"""Evaluate a demo checkpoint (``bitdance eval-demo``): generate with the project pipeline, score, report.

Caption sets come from ``data.evaluation_captions``: seen and held-out captions, each split into plain
single-object, positioned single-object and two-object captions. Each caption is generated with
``images_per_caption`` seeds. Reported rates (fractions of images):

* single objects (plain + positioned): colour, shape, position (positioned captions only), all;
* two objects: both colours, both shapes, left/right order, all ("both right").
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from bitdance_core import default_model_dir
from bitdance_core.demo import data as demo_data
from bitdance_core.demo.score import score

logger = logging.getLogger(__name__)


def _rate(xs: list[bool]) -> float | None:
    return round(float(np.mean(xs)), 4) if xs else None


def evaluate(
    model_dir: str | Path,
    steps: int | None = None,
    guidance_scale: float | None = None,
    per_group: int = 24,
    images_per_caption: int = 2,
    seed: int = 0,
    save_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    splits: tuple[str, ...] = ("seen", "heldout"),
    pipe=None,
    quantize: str | None = None,
) -> dict:
    """``steps`` / ``guidance_scale`` default to the checkpoint's serving defaults (``serving_config.json``);
    ``quantize`` (none | int8) loads the prior quantised (``bitdance_core.loading.quantize``)."""
    from tqdm import tqdm

    from bitdance_core.engine.serving_config import ServingConfig
    from bitdance_core.families.text_to_image.pipeline import BitDancePipeline

    if threads:
        torch.set_num_threads(threads)
    if pipe is None:
        pipe = BitDancePipeline.from_pretrained(str(model_dir), device="cpu", quantize=quantize)
    serving = ServingConfig.for_model(pipe.config)
    steps = serving.default_steps if steps is None else steps
    guidance_scale = serving.default_guidance if guidance_scale is None else guidance_scale
    size = demo_data.IMAGE_SIZE
    sets = demo_data.evaluation_captions(per_group, seed)
    report: dict = {
        "model_dir": str(model_dir),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "images_per_caption": images_per_caption,
        "parallel_num": pipe.config.parallel_num,
        "quantize": pipe.model.quantize,
    }
    grid = size // pipe.config.downsample
    report["ar_steps"] = grid * grid // pipe.config.parallel_num
    gen_time = 0.0
    n_images = 0
    saved: dict[str, list] = {}
    for split in splits:
        res: dict[str, list[bool]] = {k: [] for k in (
            "single_color", "single_shape", "single_position", "single_all",
            "two_color", "two_shape", "two_order", "two_all")}
        jobs = [(g, sc) for g in ("single", "position", "two") for sc in sets[f"{split}/{g}"]]
        for g, sc in tqdm(jobs, desc=f"eval {split}", disable=not progress, mininterval=5):
            t0 = time.perf_counter()
            out = pipe(sc.caption, size, size, steps=steps, guidance_scale=guidance_scale,
                       seed=seed * 1000 + len(saved.get(split, [])), num_images=images_per_caption)
            gen_time += time.perf_counter() - t0
            n_images += images_per_caption
            saved.setdefault(split, []).append((sc.caption, out.images))
            for img in out.images:
                s = score(img, sc)
                if g == "two":
                    res["two_color"].append(s.color)
                    res["two_shape"].append(s.shape)
                    res["two_order"].append(s.position)
                    res["two_all"].append(s.all)
                else:
                    res["single_color"].append(s.color)
                    res["single_shape"].append(s.shape)
                    if g == "position":
                        res["single_position"].append(s.position)
                    res["single_all"].append(s.all)
        report[split] = {k: _rate(v) for k, v in res.items()}
        report[split]["n_single"] = len(res["single_all"])
        report[split]["n_two"] = len(res["two_all"])
    report["seconds_per_image"] = round(gen_time / max(1, n_images), 3)
    report["seconds_per_request"] = round(gen_time / max(1, n_images // images_per_caption), 3)
    if save_dir is not None:
        _save_grids(Path(save_dir), saved)
    return report


def _save_grids(out: Path, saved: dict[str, list]) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for split, items in saved.items():
        rows = [np.concatenate([np.asarray(im) for im in imgs], axis=1) for _, imgs in items]
        grid = np.concatenate(rows, axis=0)
        Image.fromarray(grid).save(out / f"{split}.png")
        (out / f"{split}.txt").write_text("\n".join(c for c, _ in items) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bitdance eval-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    ap.add_argument("--steps", type=int, default=None, help="default: the checkpoint's serving default")
    ap.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's serving default")
    ap.add_argument("--per-group", type=int, default=24)
    ap.add_argument("--images-per-caption", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save-dir", default=None, help="write image grids here")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--quantize", default="none", choices=("none", "int8"),
                    help="weight-only quantisation of the prior while loading (default none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model or default_model_dir()
    rep = evaluate(model, args.steps, args.guidance, args.per_group, args.images_per_caption, args.seed,
                   args.save_dir, args.threads, quantize=args.quantize)
    text = json.dumps(rep, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    logger.info("evaluation report:\n%s", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
