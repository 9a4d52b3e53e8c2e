"""Random weights for the random-checkpoint writers of both families (``bitdance make-checkpoint``).

Every tensor is drawn from one seeded generator in state-dict order, so a preset and a seed name one checkpoint.
"""

from __future__ import annotations

import math

import torch

LLM_STD = 0.02
BIAS_STD = 0.02


def _std(key: str, shape: tuple[int, ...], llm: bool) -> float | None:
    """None: fill with ones (norm scales); else the normal std for this tensor."""
    if len(shape) == 1:
        return None if key.endswith("weight") else BIAS_STD
    if llm:
        return LLM_STD
    return 1.0 / math.sqrt(math.prod(shape[1:]))


def random_tensor(key: str, shape: tuple[int, ...], llm: bool, gen: torch.Generator, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """A seeded random tensor for state-dict entry ``key``: norm scales 1, biases ~ N(0, 0.02), LLM matrices
    ~ N(0, 0.02), other matrices ~ N(0, 1/sqrt(fan_in)); drawn from ``gen`` (the same draws on every device)."""
    std = _std(key, shape, llm)
    if std is None:
        return torch.ones(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.normal_(0.0, std, generator=gen)
