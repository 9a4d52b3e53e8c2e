"""Euler–Maruyama sampling of one block of binary tokens, with time shift and CFG.

Pure functions over torch tensors; the network is passed in as ``predict(x_rows, t_rows) ->
x_hat_rows``. The arithmetic follows the reference term by term (same operation order in
float32) so that a seeded run reproduces its bits.

Rows. ``x`` holds one row per *sample* (an image's block). The network sees those rows first
(conditional), then one unconditional row for each sample with guidance > 1, taking the same
state (the reference's ``cat([x] * 2)``). Samples of different requests share a call as long as
they share the step count; each sample has its own guidance.

Noise. ``noise()`` returns a fresh ``(samples, P, C)`` draw: once for the initial state, then once
per Euler–Maruyama step (none for the final deterministic step), exactly the reference's order.
The caller draws each request's part from that request's own ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LAST_STEP = 0.05


def time_increments(steps: int, time_shift: float = 1.0, device=None) -> torch.Tensor:
    """dt_i of the shifted grid ``linspace(0, 1 - 0.05, steps + 1)``, float32 (steps,)."""
    t = torch.linspace(0, 1 - LAST_STEP, steps + 1, device=device, dtype=torch.float32)
    t = (1 / time_shift) / ((1 / time_shift) + (1 / t - 1) ** 1.0)
    return t[1:] - t[:-1]


def _guided_velocity(v: torch.Tensor, n: int, cfg_idx: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor:
    v_c = v[:n]
    if cfg_idx is None:
        return v_c
    v_u = v[n:]
    guided = v_u + g * (v_c[cfg_idx] - v_u)
    if cfg_idx.numel() == n:
        return guided
    out = v_c.clone()
    out[cfg_idx] = guided
    return out


def euler_maruyama(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: Callable[[], torch.Tensor],
    guidance: list[float],
    steps: int,
    time_shift: float = 1.0,
    device=None,
) -> torch.Tensor:
    """Sample one block for ``len(guidance)`` samples; returns the float32 state ``(n, P, C)``."""
    n = len(guidance)
    cfg = [i for i, g in enumerate(guidance) if g > 1.0]
    x = noise().to(device=device, dtype=torch.float32)
    device = x.device
    cfg_idx = g = None
    if cfg:
        cfg_idx = _to_device(torch.tensor(cfg), device)
        g = _to_device(torch.tensor([guidance[i] for i in cfg], dtype=torch.float32), device)[:, None, None]
    rows = n + len(cfg)
    dt = time_increments(steps, time_shift, device=device)
    t = torch.tensor(0.0, device=device, dtype=torch.float32)
    t_rows = torch.zeros(rows, device=device, dtype=torch.float32)

    def velocity(x: torch.Tensor) -> torch.Tensor:
        x_rows = torch.cat([x, x[cfg_idx]]) if cfg_idx is not None else x
        out = predict(x_rows, t_rows).float()
        v = (out - x_rows) / (1 - t_rows.view(-1, 1, 1)).clamp_min(LAST_STEP)
        return _guided_velocity(v, n, cfg_idx, g)

    for i in range(steps):
        t_rows[:] = t
        v = velocity(x)
        # score of the linear path (alpha_t = t, sigma_t = 1 - t), then the SDE drift
        sigma = 1 - t
        var = sigma**2 - t * -1 * sigma
        score = (t * v - x) / var
        drift = v + (1 - t) * score
        noise_scale = (2.0 * (1.0 - t) * dt[i]) ** 0.5
        x = x + drift * dt[i] + noise_scale * noise().to(device=device, dtype=torch.float32)
        t += dt[i]
    t_rows[:] = 1 - LAST_STEP
    return x + velocity(x) * LAST_STEP


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor to the device without a stream sync on CUDA (pinned, non-blocking)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """±1 tokens (``sign``; an exact 0 stays 0 as in the reference, with negligible probability)."""
    return torch.sign(x)
