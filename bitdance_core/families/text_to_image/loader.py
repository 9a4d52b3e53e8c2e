"""Strict loading of an official BitDance checkpoint directory.

Modules are built on the ``meta`` device (no throw-away random init) and receive tensors read
from memory-mapped safetensors files, converted one at a time to the placement's device and dtype
and adopted with ``load_state_dict(strict=True, assign=True)``. Every mismatch (missing file,
missing or unexpected key, wrong shape) is an error naming the file and the keys; nothing is
ever half-loaded. ``lm_head`` and the autoencoder's encoder are not read unless asked for.
``quantize`` (``bitdance_core.loading.quantize``) converts the prior's linear weights (with int8 also its token
embedding table) one by one as they are read; a pre-quantised directory (``bitdance quantize``,
``bitdance_core.families.text_to_image.quantized_checkpoint``) is recognised and loaded as stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from torch import nn

from ...device import Placement, resolve
from ...engine.serving_config import ServingConfig
from ...loading import diffusers_layout as dl
from ...loading import quantize as q
from ...loading.io import CheckpointError, file_keys, fmt_keys, safetensors_files
from ...models.autoencoder import BinaryAutoencoder
from ...models.diffusion_head import DiffusionHead
from ...models.projector import Projector
from ...models.qwen3 import Qwen3Model
from . import quantized_checkpoint as qc
from .config import ModelConfig
from .family import TextToImage

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    family: ClassVar[str] = TextToImage.name  # its family in bitdance_core.families.registry
    family_type: ClassVar[type[TextToImage]] = TextToImage  # what the engine builds to serve it
    config: ModelConfig
    placement: Placement
    llm: Qwen3Model
    head: DiffusionHead
    projector: Projector
    ae: BinaryAutoencoder
    tokenizer: object
    quantize: str = "none"  # the prior's linear weights: none | int8 | fp8 (bitdance_core.loading.quantize.MODES)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The autoencoder's encoder tensors from ``ae.safetensors`` (``image_tokenizer.attach_encoder``)."""
        path = Path(self.config.model_dir) / "ae.safetensors"
        with safe_open(str(path), "pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith("encoder.")}  # noqa: SIM118 - safe_open


@dataclass(frozen=True)
class Sources:
    """Where each part of a text-to-image checkpoint lives (official or diffusers layout)."""

    layout: str
    llm_dir: Path  # the LLM's config.json and model*.safetensors (pre-quantised marker included)
    tokenizer_dir: Path
    head: dict[str, Path]
    projector: dict[str, Path]
    ae: dict[str, Path]


def sources(model_dir: str | Path) -> Sources:
    """The files of a text-to-image checkpoint directory, by ``diffusers_layout.checkpoint_layout``."""
    d = Path(model_dir)
    layout = dl.checkpoint_layout(d)
    if layout == dl.DIFFUSERS:
        parts = {c: safetensors_files(d / c, "diffusion_pytorch_model")
                 for c in ("diffusion_head", "projector", "autoencoder")}
        return Sources(layout, d / "text_encoder", d / "tokenizer", parts["diffusion_head"], parts["projector"],
                       parts["autoencoder"])
    if layout != dl.OFFICIAL:
        raise CheckpointError(f"{d} holds a class-conditional model ({layout}), not a text-to-image checkpoint")
    return Sources(layout, d, d, file_keys(d / "vision_head.safetensors"), file_keys(d / "projector.safetensors"),
                   file_keys(d / "ae.safetensors"))


def _label(path: Path) -> str:
    """A weights file as errors name it (with its component folder in the diffusers layout)."""
    diffusers = path.name.startswith("diffusion_pytorch_model") or path.parent.name == "text_encoder"
    return f"{path.parent.name}/{path.name}" if diffusers else path.name


def load_into(module: nn.Module, sources: dict[str, Path], placement: Placement, *, prefix: str = "",
              ignore_prefixes: tuple[str, ...] = (), what: str = "",
              convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fill a meta-built module from safetensors ``sources`` (file key → path), strictly.

    ``prefix`` is prepended to the module's own key names to find them in the files;
    file keys starting with one of ``ignore_prefixes`` are allowed and skipped. ``convert(key, tensor)`` (module
    key, the file's tensor) replaces the default conversion to the placement's device and dtype.
    """
    expected = {prefix + k: v for k, v in module.state_dict(keep_vars=True).items()}
    present = set(sources)
    skipped = {k for k in present if k.startswith(ignore_prefixes)} if ignore_prefixes else set()
    missing = set(expected) - present
    unexpected = present - set(expected) - skipped
    files = sorted({p.name for p in sources.values()}) or [what]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt_keys(unexpected)}")
        raise CheckpointError(f"{what or files}: " + "; ".join(parts))
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(sources[k], []).append(k)
    for path, keys in by_file.items():  # every shape first: a mismatch fails before anything is read
        with safe_open(str(path), "pt", device="cpu") as f:
            for k in keys:
                shape, want = tuple(f.get_slice(k).get_shape()), tuple(expected[k].shape)
                if shape != want:
                    raise CheckpointError(f"{_label(path)}: key {k} has shape {shape}, expected {want}")
    state: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        for k in keys:
            # NOTE: one short-lived mapping per tensor, so the file's pages do not stay resident next to
            # the converted copies (peak RSS ~ weights kept, not kept + file).
            with safe_open(str(path), "pt", device="cpu") as f:
                t = f.get_tensor(k)
            key = k[len(prefix):]
            state[key] = (convert(key, t) if convert is not None
                          else t.to(device=placement.device, dtype=placement.dtype))
            del t
    module.load_state_dict(state, strict=True, assign=True)


def build_modules(config: ModelConfig, *, with_encoder: bool = False, device: str | torch.device = "meta"):
    """Construct the four modules (on ``meta`` by default: shapes only, no init cost)."""
    with torch.device(device):
        llm = Qwen3Model(config.llm)
        head = DiffusionHead(**config.head)
        projector = Projector(config.z_channels, config.llm.hidden_size)
        ae = BinaryAutoencoder(dict(config.ae_ddconfig), gan_decoder=config.gan_decoder, with_encoder=with_encoder)
    return llm, head, projector, ae


def _tokenizer_class(model_dir: Path):
    """The class ``AutoTokenizer`` picks for the directory's ``tokenizer_class``, imported directly when it is one
    a BitDance checkpoint holds (Qwen2's fast tokenizer; the generic fast one of the tiny and demo models): importing
    ``transformers.AutoTokenizer`` costs 1.3-2 CPU-s more, paid by every worker start and CLI run."""
    try:
        name = json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        name = None
    if name == "PreTrainedTokenizerFast":
        from transformers.tokenization_utils_fast import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    if name in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        from transformers.models.qwen2.tokenization_qwen2_fast import Qwen2TokenizerFast

        return Qwen2TokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_tokenizer(model_dir: str | Path):
    """The fast tokenizer of a checkpoint directory (a diffusers directory's ``tokenizer/`` folder)."""
    if (Path(model_dir) / "model_index.json").is_file():
        model_dir = Path(model_dir) / "tokenizer"
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise CheckpointError(f"missing file tokenizer.json in checkpoint directory {model_dir} "
                              "(a fast tokenizer is required)")
    try:
        tok = _tokenizer_class(Path(model_dir)).from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises several types for a broken tokenizer dir
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from e
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{model_dir}: a fast tokenizer (tokenizer.json) is required")
    return tok


def load_model(model_dir: str | Path, device: str | None = None, dtype: str | None = None, *,
               with_encoder: bool = False, quantize: str | None = None) -> LoadedModel:
    """Load a text-to-image checkpoint directory (official or diffusers layout) onto one device, strictly.

    ``quantize`` (none | int8 | fp8, default none) quantises the prior's linear weights while loading; a
    pre-quantised directory loads as stored (``quantize`` must then be none or its own mode).
    """
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    src = sources(model_dir)
    placement = resolve(device, dtype)
    mode = q.check_mode(quantize)
    llm_files = safetensors_files(src.llm_dir)
    stored = qc.checksafetensors_files(src.llm_dir, llm_files)
    if stored != "none" and mode not in ("none", stored):
        raise CheckpointError(f"{model_dir} is pre-quantised ({stored}); it cannot be loaded with quantize={mode}")
    mode = stored if stored != "none" else mode
    q.check_supported(mode, placement)
    tokenizer = load_tokenizer(src.tokenizer_dir)
    llm, head, projector, ae = build_modules(config, with_encoder=with_encoder)
    embedding = qc.stored_embedding(model_dir) if stored != "none" else True
    q.prepare_prior_(llm, mode, embedding=embedding)
    if stored != "none":
        qc.load_prequantized(llm, llm_files, placement, stored, embedding)  # official layout only (quantize)
    else:
        load_into(llm, llm_files, placement, prefix="model.", ignore_prefixes=("lm_head.",),
                  what=f"LLM weights ({'' if src.layout == 'official' else 'text_encoder/'}model*.safetensors)",
                  convert=q.converter(mode, placement))
    names = ("vision_head.safetensors", "projector.safetensors", "ae.safetensors") if src.layout == "official" else \
        ("diffusion_head/", "projector/", "autoencoder/")
    load_into(head, src.head, placement, what=names[0])
    load_into(projector, src.projector, placement, what=names[1])
    load_into(ae, src.ae, placement, ignore_prefixes=() if with_encoder else ("encoder.",), what=names[2])
    for m in (llm, head, projector, ae):
        m.eval().requires_grad_(False)
    n_params = sum(p.numel() for m in (llm, head, projector, ae) for p in m.parameters())
    logger.info("loaded %s: %.1fM parameters on %s (%s, quantize %s: %.1f MiB kept)", config.name, n_params / 1e6,
                placement.device, placement.dtype, mode, q.module_bytes(llm, head, projector, ae) / 2**20)
    return LoadedModel(config, placement, llm, head, projector, ae, tokenizer, mode)


def fake_model(config, dtype: torch.dtype, device: torch.device, *, tokenizer=None, build=None):
    """A text-to-image ``LoadedModel`` of fake tensors on ``device`` (call inside a ``FakeTensorMode``), as
    ``load_model`` builds it: modules on ``meta``, then every state-dict entry adopted as a fake tensor of
    ``dtype``. ``build(modules, dtype)`` may fill them instead (``loading.quantize.fake_build``: as quantised)."""
    with torch.device(device):
        modules = build_modules(config, with_encoder=False)
        if build is not None:
            modules = build(modules, dtype)
        else:
            for m in modules:
                state = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype)
                         for k, v in m.state_dict(keep_vars=True).items()}
                m.load_state_dict(state, strict=True, assign=True)
    for m in modules:
        m.eval().requires_grad_(False)
    return LoadedModel(config, Placement(torch.device(device), dtype, "memory plan (fake tensors)"), *modules,
                       tokenizer)


def load_for_worker(config) -> tuple[LoadedModel, ServingConfig]:
    """The model worker's load (a ``WorkerConfig``): quantised as asked, the AE encoder with the tokenizer routes,
    served at the deployment's sizes (``--sizes``) or the checkpoint's."""
    model = load_model(config.model_dir, config.device, config.dtype, quantize=config.quantize,
                       with_encoder=bool(getattr(config, "tokenizer", False)))
    sizes = [list(s) for s in config.sizes] if config.sizes else None
    return model, ServingConfig.for_model(model.config, {"sizes": sizes})
