"""Stage 1 of the demo recipe: the binary autoencoder.

The official ``BinaryAutoencoder`` (sign quantisation with a straight-through gradient), trained with L1 + L2
with the foreground (non-white) pixels weighted up, so that the colour of the small shapes matters as much as
the white background, plus an L2 on the 8x8-pooled error (the colour of each token cell). Then decoder rounds
on the fixed tokens: the encoder, hence the tokens the prior learns, no longer move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bitdance_core.demo import data as demo_data
from bitdance_core.demo.train_utils import LossLog, optimise, to_unit
from bitdance_core.models.autoencoder import BinaryAutoencoder


@dataclass
class AEConfig:
    ch: int = 32
    ch_mult: tuple[int, ...] = (2, 1, 2, 2)
    num_res_blocks: int = 1
    z_channels: int = 16
    steps: int = 600
    batch: int = 24
    lr: float = 3e-3
    fg_weight: float = 6.0
    pooled_weight: float = 2.0  # L2 on 8x8 average-pooled images: the colour of each token cell
    latent_flip: float = 0.0  # bit flips on the decoder input during training (robustness to prior errors)
    # stage 1b: the decoder alone, on the fixed tokens (the encoder, hence the prior's tokens, do not change)
    decoder_rounds: tuple[tuple[int, float], ...] = ((600, 1e-3), (800, 5e-4))  # (steps, peak lr), each cosine
    decoder_flip: float = 0.01


def ae_ddconfig(cfg: AEConfig, image_size: int) -> dict:
    return {
        "ch": cfg.ch,
        "out_ch": 3,
        "in_channels": 3,
        "num_res_blocks": cfg.num_res_blocks,
        "z_channels": cfg.z_channels,
        "ch_mult": list(cfg.ch_mult),
        "resolution": image_size,
        "double_z": False,
    }


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor, cfg: AEConfig) -> torch.Tensor:
    """(L1 + L2) with non-white pixels weighted ``1 + fg_weight``, plus L2 of the 8x8-pooled error."""
    fg = (x.min(dim=1, keepdim=True).values < 0.95).float()
    w = 1.0 + cfg.fg_weight * fg
    err = y - x
    loss = (w * (err.abs() + err.pow(2))).mean() / w.mean()
    if cfg.pooled_weight > 0:
        loss = loss + cfg.pooled_weight * F.avg_pool2d(err, 8).pow(2).mean()
    return loss


def train_autoencoder(
    images_u8: np.ndarray, cfg: AEConfig, seed: int, log: LossLog | None = None, progress: bool = True
) -> BinaryAutoencoder:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ddconfig = ae_ddconfig(cfg, images_u8.shape[1])
    ae = BinaryAutoencoder(ddconfig)
    ae.ddconfig = ddconfig
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    x_all = to_unit(images_u8)

    def step_loss() -> torch.Tensor:
        x = x_all[torch.randint(0, x_all.shape[0], (cfg.batch,), generator=gen)]
        h = ae.quantize_ste(ae.encode_continuous(x))
        if cfg.latent_flip > 0:
            flip = torch.rand(h.shape, generator=gen) < cfg.latent_flip
            h = torch.where(flip, -h.detach(), h)
        return reconstruction_loss(ae.decode(h), x, cfg)

    optimise("ae", opt, list(ae.parameters()), cfg.steps, cfg.lr, 50, step_loss, log, progress)
    return ae.eval()


def finetune_decoder(
    ae: BinaryAutoencoder,
    latents: torch.Tensor,
    images_u8: np.ndarray,
    cfg: AEConfig,
    seed: int,
    log: LossLog | None = None,
    progress: bool = True,
    steps: int = 600,
    lr: float = 1e-3,
) -> BinaryAutoencoder:
    """Train the decoder further on precomputed tokens (cheap: no encoder), with light bit-flip noise."""
    gen = torch.Generator().manual_seed(seed + 2)
    params = list(ae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    x_all = to_unit(images_u8)

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, x_all.shape[0], (cfg.batch,), generator=gen)
        z = latents[idx].float()
        if cfg.decoder_flip > 0:
            z = torch.where(torch.rand(z.shape, generator=gen) < cfg.decoder_flip, -z, z)
        return reconstruction_loss(ae.decode(z), x_all[idx], cfg)

    ae.train()
    optimise("decoder", opt, params, steps, lr, 20, step_loss, log, progress)
    return ae.eval()


@torch.no_grad()
def encode_tokens(ae: BinaryAutoencoder, images_u8: np.ndarray, batch: int = 128) -> torch.Tensor:
    """uint8 images -> int8 ±1 latents (n, C, h, w)."""
    out = []
    for i in range(0, len(images_u8), batch):
        out.append(ae.encode(to_unit(images_u8[i : i + batch])).to(torch.int8))
    return torch.cat(out)


@torch.no_grad()
def decode_tokens(ae: BinaryAutoencoder, latents: torch.Tensor) -> np.ndarray:
    img = ae.decode(latents.float())
    return (127.5 * img + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_autoencoder(ckpt_dir: str | Path, ae: BinaryAutoencoder) -> None:
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "ae_config.json").write_text(json.dumps({"ddconfig": ae.ddconfig, "gan_decoder": False}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in ae.state_dict().items()}, str(d / "ae.safetensors"))


def autoencoder_recon_score(ae: BinaryAutoencoder, seed: int, n: int = 150) -> dict:
    """Detector scores of AE reconstructions of fresh scenes (an upper bound for generation)."""
    from bitdance_core.demo.score import score

    images, _, scenes = demo_data.make_dataset(n, seed + 7919)
    rec = decode_tokens(ae, encode_tokens(ae, images))
    res = [score(im, sc) for im, sc in zip(rec, scenes)]
    return {
        "color": round(float(np.mean([r.color for r in res])), 3),
        "shape": round(float(np.mean([r.shape for r in res])), 3),
        "all": round(float(np.mean([r.all for r in res])), 3),
        "l1": round(float(np.abs(rec.astype(np.float32) - images).mean()), 3),
    }


def load_autoencoder(ckpt_dir: str | Path) -> BinaryAutoencoder:
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    conf = json.loads((d / "ae_config.json").read_text())
    ae = BinaryAutoencoder(conf["ddconfig"], gan_decoder=conf.get("gan_decoder", False))
    ae.ddconfig = conf["ddconfig"]
    ae.load_state_dict({k: v.float() for k, v in load_file(str(d / "ae.safetensors")).items()})
    return ae.eval()
