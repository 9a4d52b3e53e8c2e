"""The class-conditional models' diffusion heads (``imagenet_gen/src/diff_head*.py``, spec §7.1).

* ``parallel_num == 1``: ``MlpEncoder``, per-token residual MLP blocks (LayerNorm, ``(1 + scale)``/``shift``,
  SwiGLU ``int(1.5 C)``, gated residual) with adaLN ``Linear(C -> 3C)`` shared by consecutive blocks;
* ``parallel_num > 1``: ``TransEncoder``, the text-to-image head's transformer blocks
  (``bitdance_core.models.diffusion_head.TransBlock``) with 64-wide attention heads and SwiGLU.

Both output the raw x-prediction (no ``2 sigmoid - 1``). The API is the text-to-image head's
(``condition`` once per AR step, ``time_table`` once per step count, ``predict`` per sampler evaluation), so the
sampler (``bitdance_core.sampling``) and the engine drive either family the same way. Keys: ``head.net.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...models.diffusion_head import LN_EPS, FinalLayer, HeadAPI, TimestepEmbedder, TransBlock, _layer_norm

ATTN_HEAD_DIM = 64


class MlpResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = int(1.5 * dim)
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.w1 = nn.Linear(dim, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scale, shift, gate = mod
        h = _layer_norm(x, self.norm, self.dim) * (1 + scale) + shift
        u, v = self.w1(h).chunk(2, dim=-1)
        return x + self.w2(F.silu(u) * v) * gate


class _Net(nn.Module):
    def __init__(self, ch_target: int, ch_cond: int, dim: int, depth: int, n_adaln: int, parallel: bool):
        super().__init__()
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Linear(ch_cond, dim)
        self.input_proj = nn.Linear(ch_target, dim)
        if parallel:
            blocks = [TransBlock(dim, use_swiglu=True, head_dim=ATTN_HEAD_DIM) for _ in range(depth)]
        else:
            blocks = [MlpResBlock(dim) for _ in range(depth)]
        self.res_blocks = nn.ModuleList(blocks)
        self.ada_ln_blocks = nn.ModuleList(nn.Linear(dim, (6 if parallel else 3) * dim) for _ in range(n_adaln))
        self.final_layer = FinalLayer(dim, ch_target)


class ClassHead(HeadAPI):
    """``DiffHead`` of imagenet_gen; ``parallel`` picks ``TransEncoder`` over ``MlpEncoder``."""

    def __init__(self, ch_target: int, ch_cond: int, ch_latent: int, depth_latent: int, depth_adanln: int,
                 parallel: bool, time_shift: float = 1.0):
        super().__init__()
        if parallel and ch_latent % ATTN_HEAD_DIM:
            raise ValueError(f"diff_dim {ch_latent} must be a multiple of the head's attention width {ATTN_HEAD_DIM}")
        self.k_sw = max(1, depth_latent // depth_adanln)
        if depth_latent % self.k_sw or (depth_latent - 1) // self.k_sw >= depth_adanln:
            raise ValueError(f"diff_layers {depth_latent} does not fit diff_adanln_layers {depth_adanln}")
        self.parallel = parallel
        self.n_mod = 6 if parallel else 3
        self.time_shift = float(time_shift)
        self.net = _Net(ch_target, ch_cond, ch_latent, depth_latent, depth_adanln, parallel)

