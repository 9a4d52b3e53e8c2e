"""Binary autoencoder (spec §2.2, §2.5, §3.1-3.5), weight-compatible with ``ae.safetensors``.

The encoder maps an image in [-1, 1] to a ``z_channels`` latent at 1/f resolution; quantisation is the sign
(value > 0 -> +1, else -1). The decoder maps a +-1 latent back to pixels; every AdaptiveGroupNorm is styled by
the unmodified latent. Modules run in the dtype of their parameters: inputs are cast to it, no autocast.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DDCONFIG_KEYS = frozenset(
    {"ch", "out_ch", "in_channels", "num_res_blocks", "z_channels", "ch_mult", "resolution", "double_z"}
)
_GN_GROUPS = 32
_GN_EPS = 1e-6


def _group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(_GN_GROUPS, channels, eps=_GN_EPS, affine=affine)


def depth_to_space(x: torch.Tensor, block: int = 2) -> torch.Tensor:
    """DCR depth-to-space: ``b (p1 p2 c) h w -> b c (h p1) (w p2)``. Not ``pixel_shuffle`` (CRD order)."""
    b, cp, h, w = x.shape
    c = cp // (block * block)
    x = x.view(b, block, block, c, h, w).permute(0, 3, 4, 1, 5, 2)  # b c h p1 w p2
    return x.reshape(b, c, h * block, w * block)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output → (B, H, W, 3) uint8, ``clamp(127.5 x + 128)`` truncated."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        return torch.where(h > 0, 1.0, -1.0).to(h.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x if self.nin_shortcut is None else self.nin_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(F.silu(self.norm2(x)))
        return x + r


class Upsampler(nn.Module):
    """3x3 conv c -> 4c, then DCR depth-to-space (x2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, 4 * ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """``gamma(sigma) * GN(x) + beta(mu)``; sigma/mu are per-channel spatial stats of the latent ``style``."""

    def __init__(self, z_channels: int, ch: int):
        super().__init__()
        self.gn = _group_norm(ch, affine=False)
        self.gamma = nn.Linear(z_channels, ch)
        self.beta = nn.Linear(z_channels, ch)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = style.flatten(2)
        sigma = torch.sqrt(torch.var(s, dim=-1) + 1e-6)  # unbiased (n - 1), as the reference
        mu = s.mean(dim=-1)
        scale = self.gamma(sigma)[:, :, None, None]
        bias = self.beta(mu)[:, :, None, None]
        return scale * self.gn(x) + bias


class _Level(nn.Module):
    """One resolution level: ``block.{j}`` plus an optional ``downsample`` / ``upsample``."""

    def __init__(
        self, blocks: list[nn.Module], downsample: nn.Module | None = None, upsample: nn.Module | None = None
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample
        self.upsample = upsample


def _res_blocks(in_ch: int, out_ch: int, n: int) -> list[nn.Module]:
    return [ResBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(n)]


class Encoder(nn.Module):
    def __init__(self, *, ch, out_ch, in_channels, num_res_blocks, z_channels, ch_mult):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            blocks = _res_blocks(block_in, ch * mult, num_res_blocks)
            block_in = ch * mult
            last = i == len(ch_mult) - 1
            down = None if last else nn.Conv2d(block_in, block_in, 3, stride=2, padding=1)
            self.down.append(_Level(blocks, downsample=down))
        self.mid_block = nn.ModuleList(_res_blocks(block_in, block_in, num_res_blocks))
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                x = blk(x)
            if level.downsample is not None:
                x = level.downsample(x)
        for blk in self.mid_block:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Plain decoder; ``GANDecoder`` concatenates Gaussian noise to the latent before ``conv_in``."""

    noise_channels_mult = 1

    def __init__(self, *, ch, out_ch, in_channels, num_res_blocks, z_channels, ch_mult):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(self.noise_channels_mult * z_channels, block_in, 3, padding=1)
        self.mid_block = nn.ModuleList(_res_blocks(block_in, block_in, num_res_blocks))
        levels: dict[int, nn.Module] = {}
        adaptive: dict[int, nn.Module] = {}
        for i in reversed(range(len(ch_mult))):  # level i's AdaptiveGroupNorm sees its input width
            adaptive[i] = AdaptiveGroupNorm(z_channels, block_in)
            blocks = _res_blocks(block_in, ch * ch_mult[i], num_res_blocks)
            block_in = ch * ch_mult[i]
            levels[i] = _Level(blocks, upsample=Upsampler(block_in) if i > 0 else None)
        self.up = nn.ModuleList(levels[i] for i in range(len(ch_mult)))
        self.adaptive = nn.ModuleList(adaptive[i] for i in range(len(ch_mult)))
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def _conv_in(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.conv_in(z)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        style = z
        x = self._conv_in(z, generator)
        for blk in self.mid_block:
            x = blk(x)
        for i in reversed(range(len(self.up))):
            x = self.adaptive[i](x, style)
            level = self.up[i]
            for blk in level.block:
                x = blk(x)
            if level.upsample is not None:
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class GANDecoder(Decoder):
    noise_channels_mult = 2

    def _conv_in(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return self.conv_in(torch.cat([z, noise], dim=1))


class BinaryAutoencoder(nn.Module):
    """``encoder.*`` / ``decoder.*`` exactly as in ``ae.safetensors``.

    ``with_encoder=False`` / ``with_decoder=False`` omit that half (its keys must then be filtered out
    before a strict load); the T2I pipeline only needs the decoder.
    """

    def __init__(
        self,
        ddconfig: dict,
        gan_decoder: bool = False,
        with_encoder: bool = True,
        with_decoder: bool = True,
    ):
        super().__init__()
        unknown = sorted(set(ddconfig) - DDCONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown ddconfig key(s) {unknown}; accepted: {sorted(DDCONFIG_KEYS)}")
        arch = {k: ddconfig[k] for k in DDCONFIG_KEYS - {"resolution", "double_z"}}  # KeyError if missing
        arch["ch_mult"] = tuple(arch["ch_mult"])
        self.ch_mult = arch["ch_mult"]
        self.arch = dict(arch)
        self.z_channels = int(arch["z_channels"])
        self.gan_decoder = bool(gan_decoder)
        self.encoder = Encoder(**arch) if with_encoder else None
        decoder_cls = GANDecoder if gan_decoder else Decoder
        self.decoder = decoder_cls(**arch) if with_decoder else None

    def add_encoder(self, state: dict[str, torch.Tensor], what: str = "autoencoder") -> None:
        """Build the encoder and fill it strictly from ``state`` (its ``encoder.*`` tensors; other keys are
        ignored), on the decoder's device and dtype: for a model loaded with ``with_encoder=False``."""
        ref = next(self.parameters())
        with torch.device("meta"):
            encoder = Encoder(**self.arch)
        want = {"encoder." + k: v.shape for k, v in encoder.state_dict().items()}
        missing = sorted(set(want) - set(state))
        unexpected = sorted(k for k in state if k.startswith("encoder.") and k not in want)
        if missing or unexpected:
            raise ValueError(f"{what}: encoder tensors missing {missing[:8]}, unexpected {unexpected[:8]}")
        for k, shape in want.items():
            if tuple(state[k].shape) != tuple(shape):
                raise ValueError(f"{what}: {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")
        encoder.load_state_dict({k[len("encoder."):]: state[k].to(ref.device, ref.dtype) for k in want},
                                strict=True, assign=True)
        self.encoder = encoder.eval().requires_grad_(False)

    @staticmethod
    def encoder_parameters(ddconfig: dict) -> int:
        """Parameters of the encoder a ``ddconfig`` describes (built on the meta device: nothing allocated)."""
        arch = {k: ddconfig[k] for k in DDCONFIG_KEYS - {"resolution", "double_z"}}
        arch["ch_mult"] = tuple(arch["ch_mult"])
        with torch.device("meta"):
            return sum(p.numel() for p in Encoder(**arch).parameters())

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @staticmethod
    def quantize_ste(h: torch.Tensor) -> torch.Tensor:
        """Sign quantisation (> 0 -> +1, else -1) with a straight-through (identity) gradient."""
        return _SignSTE.apply(h)

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> pre-quantisation latent (B, z, H/f, W/f)."""
        if self.encoder is None:
            raise RuntimeError("this BinaryAutoencoder was built with with_encoder=False")
        return self.encoder(x.to(self.encoder.conv_in.weight.dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> +-1 latent (an exact 0 maps to -1, spec §3.3)."""
        h = self.encode_continuous(x)
        return torch.where(h > 0, 1.0, -1.0).to(h.dtype)

    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """+-1 latent (B, z, h, w) -> image (B, 3, f*h, f*w), nominally in [-1, 1] (no clamp)."""
        if self.decoder is None:
            raise RuntimeError("this BinaryAutoencoder was built with with_decoder=False")
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype), generator=generator)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-style reconstruction: encode, STE-quantise, decode."""
        return self.decode(self.quantize_ste(self.encode_continuous(x)), generator=generator)
