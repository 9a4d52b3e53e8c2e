"""Model configuration parsed once from an official checkpoint directory.

``ModelConfig.from_dir(path)`` reads ``config.json`` (Qwen3), ``ae_config.json`` and
``vision_head_config.json`` and derives the quantities the reference computes inline
(down-sampling factor, patch side). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from ...loading.diffusers_layout import (
    AE_DDCONFIG_KEYS,
    CLASS_DIFFUSERS,
    MODEL_INDEX,
    T2I_COMPONENTS,
    T2I_PIPELINE,
    check_keys,
    check_model_index,
    checkpoint_layout,
    public,
    read_json,
)
from ...loading.io import CheckpointError
from ...models.qwen3_config import LLMConfig

DEFAULT_STEPS = 50  # request default of a checkpoint without serving_config.json: diffusion steps per AR step
DEFAULT_GUIDANCE = 7.5  # and its classifier-free guidance (<= 1 disables it); the released models' values

HEAD_REQUIRED = ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln")
PROJECTOR_ACT = "gelu_pytorch_tanh"  # models/projector.py: gelu with the tanh approximation
# official-layout file names in the shared ModelConfig checks -> their diffusers-layout names
_RENAMES = (("vision_head_config.json", "diffusion_head/config.json"), ("ae_config.json", "autoencoder/config.json"),
            ("config.json hidden_size", "text_encoder/config.json hidden_size"))
HEAD_KEYS = {
    "ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln", "grad_checkpointing", "time_shift",
    "time_schedule", "P_mean", "P_std", "parallel_num", "diff_batch_mul", "use_swiglu",
}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path.name} in checkpoint directory {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs to know about a checkpoint, validated."""

    family: ClassVar[str] = "text_to_image"  # its family in bitdance_core.families.registry
    default_steps: ClassVar[int] = DEFAULT_STEPS  # ServingConfig.for_model starts from these
    default_guidance: ClassVar[float] = DEFAULT_GUIDANCE

    llm: LLMConfig
    ae_ddconfig: dict[str, Any]
    gan_decoder: bool
    head: dict[str, Any]
    name: str = "bitdance"
    model_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.ae_ddconfig) - AE_DDCONFIG_KEYS
        if unknown:
            raise CheckpointError(f"ae_config.json: unknown ddconfig keys {sorted(unknown)}")
        unknown = set(self.head) - HEAD_KEYS
        if unknown:
            raise CheckpointError(f"vision_head_config.json: unknown keys {sorted(unknown)}")
        if self.patch_side**2 != self.parallel_num:
            raise CheckpointError(f"vision_head_config.json: parallel_num={self.parallel_num} is not a square")
        if self.head["ch_cond"] != self.llm.hidden_size:
            raise CheckpointError(
                f"vision_head_config.json: ch_cond={self.head['ch_cond']} != "
                f"config.json hidden_size={self.llm.hidden_size}"
            )
        if self.head["ch_target"] != self.z_channels:
            raise CheckpointError(
                f"vision_head_config.json: ch_target={self.head['ch_target']} != ae z_channels={self.z_channels}"
            )

    @property
    def parallel_num(self) -> int:
        return int(self.head.get("parallel_num", 1))

    @property
    def patch_side(self) -> int:
        return int(math.isqrt(self.parallel_num))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ae_ddconfig["ch_mult"]) - 1)

    @property
    def z_channels(self) -> int:
        return int(self.ae_ddconfig["z_channels"])

    @property
    def time_shift(self) -> float:
        return float(self.head.get("time_shift", 1.0))

    @property
    def is_released_shape(self) -> bool:
        """True for the 14B text-to-image checkpoints (their official size list applies)."""
        return self.llm.hidden_size == 5120 and self.z_channels == 32 and self.downsample == 16

    def depths(self) -> tuple[int, int, int]:
        """(prior layers, head blocks, head adaLN projections): what the memory plan scales (planning/)."""
        return self.llm.num_layers, self.head["depth_latent"], self.head["depth_adanln"]

    def with_depths(self, layers: int, blocks: int, adaln: int) -> ModelConfig:
        """The same model at another depth (the memory plan's shallow copy)."""
        return replace(self, llm=replace(self.llm, num_layers=layers),
                       head={**self.head, "depth_latent": blocks, "depth_adanln": adaln})

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if not p.is_dir():
            raise CheckpointError(f"checkpoint directory {p} does not exist")
        if (p / "model_index.json").is_file() or (p / "transformer").is_dir():  # diffusers (diffusers_layout.py)
            return t2i_config(p)
        llm = LLMConfig.from_hf_dict(_read_json(p / "config.json"))
        ae = _read_json(p / "ae_config.json")
        if "ddconfig" not in ae:
            raise CheckpointError("ae_config.json: missing key 'ddconfig'")
        if ae.get("checkpoint"):
            raise CheckpointError("ae_config.json: 'checkpoint' must be null (weights come from ae.safetensors)")
        unknown = set(ae) - {"ddconfig", "gan_decoder", "checkpoint"}
        if unknown:
            raise CheckpointError(f"ae_config.json: unknown keys {sorted(unknown)}")
        head = _read_json(p / "vision_head_config.json")
        return cls(
            llm=llm,
            ae_ddconfig=dict(ae["ddconfig"]),
            gan_decoder=bool(ae.get("gan_decoder", False)),
            head=dict(head),
            name=p.resolve().name,
            model_dir=str(p.resolve()),
        )


# ---- the diffusers layout (``loading/diffusers_layout.py`` says which layout a directory has) ----------------

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
