"""Token → LLM-embedding projector and the 2-D sin-cos position table ("pos embed for diff").

The projector maps a ±1 token of C bits to a D-dim input embedding: ``fc2(gelu_tanh(fc1(bits)))``
(keys ``fc1.*``, ``fc2.*``). The position table is not learned: row ``n`` belongs to token ``n``
of the patch-major order (spec §3.6, §4.4) and is added both to the hidden states that condition
the head and to the projected tokens fed back into the prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        x = bits.to(self.fc1.weight.dtype)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def sincos_1d(dim: int, rows: int) -> torch.Tensor:
    """(rows, dim) float32: ``[sin(p * omega), cos(p * omega)]`` with omega_k = 10000^(-k / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    pos = torch.arange(rows, dtype=torch.float32)
    angles = torch.outer(pos, omega)  # (rows, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def pos2d_table(h: int, w: int, patch_side: int, dim: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """(h*w, dim) float32 in patch-major token order; columns first half, rows second half."""
    if h % patch_side or w % patch_side:
        raise ValueError(f"latent grid {h}x{w} is not a multiple of the patch side {patch_side}")
    if table is None:
        table = sincos_1d(dim // 2, max(h, w))
    half = table.shape[1]
    grid_rows = table[:h].view(h, 1, half).expand(h, w, half)
    grid_cols = table[:w].view(1, w, half).expand(h, w, half)
    grid = torch.cat([grid_cols, grid_rows], dim=-1)  # (h, w, dim)
    return patchify(grid, patch_side).contiguous()


def patchify(grid: torch.Tensor, ps: int) -> torch.Tensor:
    """(h, w, ...) grid → (h*w, ...) sequence: patches row-major, tokens row-major inside a patch."""
    h, w = grid.shape[:2]
    rest = grid.shape[2:]
    x = grid.reshape(h // ps, ps, w // ps, ps, *rest).transpose(1, 2)
    return x.reshape(h * w, *rest)


def unpatchify_tokens(tokens: torch.Tensor, h: int, w: int, ps: int) -> torch.Tensor:
    """(B, N, C) tokens in generation order → (B, C, h, w) latent (the inverse of ``patchify``)."""
    b, n, c = tokens.shape
    x = tokens.reshape(b, h // ps, w // ps, ps, ps, c)  # b hb wb p1 p2 c
    x = x.permute(0, 5, 1, 3, 2, 4)  # b c hb p1 wb p2
    return x.reshape(b, c, h, w)
