"""The class-conditional AR transformer (LlamaGen style, 2-D RoPE), over input embeddings, with a per-row KV cache.

Weight-compatible with ``imagenet_gen/src/model*.py`` (keys ``cls_embedding``, ``query_token``, ``proj_in``,
``emb_norm``, ``layers.{i}.attention.wqkv|wo``, ``layers.{i}.feed_forward.w1|w2``, ``layers.{i}.*_norm``,
``norm``, ``pos_for_diff``). The contract is ``Qwen3Model``'s: ``forward(embeds, plan)`` over ``(rows, L, D)``
input embeddings and an ``AttnPlan`` from ``plan_cached`` / ``plan_full``, returning the hidden states after the
final norm. Only the position scheme differs: a sequence index ``p`` maps to a row of a fixed 2-D RoPE table
(class and query tokens unrotated; image token ``n`` at its patch centre + 1, in generation order), applied to
adjacent pairs, the first half of the pairs by x, the second by y.

Sequence of one row: ``[cls_token_num class tokens, parallel_num - 1 query tokens, tokens 0 .. N - P - 1]``;
the hidden state at index ``cls_token_num - 1 + n`` predicts token ``n``. The first forward is causal with its
last ``parallel_num`` tokens mutually visible; every later one appends a block of ``parallel_num`` tokens that see
the whole row and each other (``imagenet_gen``'s block-causal mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...models.attention import attention
from ...models.qwen3 import AttnPlan, Qwen3Model
from .config import ClassModelConfig

ROPE_BASE = 10000.0
NORM_EPS = 1e-6


class MLPConnector(nn.Module):
    """``proj_in``: SwiGLU ``latent_dim -> dim`` with biases."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        hidden = int(dim * 1.5)
        self.w1 = nn.Linear(in_dim, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(u) * v)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (R, L, H, D), cos/sin (R, L, D/2): rotate adjacent pairs (2j, 2j + 1), in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(3).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.heads, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, plan: AttnPlan, layer: int) -> torch.Tensor:
        r, n, d = x.shape
        q, k, v = self.wqkv(x).view(r, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = rotate_pairs(q, plan.cos, plan.sin), rotate_pairs(k, plan.cos, plan.sin)
        if plan.cache is not None:
            k, v = plan.cache.write_read(layer, k, v, plan)
        out = attention(q, k, v, causal=plan.causal, mask=plan.mask)
        return self.wo(out.reshape(r, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(u) * v)


class Block(nn.Module):
    def __init__(self, cfg: ClassModelConfig):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_head)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, plan: AttnPlan, layer: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), plan, layer)
        return h + self.feed_forward(self.ffn_norm(h))


def image_positions(cfg: ClassModelConfig) -> torch.Tensor:
    """(N, 2) float32 (x, y) of every image token in generation order: patch centre + 1 (1.5 .. grid + 0.5)."""
    g = cfg.grid
    c = torch.arange(g, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    pos = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1) + 1.0  # raster order
    p = cfg.patch_side
    if p > 1:  # raster over patches, raster inside a patch
        pos = pos.view(g // p, p, g // p, p, 2).permute(0, 2, 1, 3, 4).reshape(g * g, 2)
    return pos


def rope_table(cfg: ClassModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (prefix_len + N, head_dim / 2) float32, indexed by sequence position."""
    half = cfg.head_dim // 2
    freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.cat([torch.zeros(cfg.prefix_len, 2), image_positions(cfg)])
    ang = torch.outer(t.flatten(), freqs).view(t.shape[0], -1)  # [x f_0 .. x f_k, y f_0 .. y f_k]
    return torch.cos(ang), torch.sin(ang)


class ClassTransformer(nn.Module):
    def __init__(self, cfg: ClassModelConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim * cfg.cls_token_num)
        if cfg.parallel_num > 1:
            self.query_token = nn.Parameter(torch.empty(1, cfg.parallel_num - 1, cfg.dim))
        self.proj_in = MLPConnector(cfg.latent_dim * cfg.patch_size ** 2, cfg.dim)
        self.emb_norm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)
        self.pos_for_diff = nn.Embedding(cfg.num_tokens, cfg.dim)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    dtype = Qwen3Model.dtype  # the final norm's (both priors end in one)
    device = Qwen3Model.device

    def forward(self, embeds: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        x = self.emb_norm(embeds.to(self.dtype))
        for i, layer in enumerate(self.layers):
            x = layer(x, plan, i)
        return self.norm(x)

    # ---- inputs ------------------------------------------------------------------------------

    def prefix_embeds(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (R,) int64 (the null class is ``num_classes``) -> (R, prefix_len, D) first-forward inputs."""
        r = labels.shape[0]
        x = self.cls_embedding(labels).view(r, self.cfg.cls_token_num, self.cfg.dim)
        if self.cfg.parallel_num > 1:
            x = torch.cat([x, self.query_token.expand(r, -1, -1)], dim=1)
        return x

    def token_embeds(self, bits: torch.Tensor) -> torch.Tensor:
        """(R, P, latent_dim) ±1 tokens -> (R, P, D) inputs of the next forward."""
        return self.proj_in(bits.to(self.dtype))

    def head_condition(self, hidden: torch.Tensor, first_token: int) -> torch.Tensor:
        """(R, P, D) hidden states predicting tokens ``first_token ..`` -> the head's condition (+ ``pos_for_diff``)."""
        n = hidden.shape[1]
        return hidden + self.pos_for_diff.weight[first_token : first_token + n]

    # ---- plans -------------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (R, L) sequence indices -> cos, sin (R, L, head_dim / 2) float32 whatever ``dtype`` (a table
        lookup; ``rotate_pairs`` rotates in float32, as the reference): callers keep the dtype returned."""
        if self._rope is None or self._rope[0].device != positions.device:
            cos, sin = rope_table(self.cfg)
            self._rope = (cos.to(positions.device), sin.to(positions.device))
        cos, sin = self._rope
        idx = positions.clamp_max(cos.shape[0] - 1)  # padding positions of a ragged forward are never read
        return cos[idx], sin[idx]

    def plan_full(self, rows: int, length: int, mask: torch.Tensor | None = None) -> AttnPlan:
        """A cache-less forward over ``length`` positions from 0 (tests): ``mask`` bool (L, L), True = may attend;
        default the official block-causal mask."""
        pos = torch.arange(length, device=self.device).expand(rows, length)
        cos, sin = self.rope(pos, self.dtype)
        if mask is None:
            mask = block_causal_mask(length, self.cfg.cls_token_num - 1, self.cfg.parallel_num, self.device)
        return AttnPlan(cos=cos, sin=sin, mask=mask.expand(rows, 1, length, length))

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the KV cache this transformer writes (no grouped-query attention)."""
        return self.cfg.n_layer, self.cfg.n_head, self.cfg.head_dim

    # The same planning as the text-to-image prior (per-row cache lengths, causal prefix with a bidirectional last
    # block, the engine's fixed-shape block step): only ``rope`` differs, so the functions are shared.
    plan_cached = Qwen3Model.plan_cached
    plan_step = Qwen3Model.plan_step


def block_causal_mask(total: int, causal: int, block: int, device=None) -> torch.Tensor:
    """bool (total, total), True = may attend: causal, and blocks of ``block`` from index ``causal`` see each other."""
    i = torch.arange(total, device=device)
    q, k = i[:, None], i[None, :]
    same_block = (q >= causal) & (k >= causal) & ((q - causal) // block == (k - causal) // block)
    return (k <= q) | same_block
