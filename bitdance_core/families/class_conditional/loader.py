"""Strict loading of a released class-conditional checkpoint (``BitDance_{B,L,H}_{1,4,16}x.pt`` + ``ae_d16c32.pt``).

* ``torch.load(weights_only=True, mmap=True)`` with only ``argparse.Namespace`` allow-listed (the released files'
  ``args``); a file that needs anything else is refused with an error naming it, never fully unpickled.
* Weights: ``"ema"`` when present, else ``"model"`` (as the official sampler).
* Autoencoder: ``vae`` (``--vae FILE``), else ``ae_d16c32.pt`` beside the checkpoint, else the only ``ae*.pt``
  beside it (``{"state_dict": ...}``); else the ``vae.*`` tensors inside the checkpoint. Only the decoder is kept.
* Strict keys: a missing, unexpected or misshaped tensor is an error naming it. ``vae.*`` tensors of the
  checkpoint are allowed and unused when a separate autoencoder file is loaded (the official code overrides them).
* Memory: the file is memory-mapped; float32 tensors on CPU are adopted as they are (no copy), so the peak
  resident size is about the weights kept, not the file (``model`` + ``ema`` + the encoder are never read).
* A ``BitDance-ImageNet-diffusers`` model folder (``diffusers_layout.checkpoint_layout``: ``model_index.json``,
  ``transformer/``, ``autoencoder/``) loads with the same strictness: its configs are checked key by key
  (``diffusers_layout.class_config``), its safetensors tensors (the official keys) are read one at a time on use,
  and the autoencoder config's ``ddconfig`` must match the weights.
"""

from __future__ import annotations

import argparse
import logging
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...device import Placement, resolve
from ...engine.serving_config import ServingConfig
from ...loading import diffusers_layout as dl
from ...loading.io import CheckpointError, fmt_keys, safetensors_files
from ...models.autoencoder import BinaryAutoencoder
from .config import ClassModelConfig
from .diffusers_config import class_config
from .family import ClassConditional, refuse_quantize, serving_for
from .heads import ClassHead
from .resolve import resolve_config
from .transformer import ClassTransformer

logger = logging.getLogger(__name__)

ALLOWED_GLOBALS = [argparse.Namespace]
RELEASED_VAE = "ae_d16c32.pt"


@dataclass
class LoadedClassModel:
    family: ClassVar[str] = ClassConditional.name  # its family in bitdance_core.families.registry
    family_type: ClassVar[type[ClassConditional]] = ClassConditional  # what the engine builds to serve it
    config: ClassModelConfig
    placement: Placement
    transformer: ClassTransformer
    head: ClassHead
    ae: BinaryAutoencoder
    path: str
    weights: str  # "ema" or "model"
    vae_path: str | None  # None: the checkpoint's own vae.* tensors
    quantize: str = "none"  # served unquantised (the worker refuses --quantize for this family)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The autoencoder's encoder tensors, read from the files the model came from (``attach_encoder``)."""
        if self.vae_path is not None:
            state = load_pickle(Path(self.vae_path))["state_dict"]
            return {k: v for k, v in state.items() if k.startswith("encoder.")}
        state = load_pickle(Path(self.path))[self.weights]
        return {k[4:]: v for k, v in state.items() if k.startswith("vae.encoder.")}


