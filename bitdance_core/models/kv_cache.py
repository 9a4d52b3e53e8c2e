"""A static, preallocated KV cache with one slot (row) per sequence and per-row lengths.

Shape ``(layers, rows, max_len, kv_heads, head_dim)`` for keys and values, allocated once and
written in place: no per-step allocation or concatenation. A forward works on a subset of rows
(``slots``); each row has its own length, so conditional and unconditional streams, prompts of
different lengths and requests of different sizes share one batch. ``lengths`` is the host's
record (prefill plans and admission read it; it is never read back from the device); the engine's
runner keeps the same lengths on the device (``StepBuffers.starts``) for its fixed-shape block
step, which reads keys as a view ``k[layer, 0:R, :key_len]`` of a contiguous slot range.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, rows, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * rows
        self.rows, self.max_len = rows, max_len

    @staticmethod
    def bytes_per_token_row(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def reset(self, slots) -> None:
        for s in slots:
            self.lengths[s] = 0

    def copy_prefix(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Install a precomputed prefix ``(layers, L, kv_heads, head_dim)`` into an empty row."""
        n = k.shape[1]
        self.k[:, slot, :n] = k
        self.v[:, slot, :n] = v
        self.lengths[slot] = n

    def export_prefix(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lengths[slot]
        return self.k[:, slot, :n].clone(), self.v[:, slot, :n].clone()

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention layer's cache traffic: write the forward's new keys and values ``(R, n, kv_heads,
        head_dim)`` of ``layer`` at ``plan.write_pos`` of their rows, and return what attention reads,
        ``(R, plan.key_len, kv_heads, head_dim)`` each. The rows are ``plan.slots`` (a prefill: any slots,
        gathered), or the contiguous ``plan.slot_range`` (the block step: views, no gather; ``plan.row_index`` the
        rows of the range that write, default all). ``plan`` is a ``models.qwen3.AttnPlan``."""
        ck, cv = self.k[layer], self.v[layer]  # (rows, max_len, kv_heads, head_dim)
        if plan.slot_range is not None:
            s0, s1 = plan.slot_range
            ck, cv = ck[s0:s1], cv[s0:s1]
            r = k.shape[0]
            rows = plan.row_index[:r] if plan.row_index is not None else torch.arange(r, device=k.device)[:, None]
            ck[rows, plan.write_pos] = k
            cv[rows, plan.write_pos] = v
            return ck[:, : plan.key_len], cv[:, : plan.key_len]
        rows = plan.slots[:, None]
        ck[rows, plan.write_pos] = k
        cv[rows, plan.write_pos] = v
        return ck[:, : plan.key_len][plan.slots], cv[:, : plan.key_len][plan.slots]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
