"""The ``bitdance`` command.

    bitdance generate --prompt TEXT [--model DIR] [--height H --width W] [--steps S] [--guidance G]
                      [--seed N] [--num-images K] [--negative-prompt TEXT] [--device D] [--dtype T]
                      [--quantize none|int8|fp8] [--threads N] --output OUT.png|OUT.jpg|OUT.webp
    bitdance generate --model FILE.pt --class-label L [--class-label L2 ...] [--seed N] [--steps S] [--guidance G]
                      [--cfg-schedule linear|constant] [--vae AE.pt] [--model-args ARGS.json] --output OUT.png
    bitdance make-checkpoint --preset NAME --output DIR [--seed N]
    bitdance quantize --model DIR --output DIR2 --quantize int8|fp8   (a pre-quantised checkpoint directory)
    bitdance plan (--preset NAME | --model DIR) --gpu-memory 80GiB [--dtype bfloat16] [--size WxH] [--json]
                  [--quantize none|int8|fp8]
    bitdance serve ...       (the HTTP server; ``server.cli``)
    bitdance train-demo ...  (train the embedded demo model; ``bitdance_core.demo.train``)
    bitdance eval-demo ...   (score a demo checkpoint; ``bitdance_core.demo.evaluate``)

``generate`` writes K images (OUT.png when K = 1, else OUT-0.png, OUT-1.png, ...; .jpg / .webp write JPEG / WebP),
each PNG with a ``parameters`` text chunk (JSON: prompt, negative prompt, seed, steps, guidance, size, model, index);
it applies the server's CPU thread policy (``bitdance_core.cpu_threads``; ``--threads``), shows a progress bar on
stderr and prints the seed it used (a random one when --seed is absent) and the generation time on stdout.
Default size, steps and guidance, and the allowed sizes, are the server's (``bitdance_core.engine.serving_config``):
1024x1024, 50 steps, 7.5 for the released checkpoints; a checkpoint's optional ``serving_config.json`` overrides
them. Heavy imports (torch, the server) happen inside the subcommands, so ``bitdance --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .cli_generate import CLIError, output_paths, run_generation
from .engine.engine_config import EngineConfig, plan_knobs
from .families.text_to_image.config import DEFAULT_GUIDANCE, DEFAULT_STEPS

DELEGATES = {
    "serve": ("server.cli", "serve_main", "run the HTTP server (see `bitdance serve --help`)"),
    "train-demo": ("bitdance_core.demo.train", "main", "train the embedded demo model"),
    "eval-demo": ("bitdance_core.demo.evaluate", "main", "evaluate a demo checkpoint"),
    "tokenize": ("bitdance_core.tokenize_cli", "tokenize_main", "an image -> its binary tokens (.npz)"),
    "detokenize": ("bitdance_core.tokenize_cli", "detokenize_main", "binary tokens (.npz) -> the decoded PNG"),
}


QUANTIZE_MODES = ("none", "int8", "fp8")  # bitdance_core.loading.quantize.MODES, without importing torch for --help
DTYPES = ("float32", "bfloat16", "float16")  # bitdance_core.device also takes fp32 / bf16 / fp16


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bitdance", description="BitDance image generation: generate, serve, tools.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level on stderr")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate", help="generate images from a prompt (or ImageNet class labels) into image files",
        description="Generate images in this process, with the server's defaults, sizes and CPU thread policy. "
        "A text-to-image checkpoint directory takes --prompt; a class-conditional BitDance_*.pt file takes "
        "--class-label (or a --prompt that is exactly an ImageNet class name). Prints the seed on stdout.")
    g.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model), or a "
                                                 "class-conditional BitDance_*.pt file")
    g.add_argument("--prompt", default=None, help="text (a class-conditional model: exactly an ImageNet class name)")
    g.add_argument("--class-label", type=int, action="append", default=None, metavar="L",
                   help="class-conditional models: an ImageNet label 0-999, once per image")
    g.add_argument("--cfg-schedule", default=None, choices=["linear", "constant"],
                   help="class-conditional models: guidance over the AR steps (default: linear, as the paper)")
    g.add_argument("--vae", default=None, help="class-conditional models: the autoencoder .pt (default: "
                                               "ae_d16c32.pt, or the only ae*.pt, beside the checkpoint)")
    g.add_argument("--model-args", default=None, help="class-conditional models: architecture JSON when the file "
                                                      "name, args and shapes cannot tell it")
    g.add_argument("--negative-prompt", default=None, help="text for the unconditional stream (default: none)")
    g.add_argument("--height", type=int, default=None, help="pixels (default: the checkpoint's default size: "
                                                            "1024x1024 for the released models; with only --width, "
                                                            "the same as --width)")
    g.add_argument("--width", type=int, default=None, help="pixels (default: the checkpoint's default size; with only "
                                                           "--height, the same as --height)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"diffusion steps per AR step (default: {DEFAULT_STEPS}, or the checkpoint's "
                   "serving_config.json)")
    g.add_argument("--guidance", type=float, default=None, help=f"CFG scale, <= 1 disables guidance (default: "
                   f"{DEFAULT_GUIDANCE}, or the checkpoint's serving_config.json)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    g.add_argument("--num-images", type=int, default=1, help="images from this prompt and seed (default 1)")
    g.add_argument("--output", required=True, help="OUT.png, OUT.jpg or OUT.webp (the suffix picks the format; "
                                                   "several images: OUT-0.png, OUT-1.png, ...)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="compute dtype (default: float32 on CPU, "
                                                                 "bfloat16 on CUDA)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op CPU threads (default: the CPUs this process may use: affinity mask, cgroup "
                        "quota); as the server's CPU workers, OpenMP waits passively and one inter-op thread runs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                   help="weight-only quantisation of the prior's linear layers while loading (default: none; int8 "
                        "on CPU and CUDA, fp8 on CUDA compute capability >= 8.9); a pre-quantised --model loads as "
                        "stored")

    m = sub.add_parser(
        "make-checkpoint", help="write a random checkpoint in the official layout",
        description="Write a checkpoint with random weights in the official layout (a text-to-image directory, or a "
        "class-conditional BitDance_*.pt with its autoencoder), for tests, benchmarks and memory plans.")
    m.add_argument("--preset", required=True, help="tiny | tiny-16x | tiny-64x | bench | 14b-64x | 14b-16x | "
                                                   "imagenet-b-1x | imagenet-b-4x | imagenet-b-16x | imagenet-l-1x | "
                                                   "imagenet-h-1x | imagenet-tiny | imagenet-tiny-1x | "
                                                   "imagenet-tiny-16x")
    m.add_argument("--output", required=True, help="directory to write")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    m.add_argument("--dtype", default=None, choices=DTYPES, help="store every file in this dtype (default: LLM "
                                                                 "bfloat16, others float32, as released)")
    m.add_argument("--max-shard-gb", type=float, default=5.0, help="LLM shard size in GiB (default 5)")
    m.add_argument("--layout", default="official", choices=("official", "diffusers"),
                   help="official (default) or diffusers (model_index.json + one folder per component, as the "
                        "converted BiliSakura/*-diffusers repositories; the same tensors as official)")

    qz = sub.add_parser("quantize", help="write a pre-quantised checkpoint directory (safetensors only)",
                        description="Quantise a text-to-image checkpoint's prior once and write it, so that "
                        "`bitdance serve --model DIR2` loads it without quantising at start-up.")
    qz.add_argument("--model", required=True, help="checkpoint directory in the official layout")
    qz.add_argument("--output", required=True, help="new directory to write (must not exist or be empty)")
    qz.add_argument("--quantize", required=True, choices=[m for m in QUANTIZE_MODES if m != "none"],
                    help="int8 (CPU and CUDA) or fp8 (CUDA compute capability >= 8.9) weight-only quantisation")
    qz.add_argument("--device", default="cpu", help="where to run the quantisation (default cpu)")

    p = sub.add_parser("plan", help="memory plan: how many concurrent requests fit on a device (no weights read)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a checkpoint preset: text-to-image (14b-64x, 14b-16x, ...) or "
                     "class-conditional (imagenet-b-4x, imagenet-h-1x, ...)")
    src.add_argument("--model", help="a checkpoint directory (only its configs and tokenizer are read)")
    p.add_argument("--gpu-memory", required=True, help="device memory: 80GiB, 141GB, 48G, or bytes")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype (default bfloat16)")
    p.add_argument("--size", default=None, help="WxH served (default: the checkpoint's default size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                   help="plan for weights quantised at load (default none; as `bitdance serve --quantize`)")
    p.add_argument("--tokenizer-routes", action="store_true",
                   help="count the AE encoder too (as `bitdance serve --tokenizer-routes`)")
    for k in plan_knobs():  # the engine knobs whose values the plan measures, as `bitdance serve` takes them
        p.add_argument(k.flag, dest=k.field, default=None, choices=k.choices, type=None if k.choices else int,
                       help=f"as `bitdance serve {k.flag}` (default {k.default}): {k.help}")

    for name, (_, _, help_text) in DELEGATES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return ap


def _generate(args: argparse.Namespace) -> int:
    output_paths(args.output, 1)  # a suffix it cannot write: refused before the model loads
    if args.threads is not None and args.threads < 1:
        raise CLIError("--threads must be at least 1")
    from .cpu_threads import apply_thread_policy

    apply_thread_policy(args.threads)  # the server's CPU policy, before torch loads (OpenMP reads it once)
    from .families import registry
    from .loading.io import CheckpointError
    from .model_path import resolve_model_path

    try:
        if args.model:  # the server's resolution: a directory holding one class-conditional .pt serves that file
            args.model = resolve_model_path(args.model)
        family = registry.for_path(args.model) if args.model else registry.FAMILIES["text_to_image"]
    except CheckpointError as e:
        raise CLIError(f"cannot load {args.model}: {e}") from e
    return run_generation(family.generate(args), args)


def _make_checkpoint(args: argparse.Namespace) -> int:
    from .families.class_conditional.random_checkpoint import CLASS_PRESETS, write_class_checkpoint
    from .families.text_to_image.random_checkpoint import PRESETS, write_checkpoint

    if getattr(args, "layout", "official") == "diffusers" and (args.preset in CLASS_PRESETS or args.preset in PRESETS):
        from .families.diffusers_checkpoints import write_diffusers_checkpoint

        out = write_diffusers_checkpoint(args.preset, args.output, seed=args.seed, dtype=args.dtype,
                                         max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"wrote {args.preset} checkpoint (seed {args.seed}, diffusers layout) to {out}")
        return 0
    if args.preset in CLASS_PRESETS:
        path = write_class_checkpoint(args.preset, args.output, seed=args.seed)
        print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {path} (+ {path.parent / 'ae_d16c32.pt'})")
        return 0
    if args.preset not in PRESETS:
        names = sorted(PRESETS) + sorted(CLASS_PRESETS)
        raise CLIError(f"unknown preset {args.preset!r}; choose one of {', '.join(names)}")
    if args.preset.startswith("14b"):
        print(f"note: preset {args.preset} writes about 37 GB; build_random_model() builds it on a device instead",
              file=sys.stderr)
    out = write_checkpoint(args.preset, args.output, seed=args.seed, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .families.text_to_image.quantized_checkpoint import write_quantized
    from .loading.io import CheckpointError

    try:
        out = write_quantized(args.model, args.output, args.quantize, device=args.device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        raise CLIError(f"cannot quantize {args.model}: {e}") from e
    print(f"wrote {args.quantize} pre-quantised checkpoint to {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from .loading.io import CheckpointError
    from .planning.memory_plan import parse_bytes, plan_dir, plan_preset

    try:
        gpu = parse_bytes(args.gpu_memory)
    except ValueError as e:
        raise CLIError(f"--gpu-memory: {e}") from e
    size = None
    if args.size is not None:
        w, x, h = args.size.lower().partition("x")
        if not (x and w.isdigit() and h.isdigit()):
            raise CLIError(f"--size {args.size!r} is not WxH (e.g. 1024x1024)")
        size = (int(h), int(w))
    from .families.text_to_image.quantized_checkpoint import stored_mode
    from .loading.quantize import fake_build

    try:
        mode = args.quantize
        if args.model is not None and mode == "none":
            mode = stored_mode(args.model)  # a pre-quantised directory is planned as it loads
        build = fake_build(mode)
        def progress(line: str) -> None:  # one line per measured step: a plan takes a while
            print(f"bitdance plan: {line}", file=sys.stderr, flush=True)

        given = {k.field: getattr(args, k.field) for k in plan_knobs() if getattr(args, k.field) is not None}
        for k in plan_knobs():
            if k.ge is not None and given.get(k.field, k.ge) < k.ge:
                raise CLIError(f"{k.flag} must be >= {k.ge}, got {given[k.field]}")
        kw = dict(build=build, progress=progress, tokenizer_routes=args.tokenizer_routes,
                  engine_config=EngineConfig(**given))
        if args.preset is not None:
            result = plan_preset(args.preset, gpu, args.dtype, size, **kw)
        else:
            result = plan_dir(args.model, gpu, args.dtype, size, **kw)
    except (CheckpointError, ValueError) as e:  # unknown preset, broken directory, size not allowed, bad dtype
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print(result.table())
    if not result.fits:
        would = "".join(f"\n  - {x}" for x in result.suggestions)
        print(f"bitdance plan: does not fit: {result.reason}" + (f"\nwhat would fit one request:{would}" if would
                                                                  else ""), file=sys.stderr)
        return 1
    return 0


def _delegate(name: str, argv: list[str]) -> int:
    import importlib

    module, func, _ = DELEGATES[name]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"`bitdance {name}` is not available: {e}") from e
    return int(fn(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
        if first is not None and argv[first] in DELEGATES:  # the delegate parses its own flags
            return _delegate(argv[first], argv[first + 1 :])
        args = _build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        if args.command == "generate":
            return _generate(args)
        if args.command == "make-checkpoint":
            return _make_checkpoint(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "plan":
            return _plan(args)
        raise CLIError(f"unknown command {args.command!r}")  # pragma: no cover (argparse rejects it first)
    except CLIError as e:
        print(f"bitdance: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
