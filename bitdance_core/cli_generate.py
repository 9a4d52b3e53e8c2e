"""``bitdance generate``'s one path for every family: seed, progress bar, timing, output files.

A family's CLI glue (``families/<family>/cli.py``) checks its flags, loads its reference pipeline and returns a
:class:`Generation`; :func:`run_generation` does the rest the same way for both families. Torch-free at import.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # what --output may end in


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def output_paths(output: str | Path, n: int) -> list[Path]:
    """OUT.png for one image; OUT-0.png, OUT-1.png, ... for several. The suffix picks the format (.png, .jpg /
    .jpeg, .webp); no suffix: .png; any other suffix is refused naming the supported ones."""
    out = Path(output)
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    if out.suffix.lower() not in IMAGE_FORMATS:
        raise CLIError(f"--output {output}: {out.suffix!r} is not an image format this writes; end it in "
                       f"{', '.join(IMAGE_FORMATS)}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def save_image(img, path: Path, params: dict) -> None:
    """PNG with the server's ``parameters`` text chunks; JPEG / WebP at quality 90, as the server encodes them."""
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        from .png_metadata import png_text

        info = PngInfo()
        for key, value in png_text(params).items():  # the server's format: no local paths
            info.add_text(key, value)
        img.save(path, format=fmt, pnginfo=info)
    else:
        img.save(path, format=fmt, quality=90)


@dataclass
class Generation:
    """What a family's CLI glue hands to :func:`run_generation`."""

    run: Callable[[int, Callable[[int, int], None]], Any]  # (seed, progress(step, total)) -> output (.images, .seed)
    num_images: int
    parameters: Callable[[int, int], dict]  # (image index, seed used) -> the image's ``parameters`` metadata


def run_generation(gen: Generation, args: argparse.Namespace) -> int:
    """Print the seed (a random one without --seed), run with a progress bar on stderr unless --no-progress, print
    the generation time (as the server's ``timings.generation_s``) and write each image with its metadata."""
    from tqdm import tqdm

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"seed: {seed}", flush=True)
    bar = None if args.no_progress else tqdm(desc="generating", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(step: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(step - bar.n)

    t0 = time.perf_counter()
    try:
        out = gen.run(seed, progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"generation: {time.perf_counter() - t0:.3f} s", flush=True)
    paths = output_paths(args.output, gen.num_images)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for i, (img, path) in enumerate(zip(out.images, paths)):
        save_image(img, path, gen.parameters(i, out.seed))
        print(f"saved: {path}", flush=True)
    return 0