def load_pickle(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and only ``argparse.Namespace`` allowed."""
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name} needs more than plain tensors and argparse.Namespace to load, which "
                              f"weights-only loading refuses (a full unpickle is never done): {e}") from e
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path.name}: not a readable torch.save file ({e})") from e


def find_vae(ckpt: Path, vae: str | Path | None) -> Path | None:
    if vae is not None:
        p = Path(vae)
        if not p.is_file():
            raise CheckpointError(f"--vae {p}: no such file")
        return p
    beside = ckpt.parent / RELEASED_VAE
    if beside.is_file():
        return beside
    cands = sorted(p for p in ckpt.parent.glob("ae*.pt") if p.is_file())
    if len(cands) == 1:
        return cands[0]
    if len(cands) > 1:
        raise CheckpointError(f"several autoencoder files beside {ckpt.name} ({', '.join(p.name for p in cands)}); "
                              "give --vae FILE")
    return None


def _state_dict(obj: Any, path: Path, keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), dict):
                return obj[k], k
    found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path.name}: expected a dict with {' or '.join(repr(k) for k in keys)}, found {found}")


class SafetensorsState(Mapping):
    """Tensors of safetensors files (key → file), each read from its memory-mapped file when accessed."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def __getitem__(self, k: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[k]), "pt", device="cpu") as f:
            return f.get_tensor(k)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def shape(self, k: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.files[k]), "pt", device="cpu") as f:
            return self.shape_in(f, k)

    def meta(self) -> dict[str, torch.Tensor]:
        """Shape-only stand-ins (``meta`` tensors) from the files' headers: what config resolution reads."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for path in sorted(set(self.files.values())):
            with safe_open(str(path), "pt", device="cpu") as f:
                for k in self.files:
                    if self.files[k] == path:
                        out[k] = torch.empty(self.shape_in(f, k), device="meta")
        return out

    def shape_in(self, f, k: str) -> tuple[int, ...]:
        return tuple(f.get_slice(k).get_shape())

    def only(self, keep: Callable[[str], bool]) -> SafetensorsState:
        return SafetensorsState({k: p for k, p in self.files.items() if keep(k)})


def _shape(state: Mapping[str, torch.Tensor], k: str) -> tuple[int, ...]:
    return state.shape(k) if isinstance(state, SafetensorsState) else tuple(state[k].shape)


def _shapes_of(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """What config resolution reads (shapes only): safetensors headers, not tensors."""
    return state.meta() if isinstance(state, SafetensorsState) else state


def _only(state: Mapping[str, torch.Tensor], keep: Callable[[str], bool]) -> Mapping[str, torch.Tensor]:
    return state.only(keep) if isinstance(state, SafetensorsState) else {k: v for k, v in state.items() if keep(k)}


def _diffusers_parts(folder: Path):
    """(state, which, args, autoencoder state or None, its label, its config's ddconfig) of a diffusers folder."""
    args, ddconfig, which = class_config(folder)
    state = SafetensorsState(safetensors_files(folder / "transformer", "diffusion_pytorch_model"))
    if (folder / "autoencoder").is_dir():
        vae = SafetensorsState(safetensors_files(folder / "autoencoder", "diffusion_pytorch_model"))
        return state, which, args, vae, f"{folder.name}/autoencoder", ddconfig
    vae_keys = {k[4:]: p for k, p in state.files.items() if k.startswith("vae.")}
    if not vae_keys:
        raise CheckpointError(f"no autoencoder: {folder.name} has no autoencoder/ folder and its transformer weights "
                              "hold no vae.* tensors")
    return state, which, args, _VaePrefixed(state.files), f"{folder.name}/transformer (vae.*)", ddconfig


class _VaePrefixed(SafetensorsState):
    """The ``vae.*`` tensors of a transformer file, under their names without the prefix."""

    def __init__(self, files: dict[str, Path]):
        super().__init__({k[4:]: p for k, p in files.items() if k.startswith("vae.")})

    def __getitem__(self, k: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[k]), "pt", device="cpu") as f:
            return f.get_tensor("vae." + k)

    def shape_in(self, f, k: str) -> tuple[int, ...]:
        return tuple(f.get_slice("vae." + k).get_shape())


def _check_ddconfig(ddconfig: dict[str, Any] | None, resolved: dict[str, Any], where: str) -> None:
    for k, v in (ddconfig or {}).items():
        if k in resolved and resolved[k] != v:
            raise CheckpointError(f"{where}/config.json: ddconfig {k}={v!r} does not match the weights "
                                  f"({resolved[k]!r})")


