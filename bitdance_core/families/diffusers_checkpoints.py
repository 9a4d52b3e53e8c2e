"""Random checkpoints in the diffusers layout (``bitdance make-checkpoint --layout diffusers``).

The official-layout writers run first (same preset, same seed: the same random tensors); their files are then
rearranged as ``scripts/convert_bitdance_to_diffusers.py`` (Bili-Sakura/BitDance) arranges a converted model:
tensor keys unchanged, configs with diffusers' ``_class_name`` / ``_diffusers_version``. A diffusers directory
and its official-layout twin therefore hold bit-identical weights. See ``diffusers_layout.py`` for the layout.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from .text_to_image.config import ModelConfig

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.36.0"  # what the published conversions record
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja")


def _dump(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def official_to_diffusers(src: str | Path, out: str | Path) -> Path:
    """Rearrange an official-layout text-to-image directory ``src`` into the diffusers layout at ``out``."""
    from ..resolutions import OFFICIAL_SIZES

    src, out = Path(src), Path(out)
    config = ModelConfig.from_dir(src)
    out.mkdir(parents=True, exist_ok=True)
    _dump(out / "model_index.json", {
        "_class_name": "BitDanceDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "autoencoder": ["bitdance_diffusers", "BitDanceAutoencoder"],
        "diffusion_head": ["bitdance_diffusers", "BitDanceDiffusionHead"],
        "projector": ["bitdance_diffusers", "BitDanceProjector"],
        "supported_image_sizes": [list(s) for s in OFFICIAL_SIZES],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    })
    te = out / "text_encoder"
    te.mkdir(exist_ok=True)
    for f in sorted(src.glob("model*.safetensors*")) + [src / "config.json", src / "generation_config.json"]:
        if f.is_file():
            shutil.copyfile(f, te / f.name)
    tok = out / "tokenizer"
    tok.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tok / name)
    meta = {"_diffusers_version": DIFFUSERS_VERSION}
    ae = json.loads((src / "ae_config.json").read_text())
    parts = {
        "autoencoder": ("ae.safetensors", {"_class_name": "BitDanceAutoencoder", **meta, "ddconfig": ae["ddconfig"],
                                           "gan_decoder": bool(ae.get("gan_decoder", False))}),
        "diffusion_head": ("vision_head.safetensors", {"_class_name": "BitDanceDiffusionHead", **meta,
                                                       **json.loads((src / "vision_head_config.json").read_text())}),
        "projector": ("projector.safetensors", {"_class_name": "BitDanceProjector", **meta,
                                                "in_dim": config.z_channels, "out_dim": config.llm.hidden_size,
                                                "hidden_act": "gelu_pytorch_tanh"}),
    }
    for folder, (weights, doc) in parts.items():
        _dump(out / folder / "config.json", doc)
        shutil.copyfile(src / weights, out / folder / "diffusion_pytorch_model.safetensors")
    return out


def class_to_diffusers(ckpt: str | Path, out: str | Path, preset: str | None = None) -> Path:
    """Rearrange a class-conditional ``BitDance_*.pt`` (+ ``ae_d16c32.pt`` beside it, as written by
    ``write_class_checkpoint``) into one ``BitDance-ImageNet-diffusers`` model folder at ``out``."""
    from safetensors.torch import save_file

    from .class_conditional.loader import RELEASED_VAE, load_pickle
    from .class_conditional.random_checkpoint import CLASS_PRESETS, official_args

    ckpt, out = Path(ckpt), Path(out)
    obj = load_pickle(ckpt)
    key = "ema" if isinstance(obj.get("ema"), dict) else "model"
    state = {k: v.contiguous() for k, v in obj[key].items() if not k.startswith("vae.")}
    vae = load_pickle(ckpt.parent / RELEASED_VAE)["state_dict"]
    args = vars(obj["args"]) if preset is None else vars(official_args(CLASS_PRESETS[preset]))
    pn = int(args.get("parallel_num", 1))
    cfg = {"_class_name": "BitDanceImageNetTransformer", "_diffusers_version": DIFFUSERS_VERSION,
           "architecture": args["model"], "parallel_num": pn, "resolution": args["image_size"],
           "down_size": args["down_size"], "latent_dim": args["latent_dim"], "num_classes": args["num_classes"],
           "source_checkpoint": ckpt.name, "source_key": key,
           "runtime_impl": "model_parallel.py" if pn > 1 else "model.py",
           "parallel_mode": args.get("parallel_mode", "patch"), "time_schedule": args.get("time_schedule",
                                                                                          "logit_normal"),
           "time_shift": float(args.get("time_shift", 1.0)), "p_std": args.get("P_std", 1.0),
           "p_mean": args.get("P_mean", 0.0)}
    if args["model"] not in ("BitDance-B", "BitDance-L", "BitDance-H"):  # a custom size: say it (ours, not official)
        cfg.update({k: args[k] for k in ("dim", "n_layer", "n_head", "diff_layers", "diff_dim", "diff_adanln_layers")})
        cfg["cls_token_num"] = args["cls_token_num"]
    _dump(out / "model_index.json", {
        "_class_name": ["pipeline_bitdance_imagenet", "BitDanceImageNetPipeline"],
        "_diffusers_version": DIFFUSERS_VERSION, "transformer": ["modeling_transformer", "BitDanceImageNetTransformer"],
    })
    _dump(out / "transformer" / "config.json", cfg)
    save_file(state, str(out / "transformer" / "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    ddconfig = _ddconfig(preset, vae)
    _dump(out / "autoencoder" / "config.json", {"_class_name": "BitDanceImageNetAutoencoder",
                                                "_diffusers_version": DIFFUSERS_VERSION, "ddconfig": ddconfig,
                                                "source_checkpoint": RELEASED_VAE, "num_codebooks": 4})
    save_file({k: v.contiguous() for k, v in vae.items()},
              str(out / "autoencoder" / "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    return out


def _ddconfig(preset: str | None, vae) -> dict:
    from .class_conditional.config import RELEASED_DDCONFIG
    from .class_conditional.loader import RELEASED_VAE
    from .class_conditional.random_checkpoint import CLASS_PRESETS
    from .class_conditional.resolve import ddconfig_from_shapes

    if preset is not None:
        return dict(CLASS_PRESETS[preset].ddconfig or RELEASED_DDCONFIG)
    return ddconfig_from_shapes(vae, RELEASED_VAE)


def write_diffusers_checkpoint(preset: str, out_dir: str | Path, seed: int = 0, dtype: str | None = None, *,
                               max_shard_bytes: int | None = None) -> Path:
    """Write a random checkpoint of ``preset`` in the diffusers layout to ``out_dir`` (a text-to-image directory,
    or one class-conditional model folder); the same tensors as the official-layout writer with the same seed."""
    from .class_conditional.random_checkpoint import CLASS_PRESETS, write_class_checkpoint
    from .text_to_image.random_checkpoint import DEFAULT_SHARD_BYTES, write_checkpoint

    with tempfile.TemporaryDirectory(prefix="bitdance-diffusers-") as tmp:
        if preset in CLASS_PRESETS:
            ckpt = write_class_checkpoint(preset, tmp, seed=seed)
            out = class_to_diffusers(ckpt, out_dir, preset)
        else:
            write_checkpoint(preset, tmp, seed=seed, dtype=dtype,
                             max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
            out = official_to_diffusers(tmp, out_dir)
    logger.info("random %s checkpoint (seed %d) written in the diffusers layout to %s", preset, seed, out)
    return out
