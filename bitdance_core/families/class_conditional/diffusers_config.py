"""The class-conditional ``BitDance-ImageNet-diffusers`` folder's configs, checked key by key (torch-free).

``class_config(folder)`` gives the official argparse names ``resolve.resolve_config`` takes, the autoencoder's
ddconfig and the weights key; ``loading/diffusers_layout.py`` holds the layout checks both families share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...loading.diffusers_layout import (
    AE_DDCONFIG_KEYS,
    CLASS_COMPONENTS,
    CLASS_OPTIONAL_COMPONENTS,
    CLASS_PIPELINE,
    check_keys,
    check_model_index,
    public,
    read_json,
)
from ...loading.io import CheckpointError

# transformer/config.json: key -> the official argparse name it sets (None: checked, not an architecture field)
CLASS_KEYS = {
    "architecture": "model", "parallel_num": "parallel_num", "resolution": "image_size", "down_size": "down_size",
    "latent_dim": "latent_dim", "num_classes": "num_classes", "parallel_mode": "parallel_mode",
    "time_shift": "time_shift", "source_checkpoint": None, "source_key": None, "runtime_impl": None,
    "time_schedule": None, "p_std": None, "p_mean": None,
}
CLASS_REQUIRED = ("architecture", "parallel_num", "resolution", "down_size", "latent_dim", "num_classes")
# sizes of an architecture that is not an official preset (written by ``make-checkpoint`` for its tiny presets)
CLASS_SIZE_KEYS = ("dim", "n_layer", "n_head", "diff_layers", "diff_dim", "diff_adanln_layers", "cls_token_num")
OFFICIAL_ARCHS = ("BitDance-B", "BitDance-L", "BitDance-H")
RUNTIME_IMPLS = {"model.py": False, "model_parallel.py": True}  # file -> parallel (parallel_num > 1)


def class_config(d: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(official argparse names for ``resolve_config``, the autoencoder's ddconfig or None, the source key)
    of one ``BitDance-ImageNet-diffusers`` model folder."""
    d = Path(d)
    check_model_index(d, CLASS_PIPELINE, CLASS_COMPONENTS, CLASS_OPTIONAL_COMPONENTS)
    where = "transformer/config.json"
    cfg = public(read_json(d / "transformer" / "config.json"))
    check_keys(cfg, where, [*CLASS_KEYS, *CLASS_SIZE_KEYS], required=CLASS_REQUIRED)
    arch = cfg["architecture"]
    sizes = [k for k in CLASS_SIZE_KEYS if k in cfg]
    if arch in OFFICIAL_ARCHS and sizes:
        raise CheckpointError(f"{where}: {sizes} are set by the architecture {arch}; remove them")
    lacking = [k for k in CLASS_SIZE_KEYS if k not in cfg and k != "cls_token_num"]
    if arch not in OFFICIAL_ARCHS and lacking:
        raise CheckpointError(f"{where}: architecture {arch!r} is none of {list(OFFICIAL_ARCHS)}; a custom one needs "
                              f"{lacking}")
    for k in ("parallel_num", "resolution", "down_size", "latent_dim", "num_classes", *sizes):
        if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < 1:
            raise CheckpointError(f"{where}: {k} must be a positive integer, found {cfg[k]!r}")
    impl = cfg.get("runtime_impl")
    if impl is not None and (impl not in RUNTIME_IMPLS or RUNTIME_IMPLS[impl] != (cfg["parallel_num"] > 1)):
        want = "model_parallel.py" if cfg["parallel_num"] > 1 else "model.py"
        raise CheckpointError(f"{where}: runtime_impl {impl!r} does not fit parallel_num={cfg['parallel_num']} "
                              f"(expected {want!r})")
    key = cfg.get("source_key", "ema")
    if key not in ("ema", "model"):
        raise CheckpointError(f"{where}: source_key {key!r} is neither 'ema' nor 'model'")
    if cfg.get("time_schedule", "logit_normal") not in ("logit_normal", "uniform"):
        raise CheckpointError(f"{where}: time_schedule {cfg['time_schedule']!r} is neither 'logit_normal' nor "
                              "'uniform' (a training setting; sampling does not use it)")
    for k in ("time_shift", "p_std", "p_mean"):
        if k in cfg and (not isinstance(cfg[k], int | float) or isinstance(cfg[k], bool)):
            raise CheckpointError(f"{where}: {k} must be a number, found {cfg[k]!r}")
    if "source_checkpoint" in cfg and not isinstance(cfg["source_checkpoint"], str):
        raise CheckpointError(f"{where}: source_checkpoint must be a string")
    args = {CLASS_KEYS[k]: v for k, v in cfg.items() if CLASS_KEYS.get(k)}
    args.update({k: cfg[k] for k in sizes})

    ddconfig = None
    ae_dir = d / "autoencoder"
    if ae_dir.is_dir():
        ae = public(read_json(ae_dir / "config.json"))
        check_keys(ae, "autoencoder/config.json", ("ddconfig", "num_codebooks", "source_checkpoint"),
                   required=("ddconfig",))
        if not isinstance(ae["ddconfig"], dict):
            raise CheckpointError("autoencoder/config.json: ddconfig must be an object")
        check_keys(ae["ddconfig"], "autoencoder/config.json ddconfig", AE_DDCONFIG_KEYS)
        nc = ae.get("num_codebooks", 1)
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:  # the quantiser's groups: encoder only
            raise CheckpointError(f"autoencoder/config.json: num_codebooks must be a positive integer, found {nc!r}")
        ddconfig = ae["ddconfig"]
    return args, ddconfig, key
