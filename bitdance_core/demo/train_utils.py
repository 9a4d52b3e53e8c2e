"""Small helpers shared by the demo training stages: learning-rate schedule, image scaling, loss log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def to_unit(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class LossLog:
    def __init__(self, path: Path | None):
        self.fh = open(path, "a") if path is not None else None  # noqa: SIM115

    def write(self, **row) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
