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

from ..families.text_to_image.config import AE_DDCONFIG_KEYS, HEAD_KEYS, CheckpointError, LLMConfig, ModelConfig

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
HEAD_REQUIRED = ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln")
PROJECTOR_ACT = "gelu_pytorch_tanh"  # models/projector.py: gelu with the tanh approximation
# official-layout file names in the shared ModelConfig checks -> their diffusers-layout names
_RENAMES = (("vision_head_config.json", "diffusion_head/config.json"), ("ae_config.json", "autoencoder/config.json"),
            ("config.json hidden_size", "text_encoder/config.json hidden_size"))


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


def _check_sizes(sizes: Any) -> None:
    ok = isinstance(sizes, list) and all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and x > 0
                                                                                       for x in s) for s in sizes)
    if not ok:
        raise CheckpointError(f"{MODEL_INDEX}: supported_image_sizes must be a list of [height, width], "
                              f"found {sizes!r}")


def t2i_config(d: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a text-to-image diffusers directory, checked key by key."""
    d = Path(d)
    if checkpoint_layout(d) == CLASS_DIFFUSERS:
        raise CheckpointError(f"{d} holds a class-conditional model (a BitDance-ImageNet-diffusers folder), not a "
                              "text-to-image checkpoint: serve it with `bitdance serve --model`")
    index = check_model_index(d, T2I_PIPELINE, T2I_COMPONENTS, extra=("supported_image_sizes",))
    if "supported_image_sizes" in index:  # the pipeline's own list: the server's size policy governs instead
        _check_sizes(index["supported_image_sizes"])
    te = read_json(d / "text_encoder" / "config.json")
    arch = te.get("architectures")
    if arch is not None and arch != ["Qwen3ForCausalLM"]:
        raise CheckpointError(f"text_encoder/config.json: architectures {arch!r} is not ['Qwen3ForCausalLM']")
    llm = LLMConfig.from_hf_dict(te, source="text_encoder/config.json")

    ae = public(read_json(d / "autoencoder" / "config.json"))
    check_keys(ae, "autoencoder/config.json", ("ddconfig", "gan_decoder"), required=("ddconfig",))
    if not isinstance(ae["ddconfig"], dict):
        raise CheckpointError("autoencoder/config.json: ddconfig must be an object")
    check_keys(ae["ddconfig"], "autoencoder/config.json ddconfig", AE_DDCONFIG_KEYS)
    if not isinstance(ae.get("gan_decoder", False), bool):
        raise CheckpointError(f"autoencoder/config.json: gan_decoder must be true or false, "
                              f"found {ae['gan_decoder']!r}")

    head = public(read_json(d / "diffusion_head" / "config.json"))
    check_keys(head, "diffusion_head/config.json", HEAD_KEYS, required=HEAD_REQUIRED)

    proj = public(read_json(d / "projector" / "config.json"))
    check_keys(proj, "projector/config.json", ("in_dim", "out_dim", "hidden_act"), required=("in_dim", "out_dim"))
    z = ae["ddconfig"].get("z_channels")
    if proj["in_dim"] != z:
        raise CheckpointError(f"projector/config.json: in_dim={proj['in_dim']} != autoencoder z_channels={z}")
    if proj["out_dim"] != llm.hidden_size:
        raise CheckpointError(f"projector/config.json: out_dim={proj['out_dim']} != text_encoder/config.json "
                              f"hidden_size={llm.hidden_size}")
    if proj.get("hidden_act", PROJECTOR_ACT) != PROJECTOR_ACT:
        raise CheckpointError(f"projector/config.json: hidden_act {proj['hidden_act']!r} is not {PROJECTOR_ACT!r}")
    try:
        return ModelConfig(llm=llm, ae_ddconfig=dict(ae["ddconfig"]), gan_decoder=bool(ae.get("gan_decoder", False)),
                           head=head, name=d.resolve().name, model_dir=str(d.resolve()))
    except CheckpointError as e:  # the shared cross-checks name the official files: name this layout's
        msg = str(e)
        for old, new in _RENAMES:
            msg = msg.replace(old, new)
        raise CheckpointError(msg) from e


# ---- class-conditional (BitDance-ImageNet-diffusers) ----------------------------------------------------------

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
