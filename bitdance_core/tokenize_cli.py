"""``bitdance tokenize IMAGE --output tokens.npz`` and ``bitdance detokenize tokens.npz --output x.png``.

``--model`` (default: the embedded demo model) is what ``bitdance serve --model`` takes: a checkpoint directory
(only its autoencoder is read; sizes and token order are the served model's), a class-conditional ``.pt``,
or a lone autoencoder file (``*.safetensors`` with its config, ``ae*.pt``). The ``.npz`` holds ``tokens``
(packed bits, uint8, as ``return_tokens``), ``token_shape``, ``width``, ``height`` and ``patch_size``; the same
conventions and checks as ``POST /v1/tokenize`` / ``/v1/detokenize`` (``bitdance_core.tokenize``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .tokenize import RESIZE_MODES, TokenizeError, load_rgb, pack_bits, plan_resize, probe_image, unpack_bits


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="checkpoint directory, class-conditional .pt, or a lone "
                    "autoencoder file (default: the embedded demo model)")
    ap.add_argument("--ae-config", default=None, help="a lone autoencoder file's JSON config (default: beside it)")
    ap.add_argument("--vae", default=None, help="class-conditional .pt models: the autoencoder file")
    ap.add_argument("--model-args", default=None, help="class-conditional .pt models: architecture JSON")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", help="float32 (default: exact tokens), bfloat16, float16")
    ap.add_argument("--patch-size", type=int, default=None, help="token order (default: the model's)")


def load_tokenizer(args: argparse.Namespace):
    from . import default_model_dir
    from .image_tokenizer import ImageTokenizer
    from .tokenize import is_autoencoder_file

    model = args.model or default_model_dir()
    if is_autoencoder_file(model):
        return ImageTokenizer.from_file(model, args.ae_config, args.device, args.dtype)
    if Path(model).is_file():  # a class-conditional checkpoint
        from .families.class_conditional.loader import load_class_model

        m = load_class_model(model, args.device, args.dtype, vae=args.vae, model_args=args.model_args)
        return ImageTokenizer.for_model(m, (tuple(m.config.size),))
    from .engine.serving_config import ServingConfig
    from .families.text_to_image.config import ModelConfig
    from .tokenize import TokenizerSpec

    cfg = ModelConfig.from_dir(Path(model))
    sizes = tuple(tuple(s) for s in ServingConfig.for_model(cfg).size_policy(cfg).allowed())
    tok = ImageTokenizer.from_file(Path(model) / "ae.safetensors", Path(model) / "ae_config.json", args.device,
                                   args.dtype)
    tok.spec = TokenizerSpec(tok.spec.downsample, tok.spec.z_channels, cfg.patch_side, sizes,
                             gan_decoder=tok.spec.gan_decoder)
    tok.name = cfg.name
    return tok


def tokenize_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bitdance tokenize", description="An image (PNG, JPEG, WebP) -> its binary "
                                 "tokens in a .npz (packed as return_tokens).")
    ap.add_argument("image", help="the image file")
    ap.add_argument("--output", "-o", required=True, help="the .npz to write")
    ap.add_argument("--resize", default="refuse", choices=RESIZE_MODES,
                    help="an image of a size the model does not take: refuse (default), fit or crop")
    _common(ap)
    args = ap.parse_args(argv)
    data = Path(args.image).read_bytes()
    tok = load_tokenizer(args)
    try:
        ps = tok.spec.check_patch_size(args.patch_size)
        fmt, width, height = probe_image(data)
        th, tw = plan_resize(tok.spec, width, height, args.resize, ps)
    except TokenizeError as e:
        print(f"bitdance tokenize: error: {e.field}: {e}" + (f" (allowed: {e.allowed})" if e.allowed else ""),
              file=sys.stderr)
        return 2
    tokens = tok.tokenize(load_rgb(data, th, tw, args.resize), ps)
    np.savez(args.output, tokens=np.frombuffer(pack_bits(tokens), np.uint8), token_shape=np.array(tokens.shape),
             width=tw, height=th, patch_size=ps)
    print(json.dumps({"output": args.output, "token_shape": list(tokens.shape), "width": tw, "height": th,
                      "patch_size": ps, "resized": (th, tw) != (height, width), "model": tok.name}))
    return 0


def detokenize_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bitdance detokenize", description="Binary tokens (.npz from `bitdance "
                                 "tokenize`) -> the decoded PNG.")
    ap.add_argument("tokens", help="the .npz (tokens, token_shape, width, height, patch_size)")
    ap.add_argument("--output", "-o", required=True, help="the PNG to write")
    _common(ap)
    args = ap.parse_args(argv)
    with np.load(args.tokens) as z:
        missing = sorted({"tokens", "token_shape", "width", "height"} - set(z.files))
        if missing:
            print(f"bitdance detokenize: error: {args.tokens} lacks {missing}", file=sys.stderr)
            return 2
        data, shape = z["tokens"].astype(np.uint8).tobytes(), [int(v) for v in z["token_shape"]]
        width, height = int(z["width"]), int(z["height"])
        stored_ps = int(z["patch_size"]) if "patch_size" in z.files else None
    tok = load_tokenizer(args)
    try:
        ps = tok.spec.check_patch_size(args.patch_size or stored_ps)
        tok.spec.check_size(height, width, "size", ps)
        n, c = tok.spec.check_tokens(data, shape, height, width)
    except TokenizeError as e:
        print(f"bitdance detokenize: error: {e.field}: {e}", file=sys.stderr)
        return 2
    from PIL import Image

    Image.fromarray(tok.detokenize(unpack_bits(data, n, c), height, width, ps)).save(args.output, format="PNG")
    print(json.dumps({"output": args.output, "width": width, "height": height, "model": tok.name}))
    return 0
