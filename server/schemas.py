"""Request bodies of ``POST /generate`` and ``POST /v1/images/generations``.

Only what can be checked without the model is checked here (types, enums, static bounds, unknown
keys); ranges that depend on the served checkpoint (sizes, steps, guidance, images per request,
prompt length) are checked in :mod:`server.params` against the worker's ``WorkerReady.info``.
Nothing is clamped: out of range is a 422 naming the field and the allowed values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OutputFormat = Literal["png", "jpeg", "webp"]
MAX_SEED = 2**63 - 1


class GenerateBody(BaseModel):
    """``POST /generate``. Unset optional fields take the model's defaults (``GET /info``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(None, min_length=1, description="What to draw (required for text-to-image models; "
                               "on a class-conditional model, exactly an ImageNet class name).")
    class_label: int | list[int] | None = Field(None, description="Class-conditional models: an ImageNet label "
                                                "0-999, or one per image (num_images defaults to its length).")
    cfg_schedule: Literal["linear", "constant"] | None = Field(None, description="Class-conditional models: "
                                                               "guidance over the AR steps (default linear).")
    negative_prompt: str | None = Field(None, description="Replaces the unconditional (CFG) prompt.")
    width: int | None = Field(None, description="Image width; must form an allowed size with height.")
    height: int | None = Field(None, description="Image height; must form an allowed size with width.")
    num_images: int | None = Field(None, description="Images for this prompt (one seed, batched).")
    steps: int | None = Field(None, description="Diffusion sampling steps per AR step.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance; <= 1 disables CFG.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when absent; always returned.")
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp.")
    stream: bool = Field(False, description="Server-sent events with progress and previews.")
    return_tokens: bool = Field(False, description="Also return the binary tokens (packed bits, base64).")


class OpenAIImageBody(BaseModel):
    """``POST /v1/images/generations`` (OpenAI Images API subset plus BitDance extensions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="Accepted for compatibility; the served model is used.")
    n: int | None = Field(None, description="Images to generate.")
    size: str | None = Field(None, description="'WxH' from GET /info, or 'auto' for the default size.")
    response_format: Literal["b64_json"] | None = Field(None, description="Only b64_json (no URLs).")
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100, description="Accepted; encoder default used.")
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None, description="Accepted; steps / guidance_scale control quality here."
    )
    background: Literal["auto", "opaque"] | None = Field(None, description="No transparent backgrounds.")
    moderation: Literal["auto", "low"] | None = None
    style: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3, description="Previews streamed before the image.")
    # BitDance extensions (pass with the openai client's extra_body=...)
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
