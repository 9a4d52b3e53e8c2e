"""Per-request state inside the engine, and the events the engine emits.

A request owns: its parameters, its ``torch.Generator`` (seeded from the request seed; all its
noise comes from there, in the single-request pipeline's draw order), its KV-cache slots
(conditional rows first, then unconditional rows when guidance > 1), its hidden states for the
next block, and its token buffer. Nothing here is shared between requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..serving_config import InvalidRequest  # noqa: F401  (re-exported)
from .protocol import EventKind, GenerationRequest


@dataclass
class EngineEvent:
    request_id: str
    kind: EventKind
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestState:
    req: GenerationRequest
    h: int  # latent grid rows
    w: int  # latent grid columns
    total_steps: int  # T = h * w / P
    cond_ids: list[int]
    uncond_ids: list[int] | None  # None when guidance <= 1
    preview_every: int
    generator: torch.Generator
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_preview: float | None = None
    slots: tuple[int, ...] = ()
    step: int = 0  # AR steps done
    hidden: torch.Tensor | None = None  # (rows, P, D) predictors of the next block
    tokens: torch.Tensor | None = None  # (B, N, C) float ±1, filled block by block
    cancelled: bool = False

    @property
    def id(self) -> str:
        return self.req.request_id

    @property
    def num_images(self) -> int:
        return self.req.num_images

    @property
    def use_cfg(self) -> bool:
        return self.req.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        return self.num_images * (2 if self.use_cfg else 1)

    @property
    def cond_slots(self) -> tuple[int, ...]:
        return self.slots[: self.num_images]

    @property
    def uncond_slots(self) -> tuple[int, ...]:
        return self.slots[self.num_images :]

    def seq_len(self, parallel_num: int) -> int:
        """Most tokens any of this request's rows holds (the last block is never fed back)."""
        longest = max(len(self.cond_ids), len(self.uncond_ids or []))
        return longest + parallel_num + 2 + self.h * self.w - parallel_num
