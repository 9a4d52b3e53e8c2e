"""Attention backend dispatch: one signature, PyTorch SDPA always available, xformers optional.

All attention in the model is *non-causal* over a given key set:

* the diffusion head attends over the P tokens of one block (no mask);
* a prior block step attends from P new queries to ``[cache; block]`` (block-bidirectional); rows
  of one step have different lengths (cond and uncond streams), so it carries a per-row key mask
  ``(R, 1, 1, Lk)`` that the runner builds on the device into a persistent buffer;
* a prefill is causal, and rows of different lengths carry a key-padding mask.

Grouped-query attention never repeats K/V: SDPA's ``enable_gqa`` (exact against
``repeat_interleave`` on CPU), xformers' grouped layout, or, on CUDA with a per-row key mask,
the query heads of a group folded into the query length (``_sdpa_folded``).

``attention(q, k, v, ...)`` takes ``(B, Lq, H, D)`` queries and ``(B, Lk, Hkv, D)`` keys/values
(grouped-query attention when ``Hkv < H``) and returns ``(B, Lq, H, D)``. xformers is imported
lazily, only when asked for or when ``auto`` resolves on a CUDA tensor; flash_attn is never
imported. Tests force each available backend and compare outputs.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers")
_forced: str | None = None


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


def set_backend(name: str | None) -> None:
    """Force a backend process-wide (``None``/``"auto"`` restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "xformers" and not xformers_available():
        raise RuntimeError("attention backend 'xformers' requested but xformers is not installed")
    _forced = None if name in (None, "auto") else name
    logger.info("attention backend: %s", _forced or "auto")


def resolve_backend(device: torch.device, has_mask: bool = False) -> str:
    if _forced is not None:
        return _forced
    if device.type == "cuda" and not has_mask and xformers_available():
        return "xformers"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, Lq, H, D), k/v (B, Lk, Hkv, D) -> (B, Lq, H, D).

    ``mask``: optional boolean (B, 1, Lq, Lk) or (B, Lq, Lk), True = may attend. ``causal`` aligns
    the last query with the last key (a prefill over the whole key set).
    """
    backend = resolve_backend(q.device, has_mask=mask is not None or causal)
    if backend == "xformers" and mask is None and not causal:
        return _xformers(q, k, v, scale)
    return _sdpa(q, k, v, causal, mask, scale)


def _sdpa(q, k, v, causal, mask, scale):
    heads, kv_heads = q.shape[2], k.shape[2]
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        mask = tri if mask is None else (mask & tri)
    if kv_heads != heads and mask is not None and mask.shape[-2] == 1 and q.device.type == "cuda":
        return _sdpa_folded(q, k, v, mask, scale)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D) views
    # GQA inside the kernel: K/V are never repeated (bit-identical to repeat_interleave on CPU).
    if kv_heads != heads:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _sdpa_folded(q, k, v, mask, scale):
    """GQA with a query-independent (per-row key) mask as plain attention: the G query heads of a kv
    head become G x Lq queries of that head, so every SDPA kernel that takes a mask runs (CUDA's
    memory-efficient kernel has no grouped heads) and K/V stay views of the cache."""
    b, lq, heads, d = q.shape
    kv_heads = k.shape[2]
    g = heads // kv_heads
    qf = q.view(b, lq, kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, g * lq, d)
    out = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.view(b, kv_heads, g, lq, d).permute(0, 3, 1, 2, 4).reshape(b, lq, heads, d)


def _xformers(q, k, v, scale):
    import xformers.ops as xops

    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:
        b, lk, _, d = k.shape
        g = heads // kv_heads
        # xformers' grouped layout: (B, L, G, H/G, D); expand is a view, no copy.
        q = q.reshape(q.shape[0], q.shape[1], kv_heads, g, d)
        k = k[:, :, :, None, :].expand(b, lk, kv_heads, g, d)
        v = v[:, :, :, None, :].expand(b, lk, kv_heads, g, d)
        out = xops.memory_efficient_attention(q, k, v, scale=scale)
        return out.reshape(out.shape[0], out.shape[1], heads, d)
    return xops.memory_efficient_attention(q, k, v, scale=scale)
