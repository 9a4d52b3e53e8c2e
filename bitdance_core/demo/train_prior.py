"""Stage 2 of the demo recipe: prior + diffusion head + projector, jointly, with the official objective.

Spec §5.6 and §6.4: the image tokens are precomputed once with the trained encoder; a tiny Qwen3 reads
``prompt + [<|vision_start|>, <|res_h|>, <|res_w|>, <|query_1..P-1|>] + projector(tokens) + PE`` under the
block-causal mask (blocks of P tokens see each other); the hidden states of each block (+ PE) condition the
diffusion head, trained by x-prediction flow matching with logit-normal t and the v-loss ``(v* - v)^2`` with
``max(1 - t, 0.05)``. Captions are dropped to the unconditional prompt with probability 0.1 (this trains
guidance) and the teacher-forced input tokens get the official bit-flip perturbation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bitdance_core.demo.train_utils import LossLog, optimise
from bitdance_core.families.text_to_image.random_checkpoint import head_config, qwen3_config
from bitdance_core.models.diffusion_head import DiffusionHead
from bitdance_core.models.projector import Projector, patchify, pos2d_table

COND_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
UNCOND_TEXT = "<|im_start|>assistant\n"


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


def build_prior(cfg: PriorConfig, vocab_size: int, max_positions: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shapes = (cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim)
    hf = qwen3_config(*shapes, vocab=vocab_size, max_pos=max_positions)
    return Qwen3ForCausalLM(Qwen3Config.from_dict(hf, attn_implementation="sdpa"))


def demo_head_config(cfg: PriorConfig, z_channels: int) -> dict:
    return head_config(z_channels, cfg.hidden, cfg.head_width, cfg.head_depth, cfg.head_adaln, cfg.parallel_num,
                       cfg.use_swiglu, p_mean=cfg.p_mean, p_std=cfg.p_std, diff_batch_mul=cfg.diff_batch_mul)


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
        self.head = DiffusionHead(**demo_head_config(cfg, z_channels))
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
    log: LossLog | None = None,
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

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, latents.shape[0], (cfg.batch,), generator=gen)
        return trainer.loss([captions[i] for i in idx.tolist()], latents[idx], gen)

    trainer.llm.train()
    optimise(stage, opt, params, cfg.steps, cfg.lr, 100, step_loss, log, progress, ema_decay=0.97)
    trainer.llm.eval()
