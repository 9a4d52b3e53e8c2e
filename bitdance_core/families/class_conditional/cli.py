"""``bitdance generate --model BitDance_*.pt --class-label L ...``: the class-conditional branch of the CLI.

Labels come from ``--class-label`` (once per image) or a ``--prompt`` that is exactly an ImageNet class name
(``--num-images`` copies of it). One request: the labels share one seeded generator, drawn as the official
sampler draws its batch. Defaults (steps 100, the released file's guidance, linear schedule) are the server's.
"""

from __future__ import annotations

from ...cli_generate import CLIError, Generation
from ...engine.serving_config import InvalidRequest
from ...loading.io import CheckpointError
from ...png_metadata import image_parameters
from .classes import class_names, label_for_prompt
from .config import DEFAULT_STEPS
from .family import refuse_quantize
from .pipeline import ClassConditionalPipeline


def generation(args) -> Generation:
    if args.negative_prompt is not None:
        raise CLIError("--negative-prompt does not apply to a class-conditional model (its unconditional stream is "
                       "the null class)")
    if args.height is not None or args.width is not None:
        raise CLIError("a class-conditional model generates one size only (256x256); drop --height/--width")
    try:
        refuse_quantize(getattr(args, "quantize", "none"))  # the family's answer
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        pipe = ClassConditionalPipeline.from_checkpoint(args.model, device=args.device, dtype=args.dtype,
                                                        vae=args.vae, model_args=args.model_args)
    except (CheckpointError, ValueError, RuntimeError) as e:
        raise CLIError(f"cannot load {args.model}: {e}") from e
    cfg = pipe.config
    try:
        if args.class_label:
            if args.prompt is not None:
                raise CLIError("give --class-label or --prompt, not both")
            labels = list(args.class_label)
            if args.num_images not in (1, len(labels)):
                raise CLIError(f"--num-images {args.num_images} differs from the {len(labels)} --class-label values")
        elif args.prompt is not None:
            labels = [label_for_prompt(args.prompt, cfg.num_classes, field="--prompt")] * args.num_images
        else:
            raise CLIError("give --class-label L (an ImageNet label 0-999, once per image) or a --prompt that is "
                           "exactly an ImageNet class name")
    except InvalidRequest as e:
        raise CLIError(str(e)) from e
    steps = args.steps if args.steps is not None else DEFAULT_STEPS
    guidance = args.guidance if args.guidance is not None else cfg.default_guidance
    schedule = args.cfg_schedule or "linear"

    def run(seed: int, progress):
        try:
            return pipe(labels, seed=seed, steps=steps, guidance_scale=guidance, cfg_schedule=schedule,
                        callback=progress)
        except InvalidRequest as e:
            raise CLIError(str(e)) from e

    names = class_names() if cfg.num_classes == 1000 else None

    def parameters(i: int, seed: int) -> dict:
        return image_parameters(  # the server's format (infotext + JSON), no local paths
            prompt=names[labels[i]] if names else "", negative_prompt=None, seed=seed, steps=steps,
            guidance_scale=guidance, width=cfg.image_size, height=cfg.image_size, model=cfg.name, index=i,
            num_images=len(labels), class_label=labels[i], cfg_schedule=schedule)

    return Generation(run, len(labels), parameters)
