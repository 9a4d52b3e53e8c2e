"""The Qwen3 decoder over input embeddings, for inference with a static per-row KV cache.

Weight-compatible with HF ``Qwen3Model`` (the ``model.*`` keys of a ``Qwen3ForCausalLM``
checkpoint, prefix stripped). It knows nothing of prompts, images or requests: a forward takes
``(rows, L, D)`` input embeddings and an ``AttnPlan`` saying where each row's new tokens sit in
the cache and which keys each query may see. Three kinds of plan cover BitDance:

* prefill: right-padded prompts of different lengths, causal, with the last ``block`` tokens of
  each row mutually visible (the reference's two prefill calls fused into one);
* block step: ``P`` new tokens per row that see the row's whole cache and each other;
* full: no cache (tests, training), causal or with an explicit mask.

Returns the hidden states after the final norm (``last_hidden_state``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import to_device
from .attention import attention
from .kv_cache import KVCache
from .qwen3_config import LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


@dataclass
class AttnPlan:
    """Where a forward's tokens go and what they may attend to; shared by every layer."""

    cos: torch.Tensor  # (R, L, head_dim)
    sin: torch.Tensor
    mask: torch.Tensor | None = None  # bool (R, 1, L, Lk), True = may attend
    causal: bool = False  # only for cache-less forwards without a mask
    cache: KVCache | None = None
    slots: torch.Tensor | None = None  # (R,) cache rows
    slot_range: tuple[int, int] | None = None  # (start, stop) when the slots are contiguous
    write_pos: torch.Tensor | None = None  # (R, L) cache positions of the new tokens
    key_len: int = 0  # keys are cache[:, slots, :key_len]
    row_index: torch.Tensor | None = None  # (R, 1) 0..R-1 for a slot range (a persistent buffer)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, plan: AttnPlan, layer: int) -> torch.Tensor:
        r, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(r, n, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(r, n, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(r, n, self.kv_heads, self.head_dim)
        cos, sin = plan.cos[:, :, None, :], plan.sin[:, :, None, :]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if plan.cache is not None:
            k, v = plan.cache.write_read(layer, k, v, plan)
        out = attention(q, k, v, causal=plan.causal, mask=plan.mask)
        return self.o_proj(out.reshape(r, n, self.heads * self.head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, plan: AttnPlan, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), plan, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the KV cache this prior writes."""
        return self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim

    def forward(self, embeds: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        x = embeds.to(self.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, plan, i)
        return self.norm(x)

    # ---- plans -------------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (R, L) -> cos, sin (R, L, head_dim), computed in float32 then cast (as HF)."""
        d = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64,
                                                                 device=positions.device).float() / d))
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def plan_full(self, rows: int, length: int, causal: bool = True, mask: torch.Tensor | None = None) -> AttnPlan:
        pos = torch.arange(length, device=self.device).expand(rows, length)
        cos, sin = self.rope(pos, self.dtype)
        return AttnPlan(cos=cos, sin=sin, mask=mask, causal=causal and mask is None)

    def plan_cached(self, cache: KVCache, slots: list[int], new_tokens: list[int], length: int,
                    block: int) -> AttnPlan:
        """Plan a forward that appends ``new_tokens[r]`` tokens (right-padded to ``length``) to each row.

        Queries see every cached key of their row, causal keys among the new tokens, and the last
        ``block`` real new tokens of a row see each other (block-bidirectional). ``block == length``
        with equal rows is a plain block step and needs no mask.
        """
        dev = self.device
        starts = [cache.lengths[s] for s in slots]
        key_len = max(s + n for s, n in zip(starts, new_tokens))
        start_t = to_device(starts, dev)[:, None]
        write_pos = start_t + torch.arange(length, device=dev)[None, :]  # (R, L)
        cos, sin = self.rope(write_pos, self.dtype)
        uniform = len(set(starts)) == 1 and all(n == length for n in new_tokens)
        mask = None
        if not (uniform and block == length):
            n_t = to_device(new_tokens, dev)[:, None, None]
            q_abs = write_pos[:, :, None]  # (R, L, 1)
            k_idx = torch.arange(key_len, device=dev)[None, None, :]  # (1, 1, Lk)
            block_start = start_t[:, :, None] + n_t - block
            visible = (k_idx <= q_abs) | ((k_idx >= block_start) & (q_abs >= block_start))
            mask = (visible & (k_idx < start_t[:, :, None] + n_t))[:, None]  # (R, 1, L, Lk)
        slot_range = None
        if slots == list(range(slots[0], slots[0] + len(slots))):
            slot_range = (slots[0], slots[0] + len(slots))
        for s, n in zip(slots, new_tokens):
            if cache.lengths[s] + length > cache.max_len:
                raise ValueError(f"KV cache row {s} overflows: {cache.lengths[s]} + {length} > {cache.max_len}")
            cache.lengths[s] += n
        return AttnPlan(cos=cos, sin=sin, mask=mask, cache=cache, slots=to_device(slots, dev),
                        slot_range=slot_range, write_pos=write_pos, key_len=key_len)

    def plan_step(self, cache: KVCache, buf, rows: int, key_len: int) -> AttnPlan:
        """The fixed-shape block step over slots ``0..rows-1``: ``P`` new tokens per row at the
        device-side ``buf.starts`` (``0`` for rows with ``buf.active == 0``), keys
        ``cache[:, :rows, :key_len]`` (a view) under a per-row key mask built into ``buf.mask``.
        Reads no host value of the cache: the plan can be captured in a CUDA graph."""
        P = buf.block
        pos = (buf.starts[:rows] * buf.active[:rows])[:, None] + buf.arange_p  # (R, P)
        flat = pos.view(-1)
        cos, sin = buf.cos[: rows * P], buf.sin[: rows * P]
        torch.index_select(buf.rope_cos, 0, flat, out=cos)
        torch.index_select(buf.rope_sin, 0, flat, out=sin)
        mask = buf.mask[:rows, :key_len]
        torch.lt(buf.arange_k[:key_len][None, :], pos[:, -1:] + 1, out=mask)
        return AttnPlan(cos=cos.view(rows, P, -1), sin=sin.view(rows, P, -1), mask=mask[:, None, None, :],
                        cache=cache, slot_range=(0, rows), write_pos=pos, key_len=key_len,
                        row_index=buf.row_index)