def adopt(module: nn.Module, state: Mapping[str, torch.Tensor], placement: Placement, what: str, *,
          prefix: str = "", allowed_extra: tuple[str, ...] = ()) -> None:
    """Fill a meta-built module from ``state`` (keys ``prefix + name``) strictly; ``allowed_extra`` key
    prefixes may be present and are skipped."""
    expected = {prefix + k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    present = {k for k in state if k.startswith(prefix)} if prefix else set(state)
    missing = set(expected) - present
    unexpected = {k for k in present - set(expected) if not k.startswith(allowed_extra)} if allowed_extra else \
        present - set(expected)
    if missing or unexpected:
        parts = ([f"missing tensors: {fmt_keys(missing, 8)}"] if missing else []) + \
                ([f"unexpected tensors: {fmt_keys(unexpected, 8)}"] if unexpected else [])
        raise CheckpointError(f"{what}: " + "; ".join(parts))
    for k, shape in expected.items():
        if _shape(state, k) != tuple(shape):
            raise CheckpointError(f"{what}: tensor {k} has shape {_shape(state, k)}, expected {tuple(shape)}")
    out = {}
    for k in expected:
        t = state[k]
        if not torch.is_floating_point(t):
            raise CheckpointError(f"{what}: tensor {k} has dtype {t.dtype}, expected a floating-point tensor")
        out[k[len(prefix):]] = t.to(device=placement.device, dtype=placement.dtype).contiguous()
    module.load_state_dict(out, strict=True, assign=True)
    module.eval().requires_grad_(False)


def build_modules(config: ClassModelConfig, device: str | torch.device = "meta"):
    with torch.device(device):
        transformer = ClassTransformer(config)
        head = ClassHead(config.latent_dim, config.dim, config.diff_dim, config.diff_layers,
                         config.diff_adanln_layers, parallel=config.parallel_num > 1, time_shift=config.time_shift)
        ae = BinaryAutoencoder(dict(config.vae_ddconfig), with_encoder=False)
    return transformer, head, ae


def load_class_model(path: str | Path, device: str | None = None, dtype: str | None = None, *,
                     vae: str | Path | None = None, model_args: str | Path | None = None) -> LoadedClassModel:
    path = Path(path)
    if dl.checkpoint_layout(path) == dl.CLASS_DIFFUSERS:
        if vae is not None:
            raise CheckpointError(f"--vae {vae}: the diffusers folder {path.name} brings its own autoencoder/")
        state, which, args, vae_state, vae_where, ddconfig = _diffusers_parts(path)
        vae_path: Path | None = path / "autoencoder" if (path / "autoencoder").is_dir() else None
        what = f"{path.name}/transformer [{which}]"
    else:
        ckpt = load_pickle(path)
        state, which = _state_dict(ckpt, path, ("ema", "model"))
        args = ckpt.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None
        del ckpt
        ddconfig = None
        vae_path = find_vae(path, vae)
        if vae_path is not None:
            vae_state, _ = _state_dict(load_pickle(vae_path), vae_path, ("state_dict",))
            vae_where = vae_path.name
        else:
            vae_state = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
            vae_where = f"{path.name} (vae.*)"
            if not vae_state:
                raise CheckpointError(f"no autoencoder: {path.name} holds no vae.* tensors and there is no "
                                      f"{RELEASED_VAE} beside it; give --vae FILE")
        what = f"{path.name} [{which}]"
    config = resolve_config(path, _shapes_of(state), args, _shapes_of(vae_state), vae_where,
                            Path(model_args) if model_args else None)
    _check_ddconfig(ddconfig, config.vae_ddconfig, vae_where)
    placement = resolve(device, dtype)
    transformer, head, ae = build_modules(config)
    model_keys = _only(state, lambda k: not k.startswith(("head.", "vae.")))
    adopt(transformer, model_keys, placement, what)
    adopt(head, state, placement, what, prefix="head.")
    adopt(ae, vae_state, placement, vae_where, allowed_extra=("encoder.",))
    del state, vae_state
    n = sum(p.numel() for m in (transformer, head) for p in m.parameters())
    logger.info("loaded %s (%s weights, %s, P=%d): %.1fM parameters + autoencoder from %s on %s (%s)", config.name,
                which, config.kind, config.parallel_num, n / 1e6, vae_where, placement.device, placement.dtype)
    logger.info("architecture sources: %s", config.sources)
    return LoadedClassModel(config, placement, transformer, head, ae, str(path), which,
                            str(vae_path) if vae_path else None)


def fake_model(config: ClassModelConfig, dtype: torch.dtype, device: torch.device, *, tokenizer=None, build=None):
    """A ``LoadedClassModel`` of fake tensors on ``device`` (call inside a ``FakeTensorMode``): the memory plan's."""
    if build is not None:
        raise ValueError("class-conditional models are planned unquantised")
    modules = build_modules(config)
    with torch.device(device):
        for m in modules:
            state = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype)
                     for k, v in m.state_dict(keep_vars=True).items()}
            m.load_state_dict(state, strict=True, assign=True)
            m.eval().requires_grad_(False)
    return LoadedClassModel(config, Placement(torch.device(device), dtype, "memory plan (fake tensors)"), *modules,
                            path=f"<plan {config.name}>", weights="model", vae_path=None)


def load_for_worker(config) -> tuple[LoadedClassModel, ServingConfig]:
    """The model worker's load (a ``WorkerConfig``): unquantised (any other ``--quantize`` is refused), its
    ``--vae`` / ``--model-args``, served at its one size."""
    refuse_quantize(config.quantize)  # the family's answer
    model = load_class_model(config.model_dir, config.device, config.dtype, vae=config.vae,
                             model_args=config.model_args)
    return model, serving_for(model)
