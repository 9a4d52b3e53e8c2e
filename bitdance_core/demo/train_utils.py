"""Shared by the demo training stages: the optimisation loop, its learning-rate schedule, image scaling, loss log."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


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


def optimise(
    stage: str,
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    steps: int,
    base_lr: float,
    warmup: int,
    step_loss: Callable[[], torch.Tensor],
    log: LossLog | None,
    progress: bool,
    ema_decay: float = 0.95,
) -> None:
    """``steps`` AdamW steps on ``step_loss()`` (which draws its own batch): warm-up + cosine schedule,
    gradient clipping at 1, a progress bar with the smoothed loss, a log row every 10 steps and at the end."""
    ema = None
    bar = tqdm(range(steps), desc=stage, disable=not progress, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, base_lr, warmup)
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = loss.item()
        ema = value if ema is None else ema_decay * ema + (1 - ema_decay) * value
        bar.set_postfix(loss=f"{ema:.4f}")
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log.write(stage=stage, step=step, loss=round(value, 5), ema=round(ema, 5), t=time.time())
