"""Per-request state inside the engine, and the events the engine emits.

A request owns: its parameters, its ``torch.Generator`` (seeded from the request seed; all its
noise comes from there, in the single-request pipeline's draw order), its KV-cache slots
(conditional rows first, then unconditional rows when guidance > 1) and its token buffer (its
hidden states live in the runner's per-slot buffer). Nothing here is shared between requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .family import Prepared
from .protocol import EventKind, GenerationRequest
from .serving_config import InvalidRequest  # noqa: F401  (re-exported)


@dataclass
class EngineEvent:
    request_id: str
    kind: EventKind
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestState:
    req: GenerationRequest
    prep: Prepared  # what the model family made of the request (grid, prefixes, AR steps)
    preview_every: int
    generator: torch.Generator
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_preview: float | None = None
    slots: tuple[int, ...] = ()
    slot_index: torch.Tensor | None = None  # the slots as a device tensor
    step: int = 0  # AR steps done
    tokens: torch.Tensor | None = None  # (B, N, C) float ±1, filled block by block
    cancelled: bool = False

    @property
    def id(self) -> str:
        return self.req.request_id

    @property
    def h(self) -> int:  # latent grid rows
        return self.prep.h

    @property
    def w(self) -> int:  # latent grid columns
        return self.prep.w

    @property
    def total_steps(self) -> int:  # T
        return self.prep.total_steps

    @property
    def num_images(self) -> int:
        return self.req.num_images

    @property
    def use_cfg(self) -> bool:
        return self.prep.uses_cfg

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
        return max(self.prep.cond_len, self.prep.uncond_len) + self.h * self.w - parallel_num
