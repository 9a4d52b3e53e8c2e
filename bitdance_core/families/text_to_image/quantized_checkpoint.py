"""Pre-quantised checkpoint directories: written by ``bitdance quantize``, recognised by the loader.

A pre-quantised directory is the official layout with only the LLM weights changed:

* ``config.json`` gains ``quantization_config`` (HF's key): ``{"quant_method": "torchao", "bitdance_quantize":
  "int8" | "fp8", "quantized_modules": ..., "torchao_version": ...}``;
* ``model.safetensors`` (or the same shards + ``model.safetensors.index.json``) holds each quantised weight in
  torchao's safetensors format (``flatten_tensor_state_dict``: ``model.layers.0.mlp.up_proj._weight_qdata``,
  ``..._weight_scale`` [, ``..._weight_zero_point``], the tensor's JSON description under its name in the header)
  and every other tensor as before; each file's header also says ``"bitdance_quantize": MODE``;
* everything else (tokenizer, configs, ``ae_*``, ``vision_head_*``, projector) is copied unchanged.

Format versions (``quantization_config.bitdance_format``): 2 (written now) also stores the int8 prior's token
embedding table ``model.embed_tokens.weight`` quantised (int8 rows + per-row scales); 1 (no key: directories
written before) keeps it in the source dtype. Both load; a format-1 int8 directory loads with its embedding table
as stored (it keeps 1.5 GB more on a 14B model than a format-2 one, and a warning says to re-run
``bitdance quantize``). A newer format is refused, naming the version.

No pickles anywhere: pickle files of the source directory (``*.bin``, ``*.pt``, ...) are not copied. Loading is as
strict as for official directories: a file whose header disagrees with ``config.json`` (a mixed directory), a
missing or unexpected key, a wrong shape or dtype is a ``CheckpointError`` naming the file and the key.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...device import Placement, resolve
from ...loading import quantize as q
from ...loading.io import CheckpointError, fmt_keys, safetensors_files
from .config import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_KEY = "quantization_config"
TAG = "bitdance_quantize"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_ST_DTYPE = {"int8": {"qdata": "I8", "scale": "F32", "zero_point": "I8"},
             "fp8": {"qdata": "F8_E4M3", "scale": "F32"}}
_TYPE = {"int8": "Int8Tensor", "fp8": "Float8Tensor"}
QUANTIZED_MODULES = "model.layers.*.self_attn.{q,k,v,o}_proj, model.layers.*.mlp.{gate,up,down}_proj"
EMBED_MODULE = "model.embed_tokens"  # also quantised with int8 from format 2
FORMAT_KEY = "bitdance_format"
FORMAT = 2


def stored_mode(model_dir: str | Path) -> str:
    """``int8`` / ``fp8`` for a pre-quantised directory, ``none`` for an official one."""
    path = Path(model_dir) / "config.json"
    qc = json.loads(path.read_text()).get(CONFIG_KEY)
    if qc is None:
        return "none"
    if not isinstance(qc, dict) or qc.get("quant_method") != "torchao" or qc.get(TAG) not in ("int8", "fp8"):
        raise CheckpointError(f"{path}: {CONFIG_KEY} {qc!r} is not a bitdance pre-quantised checkpoint "
                              f"(expected quant_method 'torchao' and {TAG} 'int8' or 'fp8')")
    return qc[TAG]


def stored_format(model_dir: str | Path) -> int:
    """The format version of a pre-quantised directory (1 when absent: written before versions existed)."""
    path = Path(model_dir) / "config.json"
    v = json.loads(path.read_text()).get(CONFIG_KEY, {}).get(FORMAT_KEY, 1)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= FORMAT:
        raise CheckpointError(f"{path}: {CONFIG_KEY}.{FORMAT_KEY} {v!r} is not supported by this bitdance (it "
                              f"reads formats 1 to {FORMAT}); re-run `bitdance quantize` from the original checkpoint")
    return v


def stored_embedding(model_dir: str | Path) -> bool:
    """Whether a pre-quantised directory stores the prior's embedding table quantised (int8, format >= 2)."""
    mode, version = stored_mode(model_dir), stored_format(model_dir)
    if mode == "int8" and version < 2:
        logger.warning("%s: pre-quantised int8 checkpoint of format %d keeps the token embedding table unquantised; "
                       "re-run `bitdance quantize` to store it in int8 too", model_dir, version)
    return version >= 2


def checksafetensors_files(model_dir: str | Path, files: dict[str, Path]) -> str:
    """The directory's stored mode, after checking that every LLM file's header agrees with it."""
    mode = stored_mode(model_dir)
    for path in sorted(set(files.values())):
        with safe_open(str(path), "pt") as f:
            tag = (f.metadata() or {}).get(TAG, "none")
        if tag != mode:
            raise CheckpointError(f"{path.name}: holds {tag} LLM weights but {Path(model_dir).name}/config.json "
                                  f"says {mode} (a wrong or mixed file in {model_dir})")
    return mode


def _data_key(file_key: str, name: str) -> str:
    mod, attr = file_key.rsplit(".", 1)
    return f"{mod}._{attr}_{name}"


