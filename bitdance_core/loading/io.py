"""Checkpoint file I/O shared by every loader: the checkpoint error, key lists in messages, safetensors file maps.

A leaf: it imports nothing of the project, so the loaders, quantisation and pre-quantised checkpoints all depend on
it and never on each other's private helpers. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that does not match its layout (official, diffusers, class-conditional ``.pt``)."""


def fmt_keys(keys, limit: int = 12) -> str:
    """Sorted keys for an error message, the first ``limit`` of them and how many more."""
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def safetensors_files(model_dir: Path, stem: str = "model") -> dict[str, Path]:
    """Map each tensor name to the file holding it: ``<stem>.safetensors``, or sharded with
    ``<stem>.safetensors.index.json`` (the LLM's ``model``, a diffusers component's ``diffusion_pytorch_model``)."""
    index = model_dir / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {k: model_dir / v for k, v in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{model_dir.name}/{index.name} names shard files that are missing: {missing}")
        return files
    single = model_dir / f"{stem}.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: neither {single.name} nor {index.name} exists")
    return file_keys(single)


def file_keys(path: Path) -> dict[str, Path]:
    """Every tensor name of one safetensors file, mapped to it."""
    if not path.is_file():
        raise CheckpointError(f"missing file {path.name} in checkpoint directory {path.parent}")
    with safe_open(str(path), "pt") as f:
        return {k: path for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
