"""What ``--model PATH`` names, decided once before anything loads (torch-free: the API process uses it).

* no such path: an error;
* a file: a class-conditional checkpoint (``BitDance_*.pt``), opened by its loader;
* a directory with ``config.json``: a text-to-image checkpoint in the official layout; its JSON configs are read
  and checked here (a missing or invalid config is an error before the server listens);
* a directory without ``config.json`` holding class-conditional ``.pt`` files (autoencoders ``ae*.pt`` aside):
  exactly one is served; several are an error that lists them;
* any other directory is left to the loaders, whose first failure says what is missing.

Errors are :class:`~bitdance_core.families.text_to_image.config.CheckpointError`: no restart can fix them.
"""

from __future__ import annotations

from pathlib import Path

from .families.text_to_image.config import ModelConfig
from .loading.io import CheckpointError


def class_checkpoints(directory: Path) -> list[Path]:
    """The class-conditional model files of a directory (its autoencoders, ``ae*.pt``, are not models)."""
    return sorted(p for p in directory.glob("*.pt") if p.is_file() and not p.name.lower().startswith("ae"))


def resolve_model_path(path: str | Path) -> str:
    """The absolute path to load for ``--model path``, or ``CheckpointError`` naming what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"--model {path} does not exist (no such file or directory)")
    p = p.absolute()
    if p.is_file():
        return str(p)
    if (p / "config.json").is_file():
        ModelConfig.from_dir(p)  # config.json, ae_config.json, vision_head_config.json: present and valid
        return str(p)
    models = class_checkpoints(p)
    if len(models) == 1:
        return str(models[0])
    if models:
        names = ", ".join(m.name for m in models)
        raise CheckpointError(f"--model {path}: a directory with {len(models)} class-conditional checkpoints "
                              f"({names}) and no config.json; pass one of them, e.g. --model {models[0]}")
    return str(p)
