"""The Qwen3 prior's configuration (``config.json``, Hugging Face's keys), checked. Torch-free.

The text-to-image checkpoints carry it; ``models/qwen3.py`` builds the decoder from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..loading.io import CheckpointError


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
