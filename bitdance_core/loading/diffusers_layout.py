"""Diffusers-format BitDance directories (``scripts/convert_bitdance_to_diffusers.py`` of Bili-Sakura/BitDance).

``checkpoint_layout(path)`` is the one place that says which layout a model path holds:

* ``official``: a text-to-image directory in the official layout (``config.json``, ``ae_config.json``, ...);
* ``diffusers``: a text-to-image directory with ``model_index.json`` (``BitDanceDiffusionPipeline``) and one
  folder per component: ``text_encoder/`` (Qwen3ForCausalLM ``config.json`` + ``model*.safetensors``),
  ``tokenizer/``, ``autoencoder/``, ``diffusion_head/``, ``projector/`` (each ``config.json`` +
  ``diffusion_pytorch_model.safetensors``); tensor keys are the official ones;
* ``class-pt``: a released class-conditional file (``BitDance_*.pt``);
* ``class-diffusers``: one model folder of ``BitDance-ImageNet-diffusers`` (``model_index.json``,
  ``transformer/config.json`` + weights with the official keys of the checkpoint's ``source_key`` state dict,
  ``autoencoder/config.json`` + weights).

Configs are read as strictly as the official layout: the ``_*`` keys (``_class_name``, ``_diffusers_version``,
...) are dropped, every other key must be known and is checked; a missing folder, file or key is an error naming
it. Nothing here imports torch (weights are read by ``families/text_to_image/loader.py`` and
``families/class_conditional/loader.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .io import CheckpointError

AE_DDCONFIG_KEYS = {"ch", "out_ch", "in_channels", "num_res_blocks", "z_channels", "ch_mult", "resolution", "double_z"}

OFFICIAL, DIFFUSERS, CLASS_PT, CLASS_DIFFUSERS = "official", "diffusers", "class-pt", "class-diffusers"
LAYOUTS = (OFFICIAL, DIFFUSERS, CLASS_PT, CLASS_DIFFUSERS)

MODEL_INDEX = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
T2I_PIPELINE = "BitDanceDiffusionPipeline"
# component folder -> the class the converter saves it as (None: any, e.g. the tokenizer's)
T2I_COMPONENTS: dict[str, str | None] = {
    "tokenizer": None, "text_encoder": "Qwen3ForCausalLM", "autoencoder": "BitDanceAutoencoder",
    "diffusion_head": "BitDanceDiffusionHead", "projector": "BitDanceProjector",
}
CLASS_PIPELINE = "BitDanceImageNetPipeline"
CLASS_COMPONENTS: dict[str, str | None] = {"transformer": "BitDanceImageNetTransformer"}
CLASS_OPTIONAL_COMPONENTS: dict[str, str | None] = {"autoencoder": "BitDanceImageNetAutoencoder"}


def checkpoint_layout(path: str | Path) -> str:
    """Which layout ``path`` holds (one of ``LAYOUTS``). A path that is none of them (or does not exist) is
    ``official``, so the official loader's error names what is missing; a folder that holds several
    diffusers model folders (the ``BitDance-ImageNet-diffusers`` repository root) is an error naming them."""
    p = Path(path)
    if p.is_file():
        return CLASS_PT
    if (p / "transformer" / "config.json").is_file():
        return CLASS_DIFFUSERS
    if (p / MODEL_INDEX).is_file():
        return DIFFUSERS
    if p.is_dir() and not (p / "config.json").is_file():
        subs = sorted(c.name for c in p.iterdir() if (c / MODEL_INDEX).is_file())
        if subs:
            raise CheckpointError(f"{p} holds several diffusers model folders ({', '.join(subs)}); give one of them "
                                  f"as the model path, e.g. {p / subs[0]}")
    return OFFICIAL


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (an error naming the file when it is missing, invalid or not an object)."""
    top = path.name == MODEL_INDEX  # the only top-level file; the others are in a component folder
    where = path.name if top else f"{path.parent.name}/{path.name}"
    if not path.is_file():
        folder = path.parent if top else path.parent.parent
        raise CheckpointError(f"missing file {where} in diffusers directory {folder}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: invalid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(doc).__name__}")
    return doc


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """The config without its ``_*`` keys (diffusers' ``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def check_keys(doc: dict[str, Any], where: str, allowed, required=()) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise CheckpointError(f"{where}: unexpected keys {unknown} (allowed: {sorted(allowed)})")
    missing = [k for k in required if k not in doc]
    if missing:
        raise CheckpointError(f"{where}: missing keys {missing}")


def check_model_index(d: Path, pipeline: str, components: dict[str, str | None],
                      optional: dict[str, str | None] | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``model_index.json``: the pipeline class, exactly the expected components (each ``[library, class]``)."""
    raw = read_json(d / MODEL_INDEX)
    cls = raw.get("_class_name")
    cls = cls[-1] if isinstance(cls, list) and cls else cls
    if cls != pipeline:
        raise CheckpointError(f"{MODEL_INDEX}: _class_name {raw.get('_class_name')!r} is not {pipeline!r}")
    doc = public(raw)
    optional = optional or {}
    check_keys(doc, MODEL_INDEX, [*components, *optional, *extra], required=list(components))
    for name, want in {**components, **optional}.items():
        if name not in doc:
            continue
        v = doc[name]
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
            raise CheckpointError(f"{MODEL_INDEX}: component {name} must be [library, class], found {v!r}")
        if want is not None and v[1] != want:
            raise CheckpointError(f"{MODEL_INDEX}: component {name} is a {v[1]}, expected {want}")
        if not (d / name).is_dir():
            raise CheckpointError(f"missing component folder {name}/ in diffusers directory {d}")
    return doc


def weight_files(folder: Path, stem: str = "diffusion_pytorch_model") -> tuple[Path, ...] | Path:
    """A component's weights: ``<stem>.safetensors``, or the index ``<stem>.safetensors.index.json`` (sharded)."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return index
    single = folder / f"{stem}.safetensors"
    if not single.is_file():
        raise CheckpointError(f"missing file {folder.name}/{single.name} in diffusers directory {folder.parent}")
    return single


# ---- text-to-image ----------------------------------------------------------------------------------------------
