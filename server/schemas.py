"""Request bodies of ``POST /generate`` and ``POST /v1/images/generations``.

Only what can be checked without the model is checked here (types, enums, static bounds, unknown
keys); ranges that depend on the served checkpoint (sizes, steps, guidance, images per request,
prompt length) are checked in :mod:`server.params` against the worker's ``WorkerReady.info``.
Nothing is clamped: out of range is a 422 naming the field and the allowed values.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

OutputFormat = Literal["png", "jpeg", "webp"]
# a prompt needs one character that is not ASCII whitespace (the same in every regex engine)
NOT_BLANK = "[^ \t\n\r\f\v]"
# NOTE: the engine takes seeds below 2**63, but a JSON number is a double for most clients (and for
# JSON Schema validators): above 2**53 two different seeds can read as the same number.
MAX_SEED = 2**53 - 1


def _whole_float(value: object) -> object:
    """``4.0`` is an integer in JSON (and JSON Schema); strings and ``4.5`` stay errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole_float)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_whole_float)]  # (bounds before the validator,
Compression = Annotated[int, Field(ge=0, le=100), BeforeValidator(_whole_float)]  # or they leave the schema)
PartialImages = Annotated[int, Field(ge=0, le=3), BeforeValidator(_whole_float)]


class GenerationParams(BaseModel):
    """``POST /v1/jobs`` (and ``POST /generate`` without ``stream``). Unset optional fields take the
    model's defaults (``GET /info``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(..., min_length=1, description="What to draw.", json_schema_extra={"pattern": NOT_BLANK})
    negative_prompt: str | None = Field(None, description="Replaces the unconditional (CFG) prompt.")
    width: Int | None = Field(None, description="Image width; must form an allowed size with height.")
    height: Int | None = Field(None, description="Image height; must form an allowed size with width.")
    num_images: Int | None = Field(None, description="Images for this prompt (one seed, batched).")
    steps: Int | None = Field(None, description="Diffusion sampling steps per patch (AR step).")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance; <= 1 disables CFG.")
    seed: Seed | None = Field(None, description="Random when absent; always returned.")
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp.")
    return_tokens: bool = Field(False, description="Also return the binary tokens (packed bits, base64).")


class GenerateBody(GenerationParams):
    """``POST /generate``. Unset optional fields take the model's defaults (``GET /info``)."""

    stream: bool = Field(False, description="Server-sent events with progress and previews.")


class OpenAIImageBody(BaseModel):
    """``POST /v1/images/generations`` (OpenAI Images API plus BitDance extensions). Every field has
    an effect or is refused with 400 naming it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(..., min_length=1, json_schema_extra={"pattern": NOT_BLANK})
    model: str | None = Field(None, description="The id from GET /v1/models or an alias (default: 'bitdance').")
    n: Int | None = Field(None, description="Images to generate.")
    size: str | None = Field(None, description="'WxH' from GET /info, or 'auto' for the default size.")
    response_format: Literal["b64_json"] | None = Field(None, description="Only b64_json ('url' is refused).")
    output_format: OutputFormat | None = None
    output_compression: Compression | None = Field(
        None, description="JPEG/WebP quality 0-100 (refused for png); default 90."
    )
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None,
        description="Diffusion steps per patch: low = half the default, auto/medium/standard = the default, "
        "high/hd = twice the default (capped at the model's maximum); GET /info 'openai.quality_steps'. "
        "Conflicts with an explicit 'steps'.",
    )
    background: Literal["auto", "opaque"] | None = Field(None, description="Images are opaque ('transparent' refused).")
    moderation: Literal["auto"] | None = Field(None, description="No content filter exists; 'low' is refused.")
    style: Annotated[str | None, WithJsonSchema({"type": "null", "description": "Refused: no styles."})] = None
    user: str | None = Field(None, description="Logged with the request id.")
    safety_identifier: str | None = Field(None, description="Logged with the request id.")
    stream: bool = False
    partial_images: PartialImages | None = Field(None, description="Previews streamed before the image.")
    # BitDance extensions (pass with the openai client's extra_body=...)
    negative_prompt: str | None = None
    steps: Int | None = None
    guidance_scale: float | None = None
    seed: Seed | None = None
