"""Progressive previews of a partial token grid.

Two methods, chosen per model by measurement at engine start (``choose_method``):

* ``full``: the autoencoder decodes the partial latent (tokens not yet sampled are 0). Exact for
  the finished area, costs one decode per preview.
* ``linear``: a per-token linear map from the C bits to the mean RGB of that token's f×f pixel
  block, fitted once by least squares on decodes of random token grids (like the latent-to-RGB
  factors ComfyUI uses for previews). Costs a tiny matmul; each token becomes one flat f×f block,
  so the preview has the size of the final image.

``auto`` measures one full decode against one engine step of the same size and keeps ``full``
only when the previews of an image (about ``T / preview_every`` of them) would add less than
``budget`` (10%) to its generation time.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def default_preview_every(total_steps: int, previews: int = 8) -> int:
    """Every ``T // previews`` AR steps: about ``previews`` images per request, the last being the final one."""
    return max(1, total_steps // previews)


class PreviewRenderer:
    def __init__(self, ae, latent, z_channels: int, downsample: int, method: str = "auto"):
        """``latent(tokens, h, w)``: the model family's un-patchify, ``(B, h*w, C)`` -> ``(B, C, h, w)``."""
        self.ae, self.latent, self.c, self.f = ae, latent, z_channels, downsample
        self.method = method
        self.linear: torch.Tensor | None = None  # (C + 1, 3)

    @torch.inference_mode()
    def fit_linear(self, grid: int = 8, samples: int = 8, seed: int = 0) -> None:
        """Least-squares fit of bits → mean RGB of each token's pixel block, on random token grids."""
        dev = next(self.ae.parameters()).device
        g = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randint(0, 2, (samples, self.c, grid, grid), generator=g).float() * 2 - 1
        img = self.ae.decode(z.to(device=dev, dtype=self.ae.dtype)).float().cpu()  # (S, 3, H, W)
        rgb = F.avg_pool2d(img, self.f)  # (S, 3, grid, grid)
        x = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, self.c), torch.ones(samples * grid * grid, 1)], dim=1)
        y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
        self.linear = torch.linalg.pinv(x) @ y  # (C + 1, 3) least squares (pinv: fixed shapes, so fake tensors too)

    @torch.inference_mode()
    def render(self, tokens: torch.Tensor, h: int, w: int) -> np.ndarray:
        """tokens (B, N, C) with unsampled tokens 0 → (B, H', W', 3) uint8."""
        if self.method == "linear":
            if self.linear is None:
                self.fit_linear()
            lat = self.latent(tokens.float().cpu(), h, w)  # (B, C, h, w)
            x = torch.cat([lat.permute(0, 2, 3, 1), torch.ones(*lat.shape[:1], h, w, 1)], dim=-1)
            rgb = (x @ self.linear).clamp(-1, 1)  # (B, h, w, 3)
            img = F.interpolate(rgb.permute(0, 3, 1, 2), scale_factor=self.f, mode="nearest")
        else:
            lat = self.latent(tokens, h, w)
            img = self.ae.decode(lat.to(self.ae.dtype)).float()
        return torch.clamp(127.5 * img + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()

    def choose_method(self, step_s: float, total_steps: int, preview_every: int, h: int, w: int,
                      budget: float = 0.10) -> str:
        """Resolve ``auto``: keep the full decode if its previews cost < ``budget`` of generation."""
        if self.method != "auto":
            return self.method
        dev = next(self.ae.parameters()).device
        tokens = torch.zeros(1, h * w, self.c, device=dev)
        self.method = "full"
        self.render(tokens, h, w)  # warm
        t0 = time.perf_counter()
        self.render(tokens, h, w)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        decode_s = time.perf_counter() - t0
        previews = max(1, (total_steps - 1) // max(1, preview_every))
        # NOTE: measured for one request; in a batch the step is shared but every request pays its own
        # previews, so ``full`` survives only when it is cheap for a lone request.
        share = previews * decode_s / max(1e-9, total_steps * step_s)
        self.method = "full" if share <= budget else "linear"
        if self.method == "linear":
            self.fit_linear()
        logger.info("preview method %s: full decode %.1f ms, step %.1f ms, %d previews -> %.1f%% of generation",
                    self.method, decode_s * 1e3, step_s * 1e3, previews, share * 100)
        return self.method
