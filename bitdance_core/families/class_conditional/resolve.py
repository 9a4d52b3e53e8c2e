"""Where a class-conditional checkpoint's architecture comes from, in this order (issue 10):

1. a ``--model-args FILE.json`` (the shared fixture's ``model_args_*.json``: ``args`` = the official argparse names,
   ``preset`` = dim / n_layer / n_head / diff_* sizes, ``vae`` = ``{"ddconfig": ...}``);
2. the checkpoint's ``args`` (an ``argparse.Namespace``: ``model`` names an official preset; extra preset fields
   such as ``n_head`` are honoured, which is how ``make-checkpoint --preset imagenet-tiny`` describes itself);
3. the file name ``BitDance_{B,L,H}_{1,4,16}x`` and the official presets;
4. the tensor shapes (dims, layer and block counts, ``parallel_num`` from ``query_token``, ``cls_token_num`` and
   ``num_classes`` from ``cls_embedding``, the image size from ``pos_for_diff``, the autoencoder's ddconfig).

A field takes the first source that knows it (``"parallel_mode": null``, what a 1x model's arguments hold, is
"not known": fine for a 1x model, an error naming the field for a parallel one); fields the official argparse
defaults fix (``parallel_mode``
``patch``, ``time_shift`` 1, ``down_size`` 16, ``patch_size`` 1) fall back to them. The attention head count is
the one field shapes cannot tell: it comes from a source above or, when ``dim`` and ``n_layer`` are an official
preset's, from that preset; otherwise the error names ``--model-args``. Contradictions between sources surface
as the strict loader's shape errors, naming the tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ...loading.io import CheckpointError
from .config import FILE_NAME, PARALLEL_MODES, PRESETS, RELEASED_GUIDANCE, ClassModelConfig

ARCH = ("dim", "n_layer", "n_head", "diff_layers", "diff_dim", "diff_adanln_layers")
ARGS = ("latent_dim", "cls_token_num", "num_classes", "parallel_num", "parallel_mode", "image_size", "down_size",
        "patch_size", "time_shift")
OFFICIAL_DEFAULTS = {"parallel_mode": "patch", "time_shift": 1.0, "down_size": 16, "patch_size": 1}
MODEL_ARGS_HINT = ("give --model-args FILE.json ({\"args\": {...official argparse names...}, \"preset\": {\"dim\", "
                   "\"n_layer\", \"n_head\", \"diff_layers\", \"diff_dim\", \"diff_adanln_layers\"}, \"vae\": "
                   "{\"ddconfig\": {...}}}, as tests/fixtures/reference-imagenet-tiny-a/model_args_4x.json)")


def _preset_of(model_name: str | None) -> dict[str, int]:
    m = re.fullmatch(r"BitDance-([BLH])", str(model_name or ""))
    return dict(PRESETS[m.group(1)]) if m else {}


def from_model_args(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--model-args {path}: cannot read it as JSON ({e})") from e
    args = dict(doc.get("args") or {})
    fields = {**_preset_of(args.get("model")), **{k: v for k, v in (doc.get("preset") or {}).items() if k in ARCH}}
    fields.update({k: args[k] for k in ARGS if k in args})
    if "parallel_num" not in fields and "parallel_num" in doc:
        fields["parallel_num"] = doc["parallel_num"]
    if "parallel_mode" not in fields and "parallel_mode" in doc:
        fields["parallel_mode"] = doc["parallel_mode"]
    ddconfig = (doc.get("vae") or {}).get("ddconfig")
    if "name" in (doc.get("preset") or {}):
        fields["name"] = doc["preset"]["name"]
    return fields, ddconfig


def from_ckpt_args(args: dict[str, Any] | None) -> dict[str, Any]:
    if not args:
        return {}
    fields = _preset_of(args.get("model"))
    fields.update({k: args[k] for k in ARCH + ARGS if k in args})
    return fields


def from_file_name(path: Path) -> dict[str, Any]:
    m = FILE_NAME.search(Path(path).name)
    if not m:
        return {}
    return {**PRESETS[m.group(1).upper()], "parallel_num": int(m.group(2))}


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def from_shapes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    f: dict[str, Any] = {}
    if "emb_norm.weight" in state:
        f["dim"] = state["emb_norm.weight"].shape[0]
    if n := _count(state, r"layers\.(\d+)\."):
        f["n_layer"] = n
    if "head.net.input_proj.weight" in state:
        f["diff_dim"], f["latent_dim"] = state["head.net.input_proj.weight"].shape
    if n := _count(state, r"head\.net\.res_blocks\.(\d+)\."):
        f["diff_layers"] = n
    if n := _count(state, r"head\.net\.ada_ln_blocks\.(\d+)\."):
        f["diff_adanln_layers"] = n
    f["parallel_num"] = state["query_token"].shape[1] + 1 if "query_token" in state else 1
    if "cls_embedding.weight" in state and "dim" in f:
        rows, width = state["cls_embedding.weight"].shape
        f["num_classes"], f["cls_token_num"] = rows - 1, width // f["dim"]
    if "pos_for_diff.weight" in state:
        side = round(state["pos_for_diff.weight"].shape[0] ** 0.5)
        f["image_size"] = side * OFFICIAL_DEFAULTS["down_size"]
    return f


def ddconfig_from_shapes(vae: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """The autoencoder's ddconfig from its tensors (keys without the ``vae.`` prefix)."""
    try:
        z = vae["decoder.conv_in.weight"].shape[1]
        levels = _count(vae, r"decoder\.up\.(\d+)\.")
        n_res = _count(vae, r"decoder\.up\.0\.block\.(\d+)\.")
        widths = [vae[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        out_ch = vae["decoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{where}: the autoencoder lacks tensor {e.args[0]}") from e
    enc = vae.get("encoder.conv_in.weight")
    ch = enc.shape[0] if enc is not None else widths[0]
    if any(w % ch for w in widths):
        raise CheckpointError(f"{where}: autoencoder widths {widths} are not multiples of ch {ch}")
    return {"double_z": False, "z_channels": z, "in_channels": enc.shape[1] if enc is not None else 3,
            "out_ch": out_ch, "ch": ch, "ch_mult": [w // ch for w in widths], "num_res_blocks": n_res}


def resolve_config(ckpt_path: Path, state: dict[str, torch.Tensor], ckpt_args: dict[str, Any] | None,
                   vae_state: dict[str, torch.Tensor], vae_where: str,
                   model_args: Path | None = None) -> ClassModelConfig:
    sources: list[tuple[str, dict[str, Any]]] = []
    ddconfig = None
    if model_args is not None:
        fields, ddconfig = from_model_args(model_args)
        sources.append((f"--model-args {Path(model_args).name}", fields))
    sources += [("checkpoint args", from_ckpt_args(ckpt_args)), ("file name", from_file_name(ckpt_path)),
                ("tensor shapes", from_shapes(state))]
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    null_mode = None  # where "parallel_mode": null came from (the 1x scripts have no such argument)
    for where, f in sources:
        for k, v in f.items():
            if k == "parallel_mode" and v is None:
                null_mode = null_mode or where
            elif k not in fields:
                fields[k], origin[k] = v, where
    if "n_head" not in fields:
        match = [n for n, p in PRESETS.items()
                 if p["dim"] == fields.get("dim") and p["n_layer"] == fields.get("n_layer")]
        if match:
            fields["n_head"], origin["n_head"] = PRESETS[match[0]]["n_head"], f"preset {match[0]} (dim, n_layer)"
    for k, v in OFFICIAL_DEFAULTS.items():
        if k not in fields:
            fields[k], origin[k] = v, "official default"
    if null_mode and origin["parallel_mode"] == "official default" and int(fields.get("parallel_num", 1)) > 1:
        raise CheckpointError(f"{ckpt_path.name}: {null_mode} says parallel_mode null, but this model predicts "
                              f"parallel_num={fields['parallel_num']} tokens per step, where the mode matters: set "
                              f"\"parallel_mode\" to one of {list(PARALLEL_MODES)} (the official default: \"patch\")")
    missing = [k for k in ARCH + ARGS if k not in fields]
    if missing:
        raise CheckpointError(f"{ckpt_path.name}: cannot tell {', '.join(missing)} from its file name, args or tensor "
                              f"shapes; {MODEL_ARGS_HINT}")
    if ddconfig is None:
        ddconfig, origin["vae_ddconfig"] = ddconfig_from_shapes(vae_state, vae_where), f"tensor shapes ({vae_where})"
    else:
        origin["vae_ddconfig"] = sources[0][0]
    size = next((n for n, p in PRESETS.items() if all(fields[k] == p[k] for k in ARCH)), None)
    guidance = RELEASED_GUIDANCE.get((size, int(fields["parallel_num"])), None)
    name = fields.pop("name", None) or Path(ckpt_path).stem
    kw = {k: fields[k] for k in ARCH + ARGS}
    kw = {k: (float(v) if k == "time_shift" else v if k == "parallel_mode" else int(v)) for k, v in kw.items()}
    try:
        return ClassModelConfig(name=name, vae_ddconfig=dict(ddconfig), sources=origin, model_dir=str(ckpt_path),
                                **({"default_guidance": guidance} if guidance else {}), **kw)
    except ValueError as e:
        raise CheckpointError(f"{ckpt_path.name}: {e}") from e
