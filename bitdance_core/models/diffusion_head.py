"""The binary diffusion head network (spec §2.3, §2.6, §5.1-5.2), weight-compatible with
``vision_head.safetensors`` (keys ``net.*``, SwiGLU and MLP variants).

Per AR step the condition projection ``cond_embed(c)`` is fixed; the sampler evaluates the net ~S+1 times
with a new ``x`` and ``t``. So the API splits it: ``condition(c)`` once per AR step, then
``predict(x, t, cond_emb)`` per sampler evaluation. Activations run in the parameter dtype; LayerNorms and
the timestep embedding are computed in float32; the output x-prediction ``2*sigmoid(o) - 1`` is float32.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from bitdance_core.models.attention import attention

logger = logging.getLogger(__name__)

HEAD_DIM = 128
FREQ_DIM = 256
TIME_FACTOR = 1000.0
LN_EPS = 1e-6
TRAINING_ONLY_KEYS = frozenset({"time_schedule", "P_mean", "P_std", "diff_batch_mul", "grad_checkpointing"})


def _frequencies(device: torch.device | str | None = None) -> torch.Tensor:
    half = FREQ_DIM // 2
    k = torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(-math.log(10000.0) * k / half)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm | None, dim: int) -> torch.Tensor:
    """LayerNorm computed in float32, cast back to ``x``'s dtype."""
    w = b = None
    if norm is not None:
        w, b = norm.weight.float(), norm.bias.float()
    return F.layer_norm(x.float(), (dim,), w, b, LN_EPS).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """t (R,) in [0, 1] -> (R, Dh): [cos | sin] of (1000 t) * freqs, then Linear-SiLU-Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        # Not in the state dict. Re-made (exactly, in float32) if a .to() cast it or it sits on another device
        # (e.g. built on meta and loaded with assign=True).
        self.register_buffer("freqs", _frequencies(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.freqs
        if freqs.device != t.device or freqs.dtype != torch.float32:
            freqs = self.freqs = _frequencies(t.device)
        a = (TIME_FACTOR * t.float())[:, None] * freqs[None]
        emb = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int = HEAD_DIM):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, p, d = x.shape
        q, k, v = self.wqkv(x).view(r, p, 3, self.heads, self.head_dim).unbind(2)
        return self.wo(attention(q, k, v).reshape(r, p, d))


class TransBlock(nn.Module):
    def __init__(self, dim: int, use_swiglu: bool, head_dim: int = HEAD_DIM):
        super().__init__()
        hidden = int(1.5 * dim)
        self.dim = dim
        self.use_swiglu = use_swiglu
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        if use_swiglu:
            self.w1 = nn.Linear(dim, 2 * hidden)
            self.w2 = nn.Linear(hidden, dim)
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scale1, shift1, gate1, scale2, shift2, gate2 = mod
        a = _layer_norm(x, self.norm1, self.dim) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(a)
        m = _layer_norm(x, self.norm2, self.dim) * (1 + scale2) + shift2
        if self.use_swiglu:
            u, v = self.w1(m).chunk(2, dim=-1)
            return x + gate2 * self.w2(F.silu(u) * v)
        return x + gate2 * self.mlp(m)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.dim = dim
        self.ada_ln_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(_layer_norm(x, None, self.dim) * (1 + scale) + shift)


class _Net(nn.Module):
    def __init__(self, ch_target, ch_cond, dim, depth, n_adaln, use_swiglu):
        super().__init__()
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Linear(ch_cond, dim)
        self.input_proj = nn.Linear(ch_target, dim)
        self.res_blocks = nn.ModuleList(TransBlock(dim, use_swiglu) for _ in range(depth))
        self.ada_ln_blocks = nn.ModuleList(nn.Linear(dim, 6 * dim) for _ in range(n_adaln))
        self.final_layer = FinalLayer(dim, ch_target)


class HeadAPI(nn.Module):
    """What the sampler and the engine call on a head, shared by every family's heads: ``condition`` once
    per AR step, ``time_table`` once per step count, ``predict`` per sampler evaluation. A subclass sets
    ``net`` (time_embed, cond_embed, input_proj, res_blocks, ada_ln_blocks, final_layer), ``k_sw`` (blocks
    per adaLN projection) and ``n_mod`` (modulation chunks), and maps the final layer's output in
    ``output``."""

    n_mod = 6

    @property
    def dtype(self) -> torch.dtype:
        return self.net.input_proj.weight.dtype

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        """(R, P, ch_cond) condition -> (R, P, Dh) ``cond_embed(c)``; reuse it for every sampler step."""
        return self.net.cond_embed(c.to(self.dtype))

    def time_table(self, t: torch.Tensor) -> torch.Tensor:
        """(K,) times -> (K, Dh) time embeddings; the sampler's times repeat every AR step, so build once."""
        return self.net.time_embed(t)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor,
                t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (R, P, C), t (R,), cond_emb from ``condition`` -> float32 x-prediction (R, P, C)."""
        net = self.net
        h = net.input_proj(x.to(self.dtype))
        te = net.time_embed(t)[:, None, :] if t_emb is None else t_emb.view(-1, 1, t_emb.shape[-1])
        y = F.silu(te + cond_emb)
        mod: tuple[torch.Tensor, ...] = ()
        for i, block in enumerate(net.res_blocks):
            if i % self.k_sw == 0:
                mod = net.ada_ln_blocks[i // self.k_sw](y).chunk(self.n_mod, dim=-1)
            h = block(h, mod)
        return self.output(net.final_layer(h, y))

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return o.float()

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``net(x, t, c)`` of the reference (the module check's entry point)."""
        return self.predict(x, t, self.condition(c))


class DiffusionHead(HeadAPI):
    """``DiffHead`` and its ``net`` (``TransEncoder``); build as ``DiffusionHead(**vision_head_config)``."""

    def __init__(
        self,
        ch_target: int,
        ch_cond: int,
        ch_latent: int,
        depth_latent: int,
        depth_adanln: int,
        use_swiglu: bool = True,
        time_shift: float = 1.0,
        parallel_num: int = 1,
        **training_only_keys,
    ):
        super().__init__()
        unknown = sorted(set(training_only_keys) - TRAINING_ONLY_KEYS)
        if unknown:
            raise ValueError(f"unknown diffusion head config key(s): {unknown}")
        if ch_latent % HEAD_DIM:
            raise ValueError(f"ch_latent={ch_latent} must be a multiple of the head dim {HEAD_DIM}")
        self.k_sw = max(1, depth_latent // depth_adanln)
        if depth_latent % self.k_sw or (depth_latent - 1) // self.k_sw >= depth_adanln:
            raise ValueError(f"depth_latent={depth_latent} does not fit depth_adanln={depth_adanln}")
        self.ch_target = ch_target
        self.ch_latent = ch_latent
        self.parallel_num = parallel_num
        self.time_shift = float(time_shift)
        self.net = _Net(ch_target, ch_cond, ch_latent, depth_latent, depth_adanln, bool(use_swiglu))

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """The x-prediction in (-1, 1)."""
        return 2 * torch.sigmoid(o.float()) - 1
