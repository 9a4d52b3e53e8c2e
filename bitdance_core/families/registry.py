"""The model families, by name: where the worker, the planner and the CLI look a family up.

A loaded model and its config name their family (``model.family``, ``config.family``: ``"text_to_image"`` or
``"class_conditional"``); a checkpoint path is claimed by the family whose layouts include
``loading.diffusers_layout.checkpoint_layout(path)``. The engine never comes here: it builds ``model.family_type``.
This module imports every family (torch); the package ``__init__`` stays empty so that the torch-free parts of a
family (its config, the ImageNet class names) can be imported by the API process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..engine.family import ModelFamily
from ..engine.serving_config import ServingConfig
from ..loading import diffusers_layout as dl
from .class_conditional import cli as class_cli
from .class_conditional import loader as class_loader
from .class_conditional.family import ClassConditional
from .class_conditional.random_checkpoint import CLASS_PRESETS
from .text_to_image import cli as t2i_cli
from .text_to_image import loader as t2i_loader
from .text_to_image.family import TextToImage
from .text_to_image.random_checkpoint import PRESETS


@dataclass(frozen=True)
class Family:
    family: type[ModelFamily]  # what the engine serves it with
    layouts: tuple[str, ...]  # the checkpoint layouts it loads (loading.diffusers_layout)
    load: Callable  # (WorkerConfig) -> (loaded model, ServingConfig): the worker's load
    fake_model: Callable  # (config, dtype, device, *, tokenizer=None, build=None): the memory plan's model
    generate: Callable  # (argparse.Namespace) -> Generation: the CLI's part of `bitdance generate`
    presets: Mapping  # random-checkpoint presets (make-checkpoint, plan --preset)
    quantizable: bool  # weight-only int8 / fp8 of the prior (bitdance_core.loading.quantize)

    @property
    def name(self) -> str:
        return self.family.name


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(TextToImage, (dl.OFFICIAL, dl.DIFFUSERS), t2i_loader.load_for_worker, t2i_loader.fake_model,
           t2i_cli.generation, PRESETS, quantizable=True),
    Family(ClassConditional, (dl.CLASS_PT, dl.CLASS_DIFFUSERS), class_loader.load_for_worker,
           class_loader.fake_model, class_cli.generation, CLASS_PRESETS, quantizable=False),
)}


def family_of(obj) -> Family:
    """The family a loaded model or a model config names."""
    return FAMILIES[obj.family]


def for_path(path: str | Path) -> Family:
    """The family that loads the checkpoint at ``path`` (a directory or a class-conditional ``.pt``)."""
    layout = dl.checkpoint_layout(Path(path))
    return next(f for f in FAMILIES.values() if layout in f.layouts)


def for_preset(name: str) -> Family | None:
    return next((f for f in FAMILIES.values() if name in f.presets), None)


def family_class(model) -> type[ModelFamily]:
    return family_of(model).family


def default_serving(model) -> ServingConfig:
    """A model's serving defaults when none are given (a class-conditional model has its own)."""
    return family_of(model).family.default_serving(model)


def fake_model(config, dtype, device, *, tokenizer=None, build=None):
    """A model of fake tensors of the family ``config`` names (call inside a ``FakeTensorMode``)."""
    return family_of(config).fake_model(config, dtype, device, tokenizer=tokenizer, build=build)
