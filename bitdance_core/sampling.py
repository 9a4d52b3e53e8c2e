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

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

LAST_STEP = 0.05


@dataclass(frozen=True)
class Schedule:
    """The time grid of one step count, with every per-step scalar precomputed (0-d float32 tensors,
    the same values the reference computes inside its loop)."""

    t: tuple[torch.Tensor, ...]  # time of evaluation i = 0..S (the last is the final 0.95 step)
    dt: tuple[torch.Tensor, ...]
    one_minus_t: tuple[torch.Tensor, ...]
    var: tuple[torch.Tensor, ...]  # (1 - t)^2 + t (1 - t): variance of the linear path
    noise_scale: tuple[torch.Tensor, ...]  # sqrt(2 (1 - t) dt)
    denom: tuple[torch.Tensor, ...]  # max(1 - t, 0.05), the x-prediction -> velocity divisor

    @property
    def t_values(self) -> torch.Tensor:
        """(S + 1,) float32: feed to the head's time embedding once per step count."""
        return torch.stack(self.t)


def time_increments(steps: int, time_shift: float = 1.0, device=None) -> torch.Tensor:
    """dt_i of the shifted grid ``linspace(0, 1 - 0.05, steps + 1)``, float32 (steps,)."""
    t = torch.linspace(0, 1 - LAST_STEP, steps + 1, device=device, dtype=torch.float32)
    t = (1 / time_shift) / ((1 / time_shift) + (1 / t - 1) ** 1.0)
    return t[1:] - t[:-1]


def make_schedule(steps: int, time_shift: float, device: str) -> Schedule:
    """A new schedule; its owner keeps it alive (a CUDA graph that reads it must own it: the engine's
    runner does not use the cache of :func:`schedule`, whose entries can be freed at any time)."""
    dts = time_increments(steps, time_shift, device=device)
    t = torch.tensor(0.0, device=device, dtype=torch.float32)
    ts, dt, omt, var, ns, den = [], [], [], [], [], []
    for i in range(steps):
        sigma = 1 - t
        ts.append(t.clone()), dt.append(dts[i]), omt.append(sigma)
        var.append(sigma**2 - t * -1 * sigma)
        ns.append((2.0 * (1.0 - t) * dts[i]) ** 0.5)
        den.append(sigma.clamp_min(LAST_STEP))
        t = t + dts[i]
    final = torch.tensor(1 - LAST_STEP, device=device, dtype=torch.float32)
    ts.append(final)
    den.append((1 - final).clamp_min(LAST_STEP))
    return Schedule(tuple(ts), tuple(dt), tuple(omt), tuple(var), tuple(ns), tuple(den))


@functools.lru_cache(maxsize=64)
def schedule(steps: int, time_shift: float, device: str) -> Schedule:
    """:func:`make_schedule`, cached for eager callers (the single-request pipeline)."""
    return make_schedule(steps, time_shift, device)


def _guided_velocity(v: torch.Tensor, n: int, cfg_idx, g: torch.Tensor | None, all_cfg: bool) -> torch.Tensor:
    v_c = v[:n]
    if g is None:
        return v_c
    v_u = v[n:]
    if all_cfg:
        return v_u + g * (v_c - v_u)
    guided = v_u + g * (v_c[cfg_idx] - v_u)
    out = v_c.clone()
    out[cfg_idx] = guided
    return out


