"""Model configuration parsed once from an official checkpoint directory.

``ModelConfig.from_dir(path)`` reads ``config.json`` (Qwen3), ``ae_config.json`` and
``vision_head_config.json`` and derives the quantities the reference computes inline
(down-sampling factor, patch side). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AE_DDCONFIG_KEYS = {"ch", "out_ch", "in_channels", "num_res_blocks", "z_channels", "ch_mult", "resolution", "double_z"}
HEAD_KEYS = {
    "ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln", "grad_checkpointing", "time_shift",
    "time_schedule", "P_mean", "P_std", "parallel_num", "diff_batch_mul", "use_swiglu",
}


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the official layout."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path.name} in checkpoint directory {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> LLMConfig:
        if d.get("model_type", "qwen3") != "qwen3":
            raise CheckpointError(f"{source}: model_type {d.get('model_type')!r} is not 'qwen3'")
        if d.get("rope_scaling") not in (None, {}):
            raise CheckpointError(f"{source}: rope_scaling={d['rope_scaling']!r} is not supported (BitDance uses none)")
        if d.get("use_sliding_window"):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
        try:
            heads = int(d["num_attention_heads"])
            return cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads", heads)),
                head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
                vocab_size=int(d["vocab_size"]),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", 1_000_000.0)),
                max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from e


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs to know about a checkpoint, validated."""

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

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if not p.is_dir():
            raise CheckpointError(f"checkpoint directory {p} does not exist")
        if (p / "model_index.json").is_file() or (p / "transformer").is_dir():  # diffusers (diffusers_layout.py)
            from ...loading.diffusers_layout import t2i_config

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
