"""The one PNG metadata format of BitDance images, written by the CLI and by the server's worker.

Two text chunks: ``parameters`` (Stable Diffusion web UI "infotext", which image viewers and
sites already read) and ``bitdance`` (JSON, for programs), with the same fields from both
writers and no local paths::

    {"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "model",
     "index", "num_images"}

``steps`` is the diffusion steps per patch. Standard library only (the API process imports it).
"""

from __future__ import annotations

import json
from typing import Any

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "model", "index",
          "num_images")


def image_parameters(
    *, prompt: str, negative_prompt: str | None, seed: int, steps: int, guidance_scale: float, width: int,
    height: int, model: str, index: int = 0, num_images: int = 1, **extra: Any,
) -> dict[str, Any]:
    return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
            "guidance_scale": guidance_scale, "width": width, "height": height, "model": model, "index": index,
            "num_images": num_images, **extra}


def infotext(p: dict[str, Any]) -> str:
    text = p["prompt"]
    if p.get("negative_prompt"):
        text += f"\nNegative prompt: {p['negative_prompt']}"
    return (f"{text}\nSteps: {p['steps']}, CFG scale: {p['guidance_scale']}, Seed: {p['seed']}, "
            f"Size: {p['width']}x{p['height']}, Model: {p['model']}")


def png_text(params: dict[str, Any]) -> dict[str, str]:
    """The text chunks of one image: ``{"parameters": infotext, "bitdance": JSON}``."""
    return {"parameters": infotext(params), "bitdance": json.dumps(params, sort_keys=True)}
