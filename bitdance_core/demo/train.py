"""Training recipe of the embedded demo model (``bitdance train-demo``).

Two stages, on CPU, reproducible from one seed:

1. **Binary autoencoder** (the official ``BinaryAutoencoder``: sign quantisation with a straight-through
   gradient). Loss: L1 + L2 with the foreground (non-white) pixels weighted up, so that the colour of the small
   shapes matters as much as the white background.
2. **Prior + head + projector**, jointly, with the official objective (spec §5.6, §6.4): the image tokens are
   precomputed once with the trained encoder; a tiny Qwen3 reads ``prompt + [<|vision_start|>, <|res_h|>,
   <|res_w|>, <|query_1..P-1|>] + projector(tokens) + PE`` under the block-causal mask (blocks of P tokens see
   each other); the hidden states of each block (+ PE) condition the diffusion head, trained by x-prediction
   flow matching with logit-normal t and the v-loss ``(v* - v)^2`` with ``max(1 - t, 0.05)``. Captions are
   dropped to the unconditional prompt with probability 0.1 (this trains guidance) and the teacher-forced
   input tokens get the official bit-flip perturbation.

The result is a checkpoint directory in the official layout (config.json + model.safetensors, tokenizer
files, ae_config.json + ae.safetensors, vision_head_config.json + vision_head.safetensors,
projector.safetensors), loadable by the project's loader like any released BitDance checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from bitdance_core.demo import data as demo_data
from bitdance_core.models.autoencoder import BinaryAutoencoder
from bitdance_core.models.diffusion_head import DiffusionHead
from bitdance_core.models.projector import Projector, patchify, pos2d_table
from bitdance_core.tokenizer_build import build_tokenizer

logger = logging.getLogger(__name__)

COND_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
UNCOND_TEXT = "<|im_start|>assistant\n"


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


@dataclass
class PriorConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 704
    head_width: int = 128
    head_depth: int = 2
    head_adaln: int = 1
    use_swiglu: bool = True
    parallel_num: int = 4
    steps: int = 1500
    batch: int = 32
    lr: float = 1.5e-3
    diff_batch_mul: int = 4
    caption_dropout: float = 0.1
    vision_perturb: float = 0.1
    p_mean: float = -0.8
    p_std: float = 0.8


@dataclass
class RecipeConfig:
    seed: int = 0
    num_images: int = 12000
    image_size: int = 64
    threads: int = 2
    ae: AEConfig = field(default_factory=AEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    bpe_vocab_size: int = 320
    max_res: int = 256


# --------------------------------------------------------------------------------------------- helpers


def _lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _to_unit(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _LossLog:
    def __init__(self, path: Path | None):
        self.fh = open(path, "a") if path is not None else None  # noqa: SIM115

    def write(self, **row) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


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


# --------------------------------------------------------------------------------------- autoencoder


def train_autoencoder(
    images_u8: np.ndarray, cfg: AEConfig, seed: int, log: _LossLog | None = None, progress: bool = True
) -> BinaryAutoencoder:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ae = BinaryAutoencoder(ae_ddconfig(cfg, images_u8.shape[1]))
    ae.ddconfig = ae_ddconfig(cfg, images_u8.shape[1])
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    x_all = _to_unit(images_u8)
    n = x_all.shape[0]
    bar = tqdm(range(cfg.steps), desc="autoencoder", disable=not progress, mininterval=5)
    ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.lr)
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        x = x_all[idx]
        # random flips keep the shapes' vocabulary (triangles point up: horizontal flip only)
        h = ae.quantize_ste(ae.encode_continuous(x))
        if cfg.latent_flip > 0:
            flip = torch.rand(h.shape, generator=gen) < cfg.latent_flip
            h = torch.where(flip, -h.detach(), h)
        y = ae.decode(h)
        fg = (x.min(dim=1, keepdim=True).values < 0.95).float()
        w = 1.0 + cfg.fg_weight * fg
        err = y - x
        loss = (w * (err.abs() + err.pow(2))).mean() / w.mean()
        if cfg.pooled_weight > 0:
            pooled = F.avg_pool2d(err, 8)
            loss = loss + cfg.pooled_weight * pooled.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if log is not None and (step % 10 == 0 or step == cfg.steps - 1):
            log.write(stage="ae", step=step, loss=round(loss.item(), 5), ema=round(ema, 5), t=time.time())
    ae.eval()
    return ae


def finetune_decoder(
    ae: BinaryAutoencoder,
    latents: torch.Tensor,
    images_u8: np.ndarray,
    cfg: AEConfig,
    seed: int,
    log: _LossLog | None = None,
    progress: bool = True,
    steps: int = 600,
    lr: float = 1e-3,
) -> BinaryAutoencoder:
    """Train the decoder further on precomputed tokens (cheap: no encoder), with light bit-flip noise."""
    gen = torch.Generator().manual_seed(seed + 2)
    params = list(ae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    x_all = _to_unit(images_u8)
    n = x_all.shape[0]
    ae.train()
    bar = tqdm(range(steps), desc="decoder", disable=not progress, mininterval=5)
    ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=20)
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        x = x_all[idx]
        z = latents[idx].float()
        if cfg.decoder_flip > 0:
            z = torch.where(torch.rand(z.shape, generator=gen) < cfg.decoder_flip, -z, z)
        y = ae.decode(z)
        fg = (x.min(dim=1, keepdim=True).values < 0.95).float()
        w = 1.0 + cfg.fg_weight * fg
        err = y - x
        loss = (w * (err.abs() + err.pow(2))).mean() / w.mean()
        if cfg.pooled_weight > 0:
            loss = loss + cfg.pooled_weight * F.avg_pool2d(err, 8).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log.write(stage="decoder", step=step, loss=round(loss.item(), 5), ema=round(ema, 5), t=time.time())
    ae.eval()
    return ae


@torch.no_grad()
def encode_tokens(ae: BinaryAutoencoder, images_u8: np.ndarray, batch: int = 128) -> torch.Tensor:
    """uint8 images -> int8 ±1 latents (n, C, h, w)."""
    out = []
    for i in range(0, len(images_u8), batch):
        out.append(ae.encode(_to_unit(images_u8[i : i + batch])).to(torch.int8))
    return torch.cat(out)


@torch.no_grad()
def decode_tokens(ae: BinaryAutoencoder, latents: torch.Tensor) -> np.ndarray:
    img = ae.decode(latents.float())
    return (127.5 * img + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# -------------------------------------------------------------------------------------------- prior


def build_prior(cfg: PriorConfig, vocab_size: int, max_positions: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qcfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_bias=False,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(qcfg)


def head_config(cfg: PriorConfig, z_channels: int) -> dict:
    return {
        "ch_target": z_channels,
        "ch_cond": cfg.hidden,
        "ch_latent": cfg.head_width,
        "depth_latent": cfg.head_depth,
        "depth_adanln": cfg.head_adaln,
        "time_shift": 1.0,
        "time_schedule": "logit_normal",
        "P_mean": cfg.p_mean,
        "P_std": cfg.p_std,
        "parallel_num": cfg.parallel_num,
        "diff_batch_mul": cfg.diff_batch_mul,
        "use_swiglu": cfg.use_swiglu,
    }


def block_mask(lengths: torch.Tensor, seq: int, image_len: int, p: int) -> torch.Tensor:
    """(B, 1, seq, seq) bool mask (True = may attend) for left-padded rows.

    Row b holds ``seq - lengths[b]`` pads, then its prompt, then the image segment of ``image_len`` tokens
    (``<|vision_start|>``, ``<|res_h|>``, then blocks of ``p``). Causal everywhere, plus full attention inside
    each block of the image segment from local index 2 on (spec §6.4). Pads only see themselves.
    """
    i = torch.arange(seq)
    causal = i[:, None] >= i[None, :]
    local = i - (seq - image_len)
    blk = torch.where(local >= 2, (local - 2) // p, -1 - i)  # unique negatives outside
    same_block = blk[:, None] == blk[None, :]
    base = causal | same_block
    pad = i[None, :] < (seq - lengths)[:, None]  # (B, seq) True where padding
    m = base[None] & ~pad[:, None, :] & ~pad[:, :, None]
    m = m | torch.eye(seq, dtype=torch.bool)[None]
    return m[:, None]


class DemoPriorTrainer:
    """Holds the prior, head, projector and the fixed tensors needed for the training forward."""

    def __init__(self, cfg: PriorConfig, tokenizer, z_channels: int, grid: int, seed: int):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.tok = tokenizer
        self.p = cfg.parallel_num
        self.ps = int(round(math.sqrt(self.p)))
        if self.ps * self.ps != self.p or grid % self.ps:
            raise ValueError(f"parallel_num {self.p} does not tile a {grid}x{grid} grid")
        self.grid = grid
        self.n_tokens = grid * grid
        self.steps_ar = self.n_tokens // self.p
        self.c = z_channels
        prefix = ["<|vision_start|>", f"<|res_{grid}|>", f"<|res_{grid}|>"]
        prefix += [f"<|query_{i}|>" for i in range(1, self.p)]
        self.prefix_ids = tokenizer.convert_tokens_to_ids(prefix)
        self.uncond_ids = tokenizer.encode(UNCOND_TEXT)
        self.llm = build_prior(cfg, len(tokenizer), max_positions=512)
        self.head = DiffusionHead(**head_config(cfg, z_channels))
        self.projector = Projector(z_channels, cfg.hidden)
        self.pe = pos2d_table(grid, grid, self.ps, cfg.hidden)  # (N, D) fp32
        self._cache: dict[str, list[int]] = {}

    def load_weights(self, ckpt_dir: str | Path) -> None:
        """Start from the prior/head/projector of a checkpoint directory (upcast to float32)."""
        from safetensors.torch import load_file

        d = Path(ckpt_dir)
        for module, name in ((self.llm, "model"), (self.head, "vision_head"), (self.projector, "projector")):
            sd = load_file(str(d / f"{name}.safetensors"))
            module.load_state_dict({k: v.float() for k, v in sd.items()})

    def parameters(self):
        yield from self.llm.model.parameters()  # lm_head is unused (no text loss)
        yield from self.head.parameters()
        yield from self.projector.parameters()

    def prompt_ids(self, caption: str) -> list[int]:
        if caption not in self._cache:
            self._cache[caption] = self.tok.encode(COND_TEMPLATE.format(prompt=caption))
        return self._cache[caption]

    def loss(self, captions: list[str], latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """latents: (B, C, h, w) ±1. Returns the mean v-loss over rows (blocks) and tokens."""
        cfg = self.cfg
        b = latents.shape[0]
        p, n, t_ar = self.p, self.n_tokens, self.steps_ar
        tokens = patchify(latents.float().permute(2, 3, 0, 1), self.ps).permute(1, 0, 2)  # (B, N, C)
        drop = torch.rand(b, generator=gen) < cfg.caption_dropout
        prompts = [self.uncond_ids if d else self.prompt_ids(c) for c, d in zip(captions, drop.tolist())]
        lengths = torch.tensor([len(q) for q in prompts])
        lmax = int(lengths.max())
        pad_id = self.tok.pad_token_id or 0
        ids = torch.full((b, lmax + len(self.prefix_ids)), pad_id, dtype=torch.long)
        for r, q in enumerate(prompts):
            ids[r, lmax - len(q) : lmax] = torch.tensor(q)
        ids[:, lmax:] = torch.tensor(self.prefix_ids)
        embed = self.llm.model.embed_tokens(ids)
        # teacher forcing: image blocks 0..T-2 feed the prediction of blocks 1..T-1
        inp = tokens[:, : n - p]
        if cfg.vision_perturb > 0:  # official flip: u1 < p_max * u2  (expected rate p_max / 2)
            u1 = torch.rand(inp.shape, generator=gen)
            u2 = torch.rand(inp.shape, generator=gen)
            inp = torch.where(u1 < cfg.vision_perturb * u2, -inp, inp)
        img_emb = self.projector(inp) + self.pe[: n - p]
        x = torch.cat([embed, img_emb], dim=1)
        seq = x.shape[1]
        image_len = len(self.prefix_ids) + (n - p)
        mask = block_mask(lengths + image_len, seq, image_len, p)
        pos = (torch.arange(seq)[None] - (seq - (lengths + image_len))[:, None]).clamp_min(0)
        hid = self.llm.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
        hid = hid.last_hidden_state[:, -n:]  # predictors of blocks 0..T-1: res_w/queries, then blocks
        cond = (hid + self.pe).reshape(b * t_ar, p, -1)
        target = tokens.reshape(b * t_ar, p, self.c)
        m = cfg.diff_batch_mul
        cond = cond.repeat(m, 1, 1)
        target = target.repeat(m, 1, 1)
        rows = cond.shape[0]
        t = torch.sigmoid(torch.randn(rows, generator=gen) * cfg.p_std + cfg.p_mean)
        eps = torch.randn(target.shape, generator=gen)
        tt = t[:, None, None]
        z = (1 - tt) * eps + tt * target
        denom = (1 - tt).clamp_min(0.05)
        v_star = (target - z) / denom
        x_hat = self.head(z, t, cond)
        v_hat = (x_hat - z) / denom
        return (v_star - v_hat).pow(2).mean()


def train_prior(
    trainer: DemoPriorTrainer,
    captions: list[str],
    latents: torch.Tensor,
    seed: int,
    log: _LossLog | None = None,
    progress: bool = True,
    stage: str = "prior",
) -> None:
    cfg = trainer.cfg
    gen = torch.Generator().manual_seed(seed + 1)
    params = list(trainer.parameters())
    decay = [q for q in params if q.ndim >= 2]
    no_decay = [q for q in params if q.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    n = latents.shape[0]
    bar = tqdm(range(cfg.steps), desc=stage, disable=not progress, mininterval=5)
    ema = None
    trainer.llm.train()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.lr, warmup=100)
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        loss = trainer.loss([captions[i] for i in idx.tolist()], latents[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.97 * ema + 0.03 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if log is not None and (step % 10 == 0 or step == cfg.steps - 1):
            log.write(stage=stage, step=step, loss=round(loss.item(), 5), ema=round(ema, 5), t=time.time())
    trainer.llm.eval()


# --------------------------------------------------------------------------------------------- saving


def _half(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def save_checkpoint(
    out_dir: Path,
    tok_dir: Path,
    ae: BinaryAutoencoder,
    ddconfig: dict,
    trainer: DemoPriorTrainer,
    dtype=torch.bfloat16,
) -> None:
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if tok_dir != out_dir:
            shutil.copyfile(tok_dir / name, out_dir / name)
    (out_dir / "ae_config.json").write_text(json.dumps({"ddconfig": ddconfig, "gan_decoder": False}, indent=2))
    save_file(_half(ae.state_dict(), dtype), str(out_dir / "ae.safetensors"))
    (out_dir / "vision_head_config.json").write_text(
        json.dumps(head_config(trainer.cfg, trainer.c), indent=2)
    )
    save_file(_half(trainer.head.state_dict(), dtype), str(out_dir / "vision_head.safetensors"))
    save_file(_half(trainer.projector.state_dict(), dtype), str(out_dir / "projector.safetensors"))
    llm = trainer.llm
    llm.config.torch_dtype = dtype
    llm.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
    llm.float()
    gc = out_dir / "generation_config.json"
    if gc.exists():
        gc.unlink()


# ------------------------------------------------------------------------------------------- recipe


def train_demo(
    out_dir: str | Path,
    seed: int = 0,
    config: RecipeConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    ae: BinaryAutoencoder | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Run the whole recipe and write the checkpoint to ``out_dir``. Returns a summary (times, losses).

    ``work_dir`` (default ``out_dir``) receives ``train_log.jsonl`` and the AE intermediate. Pass a trained
    ``ae`` to skip stage 1 (e.g. to train a second prior, parallel_num 1, on the same tokens).
    ``init_from``: a checkpoint directory whose prior, head and projector weights start stage 2 (a further
    training round with a fresh optimizer and schedule); its autoencoder is used as ``ae``.
    """
    from transformers import AutoTokenizer

    cfg = config or RecipeConfig()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    log = _LossLog(work / "train_log.jsonl")
    summary: dict = {"config": asdict(cfg), "seed": seed}
    t0 = time.time()
    images, captions, _ = demo_data.make_dataset(cfg.num_images, seed, cfg.image_size)
    summary["data_s"] = round(time.time() - t0, 1)

    t1 = time.time()
    if init_from is not None and ae is None:
        ae = load_autoencoder(init_from)
    trained_here = ae is None
    if ae is None:
        ae = train_autoencoder(images, cfg.ae, seed, log, progress)
    summary["ae_s"] = round(time.time() - t1, 1)
    t2 = time.time()
    latents = encode_tokens(ae, images)
    summary["encode_s"] = round(time.time() - t2, 1)
    if trained_here:
        t3 = time.time()
        for k, (steps, lr) in enumerate(cfg.ae.decoder_rounds):
            finetune_decoder(ae, latents, images, cfg.ae, seed + k, log, progress, steps=steps, lr=lr)
        summary["decoder_s"] = round(time.time() - t3, 1)
        save_autoencoder(work / "ae", ae)
    summary["ae_recon"] = autoencoder_recon_score(ae, seed)
    log.write(stage="ae_recon", **summary["ae_recon"])
    logger.info("autoencoder reconstruction scores: %s", summary["ae_recon"])
    grid = latents.shape[-1]

    tok_dir = out
    n_vocab = build_tokenizer(
        tok_dir, demo_data.corpus(), cfg.bpe_vocab_size, cfg.max_res, max(1, cfg.prior.parallel_num - 1)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    summary["vocab"] = n_vocab
    trainer = DemoPriorTrainer(cfg.prior, tokenizer, ae.z_channels, grid, seed)
    if init_from is not None:
        trainer.load_weights(init_from)
    t4 = time.time()
    prior_seed = seed if init_from is None else seed + 100  # a further round sees other batches
    train_prior(trainer, captions, latents, prior_seed, log, progress)
    summary["prior_s"] = round(time.time() - t4, 1)
    save_checkpoint(out, tok_dir, ae, ae.ddconfig, trainer)
    summary["total_s"] = round(time.time() - t0, 1)
    log.write(stage="done", **{k: v for k, v in summary.items() if k != "config"})
    log.close()
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo checkpoint written to %s (%.0f s)", out, summary["total_s"])
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bitdance train-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-images", type=int, default=RecipeConfig.num_images)
    ap.add_argument("--ae-steps", type=int, default=AEConfig.steps)
    ap.add_argument("--decoder-steps", type=int, default=None, help="one decoder round of this many steps")
    ap.add_argument("--prior-steps", type=int, default=PriorConfig.steps)
    ap.add_argument("--parallel-num", type=int, default=PriorConfig.parallel_num)
    ap.add_argument("--prior-lr", type=float, default=PriorConfig.lr)
    ap.add_argument("--init-from", default=None, help="continue from this checkpoint (AE, prior, head, projector)")
    ap.add_argument("--work-dir", default=None, help="logs and intermediates (default: --out)")
    ap.add_argument("--ae-from", default=None, help="reuse the autoencoder of this checkpoint directory")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RecipeConfig(seed=args.seed, num_images=args.num_images, threads=args.threads)
    cfg.ae.steps = args.ae_steps
    if args.decoder_steps is not None:
        cfg.ae.decoder_rounds = ((args.decoder_steps, 1e-3),) if args.decoder_steps > 0 else ()
    cfg.prior.steps = args.prior_steps
    cfg.prior.parallel_num = args.parallel_num
    cfg.prior.lr = args.prior_lr
    ae = load_autoencoder(args.ae_from) if args.ae_from else None
    train_demo(args.out, args.seed, cfg, work_dir=args.work_dir, progress=not args.no_progress, ae=ae,
               init_from=args.init_from)
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
