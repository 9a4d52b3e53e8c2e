"""``POST /v1/tokenize`` (image -> binary tokens) and ``POST /v1/detokenize`` (tokens -> image).

Registered when the tokenizer is enabled (``--tokenizer-routes``, or a lone autoencoder ``--model``). This
side checks everything it can without the model (base64, image format and header size, the size policy,
``token_shape`` and the packing; ``bitdance_core.tokenize``), so a bad request is a 4xx naming its field
and never reaches a worker; the worker encodes or decodes between two engine steps.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from bitdance_core.engine.protocol import Detokenize, ErrorCode, Tokenize
from bitdance_core.tokenize import (
    MAX_INPUT_SIDE,
    RESIZE_MODES,
    TokenizeError,
    TokenizerSpec,
    b64decode,
    plan_resize,
    probe_image,
)
from server.errors import APIError
from server.openapi_text import COMMON_ERRORS, _error, _json
from server.schemas import Int, _whole_float

router = APIRouter()
INVALID = ErrorCode.INVALID.value
PatchSize = Annotated[Literal[1, 2, 4, 8], BeforeValidator(_whole_float)]  # bitdance_core.tokenize.PATCH_SIZES
Side = Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE), BeforeValidator(_whole_float)]


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(..., min_length=1, description="The image, PNG, JPEG or WebP, base64 (a data: URL too).")
    resize: Literal["refuse", "fit", "crop"] = Field(
        "refuse", description="An image of a size the autoencoder does not take: refuse (422), fit (stretch to the "
        "allowed size nearest in aspect ratio) or crop (scale to cover it, centre-crop).")
    patch_size: PatchSize | None = Field(None, description="Token order: patches of patch_size x patch_size tokens; "
                                         "default: the served model's (return_tokens' order), 1 = raster.")


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: str = Field(..., min_length=1, description="Packed bits, base64 (return_tokens' packing).")
    token_shape: list[Int] = Field(..., min_length=2, max_length=2, description="[N, C]: tokens, bits per token.")
    width: Side = Field(..., description="Image width in pixels (N = (width/f) * (height/f)).")
    height: Side = Field(..., description="Image height in pixels.")
    patch_size: PatchSize | None = Field(None, description="Token order of tokens; default: the served model's.")


_ID = {"X-Request-ID": {"description": "The request's id", "schema": {"type": "string"}}}
_ERRORS = {**COMMON_ERRORS, 415: _error("Content-Type other than application/json or multipart/form-data")}
TOKENS_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["tokens", "token_shape", "width", "height", "patch_size", "resized", "original", "resize"],
    "properties": {
        "tokens": {"type": "string", "description": "Packed bits, base64 (numpy.packbits, MSB first, 1 = +1)."},
        "token_shape": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        "width": {"type": "integer", "description": "The size encoded (after resize, if any)."},
        "height": {"type": "integer"},
        "patch_size": {"type": "integer", "description": "The token order used."},
        "resized": {"type": "boolean", "description": "True when the image was resized (never silently)."},
        "original": {"type": "object", "properties": {"width": {"type": "integer"}, "height": {"type": "integer"},
                                                      "format": {"enum": ["png", "jpeg", "webp"]}}},
        "resize": {"enum": list(RESIZE_MODES)},
    },
}
_MULTIPART = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The image file (PNG, JPEG or WebP)."},
        "resize": {"enum": list(RESIZE_MODES)},
        "patch_size": {"enum": [1, 2, 4, 8]},
    },
    "additionalProperties": False,
}
TOKENIZE_DOC: dict[str, Any] = {
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": TokenizeBody.model_json_schema()},
        "multipart/form-data": {"schema": _MULTIPART},
    }}},
    "responses": {200: {**_json("The image's binary tokens", TOKENS_RESULT), "headers": _ID}, **_ERRORS},
}
DETOKENIZE_DOC: dict[str, Any] = {
    "responses": {
        200: {
            "description": "The image: JSON with a base64 PNG, or the PNG itself (Accept: image/png)",
            "content": {
                "application/json": {"schema": {
                    "type": "object", "required": ["b64_json", "format", "width", "height"],
                    "properties": {"b64_json": {"type": "string"}, "format": {"const": "png"},
                                   "width": {"type": "integer"}, "height": {"type": "integer"}}}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
            "headers": _ID,
        },
        **COMMON_ERRORS,
    }
}


def tokenizer_spec(request: Request) -> TokenizerSpec:
    info = request.app.state.pool.info
    if info is None:
        raise APIError("not_ready", "no model worker is ready yet; retry shortly")
    if not info.get("tokenizer"):
        raise APIError("not_ready", "the worker has not loaded the tokenizer (restart with --tokenizer-routes)")
    return TokenizerSpec.from_info(info["tokenizer"])


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        raise APIError(INVALID, f"{field}: {err['msg']}", field=field) from e


def _invalid(e: TokenizeError) -> APIError:
    return APIError(INVALID, str(e), field=e.field, allowed=e.allowed)


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(INVALID, f"the body is not valid JSON: {e}", field="body") from e


async def _tokenize_input(request: Request) -> tuple[bytes, TokenizeBody]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # noqa: BLE001 - python-multipart raises several types for a malformed body
            raise APIError(INVALID, f"malformed multipart body: {e}", field="body") from e
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise APIError(INVALID, "image must be a file part (PNG, JPEG or WebP)", field="image")
        data = await upload.read()
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "image"}
        if "patch_size" in fields:
            try:
                fields["patch_size"] = int(fields["patch_size"])
            except (TypeError, ValueError):
                raise APIError(INVALID, "patch_size must be an integer", field="patch_size") from None
        body = _validated(TokenizeBody, {"image": "-", **fields})
        return data, body
    if ctype not in ("application/json", ""):
        raise APIError("unsupported_media_type", f"Content-Type {ctype!r}: send application/json or "
                       "multipart/form-data", field="Content-Type", allowed=["application/json", "multipart/form-data"])
    body = _validated(TokenizeBody, await _json_body(request))
    try:
        return b64decode(body.image, "image"), body
    except TokenizeError as e:
        raise _invalid(e) from e


@router.post("/v1/tokenize", response_model=None, **TOKENIZE_DOC)
async def tokenize(request: Request) -> Response:
    """An image (JSON with base64, or multipart/form-data) -> its binary tokens, packed as return_tokens."""
    spec = tokenizer_spec(request)
    data, body = await _tokenize_input(request)
    try:
        ps = spec.check_patch_size(body.patch_size)
        fmt, width, height = probe_image(data)
        th, tw = plan_resize(spec, width, height, body.resize, ps)
    except TokenizeError as e:
        raise _invalid(e) from e
    settings = request.app.state.settings
    rid = uuid.uuid4().hex
    out = await request.app.state.pool.tokenizer.call(
        request.app.state.pool, Tokenize(rid, data, th, tw, body.resize, ps),
        settings.max_batch_requests + settings.max_queue, settings.request_timeout_s)
    resized = (th, tw) != (height, width)
    return JSONResponse({
        "tokens": base64.b64encode(out["tokens"]).decode(), "token_shape": out["token_shape"],
        "width": tw, "height": th, "patch_size": out["patch_size"], "resized": resized,
        "original": {"width": width, "height": height, "format": fmt}, "resize": body.resize,
    }, headers={"X-Request-ID": rid, "X-Resized": "true" if resized else "false"})


@router.post("/v1/detokenize", response_model=None, **DETOKENIZE_DOC)
async def detokenize(body: DetokenizeBody, request: Request) -> Response:
    """Packed binary tokens + token_shape + size -> the image (JSON with base64 PNG, or Accept: image/png)."""
    spec = tokenizer_spec(request)
    try:
        ps = spec.check_patch_size(body.patch_size)
        spec.check_size(body.height, body.width, "size", ps)
        data = b64decode(body.tokens, "tokens")
        spec.check_tokens(data, body.token_shape, body.height, body.width)
    except TokenizeError as e:
        raise _invalid(e) from e
    settings = request.app.state.settings
    rid = uuid.uuid4().hex
    out = await request.app.state.pool.tokenizer.call(
        request.app.state.pool, Detokenize(rid, data, tuple(body.token_shape), body.height, body.width, ps),
        settings.max_batch_requests + settings.max_queue, settings.request_timeout_s)
    headers = {"X-Request-ID": rid}
    accept = request.headers.get("accept", "")
    if "image/png" in accept and "application/json" not in accept:
        return Response(out["image"], media_type="image/png", headers=headers)
    return JSONResponse({"b64_json": base64.b64encode(out["image"]).decode(), "format": "png",
                         "width": out["width"], "height": out["height"]}, headers=headers)

