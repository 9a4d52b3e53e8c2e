"""The readable single-request class-conditional pipeline: class labels -> binary tokens -> images.

The reference the engine is tested against. It follows ``imagenet_gen``'s ``BitDance.sample`` step by step:

1) rows = the B labels, then B null-class rows (``num_classes``) when guidance > 1;
2) first forward over ``[class tokens, query tokens]`` (causal, the last P mutually visible) into a KV cache;
3) for each of the T = N / P AR steps: the head's condition is the last P hidden states + ``pos_for_diff`` of
   the P tokens; the step's guidance is ``guidance_at`` (linear ramp from exactly 1 at step 0, or constant);
   a guided step samples B blocks (noise ``(B, P, C)``, one head call over the 2B rows) and feeds the same block
   to both halves; an unguided step samples every row on its own (noise ``(rows, P, C)``; at step 0 of the
   linear schedule the conditional and null rows thus get different tokens, an oddity of the reference that
   exact reproduction keeps); ``sign``, ``proj_in``, one forward of P tokens (skipped after the last block);
4) un-patchify (``patch`` order: raster over ``sqrt(P)``-sided patches, raster inside) and decode.

All noise comes from one ``torch.Generator`` seeded with the request's seed, drawn in the reference's order for
the whole batch of labels (so one request with labels ``[0, 0, 999]`` is the reference's batch of those three).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ...engine.serving_config import InvalidRequest
from ...models.autoencoder import to_uint8
from ...models.kv_cache import KVCache
from ...models.projector import unpatchify_tokens
from ...sampling import binarize, euler_maruyama, schedule
from .config import CFG_SCHEDULES, DEFAULT_STEPS
from .guidance import check_labels, guidance_at
from .loader import LoadedClassModel, load_class_model


@dataclass
class ClassPipelineOutput:
    images: list[Image.Image]
    tokens: torch.Tensor  # (B, N, C) int8 ±1 in generation order
    tokens_all: torch.Tensor  # (rows, N, C) int8: every row carried (null rows after the B conditional ones)
    values: torch.Tensor  # (B, N, C) float32 before the sign
    latent: torch.Tensor  # (B, C, h, w) float ±1 handed to the decoder
    pixels: torch.Tensor  # (B, H, W, 3) uint8
    seed: int


class ClassConditionalPipeline:
    def __init__(self, model: LoadedClassModel):
        self.model, self.config, self.device = model, model.config, model.placement.device

    @classmethod
    def from_checkpoint(cls, path, device: str | None = None, dtype: str | None = None, **kw):
        return cls(load_class_model(path, device, dtype, **kw))

    @torch.inference_mode()
    def __call__(
        self,
        class_labels,
        seed: int | None = None,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        cfg_schedule: str = "linear",
        callback: Callable[[int, int], None] | None = None,
    ) -> ClassPipelineOutput:
        m, cfg, dev = self.model, self.config, self.device
        labels = check_labels(class_labels, cfg.num_classes)
        if cfg_schedule not in CFG_SCHEDULES:
            raise InvalidRequest(f"cfg_schedule must be one of {list(CFG_SCHEDULES)}", field="cfg_schedule")
        if steps < 1:
            raise InvalidRequest("steps must be at least 1", field="steps")
        g = cfg.default_guidance if guidance_scale is None else float(guidance_scale)
        seed = secrets.randbelow(2**63) if seed is None else seed
        gen = torch.Generator(device=dev).manual_seed(seed)
        P, C, T, B = cfg.parallel_num, cfg.latent_dim, cfg.ar_steps, len(labels)
        use_cfg = g > 1.0
        row_labels = labels + [cfg.null_class] * B if use_cfg else labels
        R = len(row_labels)
        net, head = m.transformer, m.head

        # 1-2) first forward: class + query tokens of every row
        cache = KVCache(cfg.n_layer, R, cfg.max_seq_len, cfg.n_head, cfg.head_dim, net.dtype, dev)
        slots = list(range(R))
        x0 = net.prefix_embeds(torch.tensor(row_labels, device=dev))
        L0 = cfg.prefix_len
        hid = net(x0, net.plan_cached(cache, slots, [L0] * R, L0, block=P))[:, -P:]

        # 3) the AR loop
        t_emb = head.time_table(schedule(steps, cfg.time_shift, str(dev)).t_values)
        tokens, rows_fed, values = [], [], []
        for i in range(T):
            cond = head.condition(net.head_condition(hid, i * P).float())
            g_i = guidance_at(i, T, g, cfg_schedule)
            n = B if g_i > 1.0 else R  # samples drawn this step
            x = euler_maruyama(
                predict=lambda xr, tr, k, cond=cond: head.predict(xr, tr, cond, t_emb[k]),
                noise=lambda n=n: torch.randn((n, P, C), generator=gen, device=dev),
                guidance=[g_i] * n, steps=steps, time_shift=cfg.time_shift, device=dev,
            )
            bits = binarize(x)
            fed = torch.cat([bits, bits]) if n < R else bits
            tokens.append(bits[:B])
            values.append(x[:B])
            rows_fed.append(fed)
            if i < T - 1:
                hid = net(net.token_embeds(fed), net.plan_cached(cache, slots, [P] * R, P, block=P))
            if callback is not None:
                callback(i + 1, T)

        # 4) decode
        tok = torch.cat(tokens, dim=1)
        latent = unpatchify_tokens(tok, cfg.grid, cfg.grid, cfg.patch_side)
        pixels = to_uint8(m.ae.decode(latent.to(m.ae.dtype)))
        return ClassPipelineOutput(
            images=[Image.fromarray(a) for a in pixels], tokens=tok.to(torch.int8).cpu(),
            tokens_all=torch.cat(rows_fed, dim=1).to(torch.int8).cpu(), values=torch.cat(values, dim=1).float().cpu(),
            latent=latent.cpu(), pixels=torch.from_numpy(pixels), seed=seed,
        )
