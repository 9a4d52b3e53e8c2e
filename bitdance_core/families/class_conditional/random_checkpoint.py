"""Random class-conditional checkpoints in the released format (``bitdance make-checkpoint --preset imagenet-*``).

Writes ``BitDance_{B,L,H}_{1,4,16}x.pt`` = ``torch.save({"model": state_dict, "args": Namespace, "epochs": 0})``
(the state dict holds the whole model, autoencoder included as ``vae.*``, as ``train*.py`` saves it, so
``load_state_dict(strict=True)`` of the official code accepts it) and ``ae_d16c32.pt`` = ``{"state_dict": ...}``
(what ``load_vae_weight`` reads). ``args`` carries the official ``get_model_args()`` names; the tiny presets add
their preset sizes (``dim``, ``n_layer``, ``n_head``, ``diff_*``), which the official ``create_model`` ignores and
our resolver honours, since no official preset describes them.

Weights: one seeded CPU generator in state-dict order, the text-to-image builders' distribution
(``bitdance_core.families.text_to_image.random_checkpoint``:
matrices ~ N(0, 1/sqrt(fan_in)), norm scales 1, biases ~ N(0, 0.02)).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ...device import resolve
from ...models.autoencoder import BinaryAutoencoder
from ...models.random_init import random_tensor
from .config import PRESETS, RELEASED_DDCONFIG, ClassModelConfig
from .heads import ClassHead
from .loader import LoadedClassModel, build_modules
from .transformer import ClassTransformer

logger = logging.getLogger(__name__)

TINY_DDCONFIG = {"double_z": False, "z_channels": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 1, 1, 1, 2], "num_res_blocks": 2}
TINY = {"dim": 64, "n_layer": 2, "n_head": 4, "diff_layers": 2, "diff_dim": 64, "diff_adanln_layers": 2}


@dataclass(frozen=True)
class ClassPreset:
    file_name: str
    model: str  # the official ``--model`` name (a preset of BitDance_models, or a tiny one)
    sizes: dict
    parallel_num: int
    cls_token_num: int = 64
    ddconfig: dict | None = None

    def config(self) -> ClassModelConfig:
        return ClassModelConfig(name=Path(self.file_name).stem, parallel_num=self.parallel_num,
                                cls_token_num=self.cls_token_num, vae_ddconfig=dict(self.ddconfig or RELEASED_DDCONFIG),
                                **self.sizes)


CLASS_PRESETS: dict[str, ClassPreset] = {
    "imagenet-b-1x": ClassPreset("BitDance_B_1x.pt", "BitDance-B", PRESETS["B"], 1),
    "imagenet-b-4x": ClassPreset("BitDance_B_4x.pt", "BitDance-B", PRESETS["B"], 4),
    "imagenet-b-16x": ClassPreset("BitDance_B_16x.pt", "BitDance-B", PRESETS["B"], 16),
    "imagenet-l-1x": ClassPreset("BitDance_L_1x.pt", "BitDance-L", PRESETS["L"], 1),
    "imagenet-h-1x": ClassPreset("BitDance_H_1x.pt", "BitDance-H", PRESETS["H"], 1),
    "imagenet-tiny": ClassPreset("BitDance_tiny_4x.pt", "BitDance-Tiny", TINY, 4, 4, TINY_DDCONFIG),
    "imagenet-tiny-1x": ClassPreset("BitDance_tiny_1x.pt", "BitDance-Tiny", TINY, 1, 4, TINY_DDCONFIG),
    "imagenet-tiny-16x": ClassPreset("BitDance_tiny_16x.pt", "BitDance-Tiny", TINY, 16, 4, TINY_DDCONFIG),
}


def official_args(p: ClassPreset) -> argparse.Namespace:
    """The namespace ``get_model_args()`` (+ the sampler's flags) would hold for this preset."""
    cfg = p.config()
    a = dict(model=p.model, image_size=cfg.image_size, down_size=cfg.down_size, patch_size=cfg.patch_size,
             num_classes=cfg.num_classes, cls_token_num=cfg.cls_token_num, latent_dim=cfg.latent_dim,
             diff_batch_mul=4, grad_checkpointing=False, trained_vae="ae_d16c32.pt", drop_rate=0.0,
             perturb_schedule="constant", perturb_rate=0.0, perturb_rate_max=0.3, time_schedule="logit_normal",
             time_shift=cfg.time_shift, P_std=0.8, P_mean=-0.8)
    if p.parallel_num > 1:
        a.update(parallel_num=p.parallel_num, parallel_mode=cfg.parallel_mode)
    if p.model not in ("BitDance-B", "BitDance-L", "BitDance-H"):
        a.update(p.sizes)
    return argparse.Namespace(**a)


def random_state(p: ClassPreset, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model state dict with ``vae.*``, autoencoder state dict): random float32 CPU tensors."""
    cfg = p.config()
    with torch.device("meta"):
        transformer = ClassTransformer(cfg)
        head = ClassHead(cfg.latent_dim, cfg.dim, cfg.diff_dim, cfg.diff_layers, cfg.diff_adanln_layers,
                         parallel=cfg.parallel_num > 1)
        ae = BinaryAutoencoder(dict(cfg.vae_ddconfig), with_encoder=True)
    gen = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    state: dict[str, torch.Tensor] = {}
    vae: dict[str, torch.Tensor] = {}
    for prefix, module, out in (("", transformer, state), ("head.", head, state), ("", ae, vae)):
        for k, v in module.state_dict(keep_vars=True).items():
            out[prefix + k] = random_tensor(k, tuple(v.shape), False, gen, torch.float32, cpu)
    state.update({f"vae.{k}": v for k, v in vae.items()})
    return state, vae


def write_class_checkpoint(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``<file_name>`` and ``ae_d16c32.pt`` into ``out_dir``; returns the checkpoint's path."""
    if preset not in CLASS_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(CLASS_PRESETS)}")
    p = CLASS_PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, vae = random_state(p, seed)
    path = out / p.file_name
    torch.save({"model": state, "args": official_args(p), "epochs": 0}, path)
    torch.save({"state_dict": vae}, out / "ae_d16c32.pt")
    logger.info("random %s checkpoint (seed %d): %s + ae_d16c32.pt", preset, seed, path)
    return path


def build_random_class_model(preset: str, device: str | None = None, dtype: str | None = None, seed: int = 0):
    """A ``LoadedClassModel`` with random weights built in memory (no file; the autoencoder without its encoder,
    as the loader keeps it), for benchmarks at the released shapes. Same distribution as the written files."""
    p = CLASS_PRESETS[preset]
    cfg = p.config()
    placement = resolve(device, dtype)
    gen = torch.Generator(device=placement.device).manual_seed(seed)
    modules = build_modules(cfg)
    for m in modules:
        state = {k: random_tensor(k, tuple(v.shape), False, gen, placement.dtype, placement.device)
                 for k, v in m.state_dict(keep_vars=True).items()}
        m.load_state_dict(state, strict=True, assign=True)
        m.eval().requires_grad_(False)
    return LoadedClassModel(cfg, placement, *modules, path=f"<random {preset}>", weights="model", vae_path=None)
