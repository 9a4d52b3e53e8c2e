"""``bitdance generate --prompt TEXT [--model DIR] ...``: the text-to-image part of the CLI.

Defaults (size, steps, guidance) and the allowed sizes are the server's (``engine/serving_config.py``); without
``--model`` it runs the embedded demo model. ``bitdance_core.cli_generate.run_generation`` does the rest.
"""

from __future__ import annotations

from pathlib import Path

import bitdance_core  # default_model_dir() read at call time (tests point it elsewhere)

from ...cli_generate import CLIError, Generation
from ...engine.serving_config import ServingConfig
from ...loading.io import CheckpointError
from ...png_metadata import image_parameters
from ...resolutions import SizeError
from .pipeline import BitDancePipeline


def generation(args) -> Generation:
    if args.class_label:
        raise CLIError("--class-label needs a class-conditional model (--model BitDance_*.pt); this is a "
                       "text-to-image checkpoint")
    if args.prompt is None:
        raise CLIError("--prompt is required for a text-to-image model")
    model_dir = Path(args.model) if args.model else Path(bitdance_core.default_model_dir())
    if not args.model and not (model_dir / "config.json").is_file():
        raise CLIError(f"no embedded demo model at {model_dir} (not built yet); pass --model DIR, or write a "
                       "random one with `bitdance make-checkpoint --preset tiny --output DIR`")
    if args.num_images < 1:
        raise CLIError("--num-images must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise CLIError("--steps must be at least 1")
    try:
        pipe = BitDancePipeline.from_pretrained(model_dir, device=args.device, dtype=args.dtype,
                                                quantize=args.quantize)
        serving = ServingConfig.for_model(pipe.config)  # the same defaults and sizes as the server
    except (CheckpointError, ValueError, RuntimeError) as e:  # a broken checkpoint, a bad --device / --dtype
        raise CLIError(f"cannot load {model_dir}: {e}") from e
    dh, dw = serving.default_size
    height = args.height if args.height is not None else (args.width if args.width is not None else dh)
    width = args.width if args.width is not None else (args.height if args.height is not None else dw)
    steps = args.steps if args.steps is not None else serving.default_steps
    guidance = args.guidance if args.guidance is not None else serving.default_guidance
    try:
        serving.size_policy(pipe.config).check(height, width)
    except SizeError as e:
        raise CLIError(str(e)) from e

    def run(seed: int, progress):
        return pipe(args.prompt, height, width, steps=steps, guidance_scale=guidance, seed=seed,
                    num_images=args.num_images, negative_prompt=args.negative_prompt, callback=progress)

    def parameters(i: int, seed: int) -> dict:
        return image_parameters(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=seed, steps=steps,
                                guidance_scale=guidance, width=width, height=height, model=pipe.config.name,
                                index=i, num_images=args.num_images)

    return Generation(run, args.num_images, parameters)
