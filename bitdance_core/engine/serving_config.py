"""What a deployment allows and defaults to: sizes, steps, guidance, images, prompt length.

Defaults come from the model (the official size list and 50 steps / guidance 7.5 for the released
checkpoints). A checkpoint directory may carry an optional ``serving_config.json`` (ignored by the
official code) overriding them, e.g. the embedded demo model's 64x64 size and its step count::

    {"sizes": [[64, 64]], "default_size": [64, 64], "default_steps": 20, "default_guidance": 6.0}

Torch-free: the API process may import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..resolutions import SizePolicy, policy_for


class InvalidRequest(ValueError):
    """A request the model cannot honour; ``field`` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.field = field
        self.code = code


@dataclass(frozen=True)
class Limits:
    steps: tuple[int, int] = (1, 200)
    guidance_scale: tuple[float, float] = (0.0, 30.0)
    num_images: tuple[int, int] = (1, 4)
    max_prompt_tokens: int = 512
    max_prompt_chars: int = 4000

    def as_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "guidance_scale": list(self.guidance_scale),
                "num_images": list(self.num_images), "max_prompt_tokens": self.max_prompt_tokens,
                "max_prompt_chars": self.max_prompt_chars}

    def check(self, req) -> None:
        for name, (lo, hi) in (("steps", self.steps), ("guidance_scale", self.guidance_scale),
                               ("num_images", self.num_images)):
            v = getattr(req, name)
            if not lo <= v <= hi:
                raise InvalidRequest(f"{name}={v} is out of range: allowed {lo} to {hi}", field=name)
        for name in ("prompt", "negative_prompt"):
            text = getattr(req, name)
            if text is not None and len(text) > self.max_prompt_chars:
                raise InvalidRequest(f"{name} is {len(text)} characters; at most {self.max_prompt_chars} allowed",
                                     field=name)
        if not 0 <= req.seed < 2**63:
            raise InvalidRequest(f"seed={req.seed} is out of range: allowed 0 to {2**63 - 1}", field="seed")
        if req.preview_every is not None and req.preview_every < 0:
            raise InvalidRequest("preview_every must be >= 0", field="preview_every")


@dataclass(frozen=True)
class ServingConfig:
    default_size: tuple[int, int]
    default_steps: int  # the family's (its config's ``default_steps``) unless serving_config.json says otherwise
    default_guidance: float
    sizes: tuple[tuple[int, int], ...] | None = None  # None: the model's policy
    max_side_px: int = 512  # cap for grid policies (non-released checkpoints)
    limits: Limits = field(default_factory=Limits)

    def size_policy(self, model_config) -> SizePolicy:
        return policy_for(model_config.downsample, model_config.patch_side, model_config.is_released_shape,
                          self.sizes, self.max_side_px)

    @classmethod
    def for_model(cls, model_config, overrides: dict[str, Any] | None = None) -> ServingConfig:
        data: dict[str, Any] = {}
        path = Path(model_config.model_dir) / "serving_config.json" if model_config.model_dir else None
        if path is not None and path.is_file():
            data.update(json.loads(path.read_text()))
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        limits = Limits(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("limits", {}).items()})
        sizes = tuple(tuple(int(x) for x in s) for s in data.pop("sizes")) if data.get("sizes") else None
        max_side = int(data.pop("max_side_px", 512))
        policy = policy_for(model_config.downsample, model_config.patch_side, model_config.is_released_shape,
                            sizes, max_side)
        allowed = policy.allowed()
        if "default_size" in data:
            default = tuple(int(x) for x in data.pop("default_size"))
        elif (1024, 1024) in allowed:
            default = (1024, 1024)
        else:
            squares = [s for s in allowed if s[0] == s[1] and s[0] <= 256] or allowed
            default = max(squares)
        policy.check(*default)
        known = {"default_steps", "default_guidance"}
        unknown = set(data) - known - {"sizes"}
        if unknown:
            raise ValueError(f"serving_config.json: unknown keys {sorted(unknown)}")
        return cls(default_size=default, sizes=sizes, max_side_px=max_side, limits=limits,
                   **{k: data.get(k, getattr(model_config, k)) for k in known})