def load_prequantized(llm: torch.nn.Module, sources: dict[str, Path], placement: Placement, mode: str,
                      embedding: bool = True) -> None:
    """Fill the meta-built prior from a pre-quantised directory's LLM files (file key → path), strictly
    (``embedding``: the directory stores the int8 embedding table quantised, ``stored_embedding``)."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    q.torchao()
    weights = {"model." + k: v for k, v in llm.state_dict(keep_vars=True).items()}
    expected: dict[str, tuple[str, str | None, tuple[int, ...]]] = {}  # file key -> (weight key, data name, shape)
    for fk, v in weights.items():
        if q.is_quantized(fk[len("model."):], mode, embedding):
            for name in q.DATA_NAMES[mode]:
                shape = tuple(v.shape) if name == "qdata" else (v.shape[0], 1)
                expected[_data_key(fk, name)] = (fk, name, shape)
        else:
            expected[fk] = (fk, None, tuple(v.shape))
    present = {k for k in sources if not k.startswith("lm_head.")}
    missing, unexpected = set(expected) - present, present - set(expected)
    files = sorted({p.name for p in sources.values()})
    if missing or unexpected:
        parts = [f"missing keys: {fmt_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {fmt_keys(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{files} (pre-quantised {mode}): " + "; ".join(parts))
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(sources[k], []).append(k)
    for path, keys in by_file.items():  # shapes, dtypes and descriptions first: nothing is read before they pass
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            for k in keys:
                wk, name, want = expected[k]
                sl = f.get_slice(k)
                if tuple(sl.get_shape()) != want:
                    raise CheckpointError(f"{path.name}: key {k} has shape {tuple(sl.get_shape())}, expected {want}")
                if name is not None:
                    if sl.get_dtype() != _ST_DTYPE[mode][name]:
                        raise CheckpointError(f"{path.name}: key {k} has dtype {sl.get_dtype()}, expected "
                                              f"{_ST_DTYPE[mode][name]} for {mode}")
                    desc = meta.get(wk)
                    if desc is None or json.loads(desc).get("_type") != _TYPE[mode]:
                        raise CheckpointError(f"{path.name}: the header does not describe {wk} as a {_TYPE[mode]}")
    state: dict[str, torch.Tensor] = {}
    for wk in weights:
        key = wk[len("model."):]
        if not q.is_quantized(key, mode, embedding):
            with safe_open(str(sources[wk]), "pt", device="cpu") as f:
                state[key] = f.get_tensor(wk).to(device=placement.device, dtype=placement.dtype)
            continue
        data = {}
        for name in q.DATA_NAMES[mode]:
            with safe_open(str(sources[_data_key(wk, name)]), "pt", device="cpu") as f:
                data[_data_key(wk, name)] = f.get_tensor(_data_key(wk, name))
                desc = (f.metadata() or {})[wk]
        restored, _ = unflatten_tensor_state_dict(data, {wk: desc, "tensor_names": json.dumps([wk])})
        state[key] = q.to_placement(restored[wk], mode, placement)
        del data, restored
    llm.load_state_dict(state, strict=True, assign=True)


def write_quantized(model_dir: str | Path, out_dir: str | Path, mode: str, device: str | None = "cpu") -> Path:
    """Write ``model_dir`` quantised (``int8`` | ``fp8``) to the new directory ``out_dir``; returns it.

    The quantisation runs on ``device`` (default CPU; it is the same arithmetic as a quantised load). Each LLM
    file is read tensor by tensor and written before the next one is read, so memory holds one quantised shard.
    """
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    src, out = Path(model_dir), Path(out_dir)
    mode = q.check_mode(mode)
    if mode == "none":
        raise q.QuantizeError("bitdance quantize needs --quantize int8 or fp8")
    ModelConfig.from_dir(src)  # a valid official directory
    files = safetensors_files(src)
    if checksafetensors_files(src, files) != "none":
        raise CheckpointError(f"{src} is already pre-quantised ({stored_mode(src)})")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output directory {out} exists and is not empty")
    tao = q.torchao()
    placement = resolve(device, None)
    out.mkdir(parents=True, exist_ok=True)
    llm_names = {p.name for p in files.values()} | {"model.safetensors.index.json"}
    for p in sorted(src.iterdir()):
        if p.name in llm_names or not p.is_file():
            continue
        if p.suffix in _PICKLE_SUFFIXES:
            logger.warning("not copying %s: pickle files are not part of a pre-quantised checkpoint", p.name)
            continue
        shutil.copy2(p, out / p.name)
    weight_map: dict[str, str] = {}
    total = 0
    for path in sorted(set(files.values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), "pt", device="cpu") as f:
            keys = list(f.keys())
        for k in keys:
            with safe_open(str(path), "pt", device="cpu") as f:
                t = f.get_tensor(k)
            if k.startswith("model.") and q.is_quantized(k[len("model."):], mode):
                t = q.quantize_weight(t, mode, placement.device, t.dtype)
                t = q.to_placement(t, mode, Placement(torch.device("cpu"), t.dtype, "storage"))
            tensors[k] = t
        data, meta = flatten_tensor_state_dict(tensors)
        del tensors
        meta.update({TAG: mode, "format": "pt"})
        save_file(data, str(out / path.name), metadata=meta)
        shutil.copymode(path, out / path.name)
        weight_map.update({k: path.name for k in data})
        total += sum(t.numel() * t.element_size() for t in data.values())
        del data
    if (src / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total, TAG: mode}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = json.loads((src / "config.json").read_text())
    modules = QUANTIZED_MODULES + (f", {EMBED_MODULE}" if mode == "int8" else "")
    cfg[CONFIG_KEY] = {"quant_method": "torchao", TAG: mode, FORMAT_KEY: FORMAT, "quantized_modules": modules,
                       "torchao_version": tao.__version__, "format": "torchao safetensors (flatten_tensor_state_dict)"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    logger.info("wrote %s-quantised checkpoint %s (%.1f MiB of LLM weights)", mode, out, total / 2**20)
    return out
