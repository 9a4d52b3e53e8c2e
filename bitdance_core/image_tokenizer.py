"""The binary tokenizer's torch half: image <-> binary tokens with a loaded autoencoder.

``ImageTokenizer`` wraps a :class:`~bitdance_core.models.autoencoder.BinaryAutoencoder` (with its encoder)
and a :class:`~bitdance_core.tokenize.TokenizerSpec`. Encoding follows the official code: pixels
``(u8 / 255 - 0.5) * 2`` in float32, the encoder, sign quantisation (> 0 -> +1, else -1), then the latent grid
as a sequence in patch order (``vt_forward``'s ``(h p1)(w p2) -> (h w p1 p2)``). Decoding is the served
pipeline's (``unpatchify``, decoder, ``clamp(127.5 x + 128)`` truncated).

Sources of an autoencoder:

* a generator already loaded (``for_model``): its autoencoder, plus the encoder read from the same files
  (text-to-image ``ae.safetensors``; class-conditional ``--vae`` file or the checkpoint's ``vae.*``);
* a file alone (``load_autoencoder``): ``*.safetensors`` (official ``ae.safetensors`` keys) with its JSON
  config (``{"ddconfig", "gan_decoder"}``: ``--ae-config``, else ``<stem>_config.json``, ``<stem>.json``,
  ``ae_config.json`` or ``config.json`` beside it; ``_*`` keys are ignored), or an ImageNet ``ae*.pt``
  (``{"state_dict"}``; architecture read from the config if given, else from the tensor shapes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .device import resolve
from .models.autoencoder import BinaryAutoencoder, to_uint8
from .models.projector import patchify, unpatchify_tokens
from .tokenize import DEFAULT_MAX_SIDE, TokenizerSpec

logger = logging.getLogger(__name__)
CONFIG_NAMES = ("{stem}_config.json", "{stem}.json", "ae_config.json", "config.json")


class ImageTokenizer:
    def __init__(self, ae: BinaryAutoencoder, spec: TokenizerSpec, name: str = "autoencoder"):
        if ae.encoder is None or ae.decoder is None:
            raise ValueError("the tokenizer needs the autoencoder's encoder and decoder")
        self.ae, self.spec, self.name = ae, spec, name
        self.device = next(ae.parameters()).device

    @torch.no_grad()
    def tokenize(self, image: np.ndarray, patch_size: int | None = None) -> np.ndarray:
        """uint8 ``(H, W, 3)`` -> int8 ``(N, C)`` of +-1 in patch order."""
        ps = patch_size or self.spec.patch_size
        x = torch.tensor(np.asarray(image, np.uint8), device=self.device).permute(2, 0, 1)[None]
        x = (x.float() / 255.0 - 0.5) * 2
        z = self.ae.encode(x)[0]  # (C, h, w) of +-1
        return patchify(z.permute(1, 2, 0), ps).to(torch.int8).cpu().numpy()

    @torch.no_grad()
    def detokenize(self, tokens: np.ndarray, height: int, width: int, patch_size: int | None = None,
                   seed: int = 0) -> np.ndarray:
        """int8 ``(N, C)`` of +-1 in patch order -> uint8 ``(height, width, 3)``."""
        ps = patch_size or self.spec.patch_size
        f = self.spec.downsample
        t = torch.from_numpy(np.asarray(tokens, np.float32)).to(self.device)[None]
        latent = unpatchify_tokens(t, height // f, width // f, ps)
        gen = torch.Generator(self.device).manual_seed(seed) if self.ae.gan_decoder else None
        return to_uint8(self.ae.decode(latent.to(self.ae.dtype), generator=gen))[0]

    @property
    def encoder_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.ae.encoder.parameters())

    # ---- sources --------------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, sizes: tuple[tuple[int, int], ...] | None) -> ImageTokenizer:
        """A loaded generator's autoencoder; its encoder is read now if the load skipped it."""
        attach_encoder(model)
        ae, cfg = model.ae, model.config
        spec = TokenizerSpec(ae.downsample_factor, ae.z_channels, int(cfg.patch_side), sizes,
                             gan_decoder=ae.gan_decoder)
        return cls(ae, spec, cfg.name)

    @classmethod
    def from_file(cls, path: str | Path, config: str | Path | None = None, device: str | None = None,
                  dtype: str | None = None, max_side: int = DEFAULT_MAX_SIDE) -> ImageTokenizer:
        ae = load_autoencoder(path, config, device, dtype)
        spec = TokenizerSpec(ae.downsample_factor, ae.z_channels, 1, None, max_side, ae.gan_decoder)
        return cls(ae, spec, Path(path).stem)


def attach_encoder(model) -> None:
    """Give a loaded generator's autoencoder its encoder (read from the files it came from) if it has none."""
    if model.ae.encoder is None:
        model.ae.add_encoder(model.encoder_state(), what="encoder")


def find_config(path: Path, config: str | Path | None) -> Path | None:
    if config is not None:
        if not Path(config).is_file():
            raise FileNotFoundError(f"autoencoder config {config}: no such file")
        return Path(config)
    for pattern in CONFIG_NAMES:
        cand = path.with_name(pattern.format(stem=path.stem))
        if cand.is_file():
            return cand
    return None


def load_autoencoder(path: str | Path, config: str | Path | None = None, device: str | None = None,
                     dtype: str | None = None) -> BinaryAutoencoder:
    """A lone autoencoder file, encoder and decoder, strictly (a missing or unexpected key is an error)."""
    path = Path(path)
    cfg_path = find_config(path, config)
    cfg = None
    if cfg_path is not None:
        raw = json.loads(cfg_path.read_text())
        cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
        if "ddconfig" not in cfg:
            raise ValueError(f"{cfg_path}: no 'ddconfig' (an autoencoder config holds ddconfig and gan_decoder)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if cfg is None:
            raise FileNotFoundError(f"{path.name}: no autoencoder config beside it (tried "
                                    f"{', '.join(p.format(stem=path.stem) for p in CONFIG_NAMES)}); give --ae-config")
        state = load_file(str(path))
    else:
        from .families.class_conditional.loader import load_pickle

        obj = load_pickle(path)
        state = obj.get("state_dict") if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path.name}: expected a {{'state_dict': ...}} autoencoder file")
        state = {k: v for k, v in state.items() if not k.startswith("quantize.")}  # GFQ buffers: unused
        if cfg is None:
            from .families.class_conditional.resolve import ddconfig_from_shapes

            cfg = {"ddconfig": ddconfig_from_shapes(state, path.name), "gan_decoder": False}
    unknown = sorted(set(cfg) - {"ddconfig", "gan_decoder", "checkpoint", "num_codebooks"})
    if unknown:
        raise ValueError(f"autoencoder config: unknown key(s) {unknown}")
    placement = resolve(device, dtype)
    with torch.device("meta"):
        ae = BinaryAutoencoder(dict(cfg["ddconfig"]), gan_decoder=bool(cfg.get("gan_decoder", False)))
    want = set(ae.state_dict())
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ValueError(f"{path.name}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for k, v in ae.state_dict().items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{path.name}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    ae.load_state_dict({k: state[k].to(placement.device, placement.dtype) for k in want}, strict=True, assign=True)
    logger.info("loaded autoencoder %s (f=%d, %d bits per token) on %s (%s)", path.name, ae.downsample_factor,
                ae.z_channels, placement.device, placement.dtype)
    return ae.eval().requires_grad_(False)
