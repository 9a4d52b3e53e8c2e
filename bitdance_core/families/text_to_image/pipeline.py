"""The readable single-request pipeline: prompt → binary tokens → image.

This is the reference every other path is tested against (the batching engine must give the
same images). It follows the official pipeline step by step, minus its wasted work:

1) tokenise the conditional prompt (and the unconditional one when guidance > 1) and append the
   image prefix ``[<|vision_start|>, <|res_h|>, <|res_w|>, <|query_1..P-1|>]``;
2) prefill every row in one forward (causal, the last P prefix tokens mutually visible);
3) for each of the T AR steps: condition the head on ``hidden + PE``, sample P tokens with
   Euler–Maruyama + CFG (one forward for conditional and unconditional rows), binarise, project
   ``projector(bits) + PE`` and feed the block back (skipped after the last block);
4) un-patchify the tokens and decode them with the autoencoder.

Noise comes from one ``torch.Generator`` seeded with the request's seed, in the reference's
draw order; nothing is seeded globally.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ...models.autoencoder import to_uint8
from ...models.kv_cache import KVCache
from ...models.projector import pos2d_table, sincos_1d, unpatchify_tokens
from ...resolutions import POS_TABLE_ROWS, SizePolicy, policy_for
from ...sampling import binarize, euler_maruyama, schedule
from .config import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .loader import LoadedModel, load_model
from .prompts import PromptEncoder

logger = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    tokens: torch.Tensor  # (num_images, N, C) int8 of ±1, generation (patch-major) order
    seed: int


class BitDancePipeline:
    def __init__(self, model: LoadedModel, sizes=None, max_side_px: int | None = None):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.device = model.placement.device
        self.prompts = PromptEncoder(model.tokenizer, cfg.parallel_num)
        self.sizes: SizePolicy = policy_for(cfg.downsample, cfg.patch_side, cfg.is_released_shape, sizes,
                                            max_side_px)
        self.pos_1d = sincos_1d(cfg.llm.hidden_size // 2, POS_TABLE_ROWS).to(self.device)

    @classmethod
    def from_pretrained(cls, model_dir, device: str | None = None, dtype: str | None = None,
                        quantize: str | None = None, **kw):
        return cls(load_model(model_dir, device, dtype, quantize=quantize), **kw)

    def position_table(self, h: int, w: int) -> torch.Tensor:
        return pos2d_table(h, w, self.config.patch_side, self.config.llm.hidden_size, self.pos_1d)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str,
        height: int,
        width: int,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int | None = None,
        num_images: int = 1,
        negative_prompt: str | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> PipelineOutput:
        m, cfg = self.model, self.config
        P, B = cfg.parallel_num, num_images
        h, w = self.sizes.grid(height, width)
        T = (h * w) // P
        seed = secrets.randbelow(2**63) if seed is None else seed
        gen = torch.Generator(device=self.device).manual_seed(seed)
        use_cfg = guidance_scale > 1.0

        # 1) token ids: conditional rows first, then unconditional rows
        prefix = self.prompts.image_prefix_ids(h, w)
        ids = [self.prompts.cond_ids(prompt) + prefix] * B
        if use_cfg:
            ids += [self.prompts.uncond_ids(negative_prompt) + prefix] * B
        rows = len(ids)
        lengths = [len(x) for x in ids]
        longest = max(lengths)
        padded = torch.zeros(rows, longest, dtype=torch.long)
        for r, x in enumerate(ids):
            padded[r, : len(x)] = torch.tensor(x)

        # 2) prefill (one forward for every row) into a cache sized for this request
        cache = KVCache(cfg.llm.num_layers, rows, longest + h * w, cfg.llm.num_kv_heads, cfg.llm.head_dim,
                        m.llm.dtype, self.device)
        slots = list(range(rows))
        embeds = m.llm.embed_tokens(padded.to(self.device))
        hidden = m.llm(embeds, m.llm.plan_cached(cache, slots, lengths, longest, block=P))
        last = torch.tensor(lengths, device=self.device)[:, None] - P + torch.arange(P, device=self.device)
        hid = hidden.gather(1, last[:, :, None].expand(rows, P, hidden.shape[-1]))  # (rows, P, D)

        # 3) the AR loop
        pe = self.position_table(h, w)  # (N, D) float32
        guidance = [guidance_scale] * B
        t_emb = m.head.time_table(schedule(steps, cfg.time_shift, str(self.device)).t_values)  # (S + 1, Dh)
        tokens = []
        for s in range(T):
            pe_s = pe[s * P : (s + 1) * P]
            cond = m.head.condition((hid.float() + pe_s).to(m.head.dtype))
            x = euler_maruyama(
                predict=lambda x_rows, t_rows, i, cond=cond: m.head.predict(x_rows, t_rows, cond, t_emb[i]),
                noise=lambda: torch.randn((B, P, cfg.z_channels), generator=gen, device=self.device),
                guidance=guidance, steps=steps, time_shift=cfg.time_shift, device=self.device,
            )
            bits = binarize(x)
            tokens.append(bits)
            if s < T - 1:
                emb = m.projector(bits).float() + pe_s
                emb_rows = torch.cat([emb, emb]) if use_cfg else emb
                hid = m.llm(emb_rows, m.llm.plan_cached(cache, slots, [P] * rows, P, block=P))
            if callback is not None:
                callback(s + 1, T)

        # 4) decode
        tok = torch.cat(tokens, dim=1)  # (B, N, C)
        latent = unpatchify_tokens(tok, h, w, cfg.patch_side)
        images = m.ae.decode(latent.to(m.ae.dtype), generator=gen)
        pil = [Image.fromarray(a) for a in to_uint8(images)]
        return PipelineOutput(images=pil, tokens=tok.to(torch.int8).cpu(), seed=seed)