def euler_maruyama(
    predict: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    noise: Callable[[], torch.Tensor],
    guidance: list[float],
    steps: int,
    time_shift: float = 1.0,
    device=None,
) -> torch.Tensor:
    """Sample one block for ``len(guidance)`` samples; returns the float32 state ``(n, P, C)``.

    ``predict(x_rows, t_rows, i)`` gets the evaluation index ``i`` (0..steps) too, so a caller can
    look the time embedding up in a table built once per step count.
    """
    n = len(guidance)
    cfg = [i for i, g in enumerate(guidance) if g > 1.0]
    x = noise().to(device=device, dtype=torch.float32)
    device = x.device
    all_cfg = len(cfg) == n
    cfg_idx = g = None
    if cfg:
        if all_cfg and len(set(guidance)) == 1:
            g = torch.tensor(guidance[0], dtype=torch.float32)
            g = g.to(device)
        else:
            g = _to_device(torch.tensor([guidance[i] for i in cfg], dtype=torch.float32), device)[:, None, None]
        cfg_idx = None if all_cfg else _to_device(torch.tensor(cfg), device)
    rows = n + len(cfg)
    sch = schedule(steps, float(time_shift), str(device))

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        if all_cfg:
            x_rows = torch.cat([x, x])
        else:
            x_rows = torch.cat([x, x[cfg_idx]]) if cfg_idx is not None else x
        out = predict(x_rows, sch.t[i].expand(rows), i).float()
        v = (out - x_rows) / sch.denom[i]
        return _guided_velocity(v, n, cfg_idx, g, all_cfg)

    for i in range(steps):
        v = velocity(x, i)
        # score of the linear path (alpha_t = t, sigma_t = 1 - t), then the SDE drift
        score = (sch.t[i] * v - x) / sch.var[i]
        drift = v + sch.one_minus_t[i] * score
        x = x + drift * sch.dt[i] + sch.noise_scale[i] * noise().to(device=device, dtype=torch.float32)
    return x + velocity(x, steps) * LAST_STEP


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor to the device without a stream sync on CUDA (pinned, non-blocking)."""
    from .device import to_device

    return to_device(t, device)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """±1 tokens (``sign``; an exact 0 stays 0 as in the reference, with negligible probability)."""
    return torch.sign(x)


@dataclass
class RowGuidance:
    """Rows and samples of a fixed-shape sampler call (persistent device buffers).

    The sampler's state has one entry per *sample*; the network sees one entry per *row*:
    ``x_rows = x[state_index]``. A guided sample owns a cond row and an uncond row (both read its
    state) and steps with ``v[u] + scale (v[c] - v[u])``, ``c = cond_index[s]``,
    ``u = uncond_index[s]``; an unguided sample owns one row and points at it twice, which gives its
    own ``v`` exactly (``v + s * 0``), so one formula without a branch serves every sample.
    ``index`` maps rows to KV slots (used by the runner, not by the sampler)."""

    index: torch.Tensor  # (rows,) long
    state_index: torch.Tensor  # (rows,) long: the sample each row reads
    cond_index: torch.Tensor  # (samples,) long
    uncond_index: torch.Tensor  # (samples,) long
    scale: torch.Tensor  # (samples, 1, 1) float32

    def slice(self, rows: int, samples: int) -> RowGuidance:
        return RowGuidance(self.index[:rows], self.state_index[:rows], self.cond_index[:samples],
                           self.uncond_index[:samples], self.scale[:samples])


def sample_rows(
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    noise: torch.Tensor,
    rows: RowGuidance,
    sch: Schedule,
) -> torch.Tensor:
    """Fixed-shape Euler–Maruyama; returns the float32 state ``(samples, P, C)``.

    ``noise`` ``(S + 1, samples, P, C)`` holds every draw of the loop (the initial state first),
    already drawn in the reference's order. The arithmetic per element is the reference's
    (:func:`euler_maruyama`). No host sync and no data-dependent shape: the loop can be captured
    as one CUDA graph.
    """
    steps = noise.shape[0] - 1

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        x_rows = x.index_select(0, rows.state_index)
        v = (predict(x_rows, i).float() - x_rows) / sch.denom[i]
        v_c, v_u = v.index_select(0, rows.cond_index), v.index_select(0, rows.uncond_index)
        return v_u + rows.scale * (v_c - v_u)

    x = noise[0]
    for i in range(steps):
        v = velocity(x, i)
        score = (sch.t[i] * v - x) / sch.var[i]
        drift = v + sch.one_minus_t[i] * score
        x = x + drift * sch.dt[i] + sch.noise_scale[i] * noise[i + 1]
    return x + velocity(x, steps) * LAST_STEP
