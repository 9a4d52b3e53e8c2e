"""OpenAI-compatible ``POST /v1/images/generations``, ``GET /v1/models`` and ``GET /v1/models/{id}``.

Streaming follows the Images API: ``image_generation.partial_image`` events (``partial_image_index``
0-based, at most ``partial_images`` of them, each with the ``output_format`` of its own bytes: previews
are JPEG) then one ``image_generation.completed`` per image,
with ``type`` inside the JSON data (the official client dispatches on it). A failure is an
``error`` event whose data is ``{"type": "error", "error": {code, message}}``, which the client
raises as ``APIError``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bitdance_core.engine.protocol import ErrorCode
from server.dispatch import canceller, submit
from server.errors import APIError
from server.openapi_text import MODEL_DOC, MODELS_DOC, OPENAI_DOC
from server.params import ar_steps, b64, build_request, parse_size, preview_every_for
from server.routes.generate import model_info
from server.schemas import OpenAIImageBody
from server.sse import Event, frame, sse_response
from server.waits import completed, first_or_refuse

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")
INVALID = ErrorCode.INVALID.value


def quality_steps(info: dict[str, Any]) -> dict[str, int]:
    """Diffusion steps per patch for each OpenAI ``quality`` (documented in the README and /info)."""
    default = int(info["defaults"]["steps"])
    lo, hi = (int(v) for v in info["limits"]["steps"])
    low, high = max(lo, default // 2), min(hi, default * 2)
    return {"low": low, "medium": default, "auto": default, "standard": default, "high": high, "hd": high}


def _check_fields(body: OpenAIImageBody, info: dict[str, Any], aliases: list[str]) -> None:
    if body.model is not None and body.model not in (info["model"], *aliases):
        raise APIError(
            "model_not_found",
            f"The model {body.model!r} does not exist; this server serves {info['model']!r} "
            f"(aliases: {', '.join(aliases) or 'none'}), see GET /v1/models",
            field="model",
        )
    if body.style is not None:
        raise APIError(INVALID, "style is not supported: BitDance has no styles (a DALL-E 3 option)", field="style")
    if body.output_compression is not None and (body.output_format or "png") == "png":
        raise APIError(
            INVALID, "output_compression applies to jpeg and webp; png is lossless", field="output_compression"
        )
    if body.quality not in (None, "auto") and body.steps is not None:
        raise APIError(INVALID, "give quality or steps, not both (quality maps to a step count)", field="quality")


def _usage(info: dict[str, Any], height: int, width: int, n: int, data: dict[str, Any]) -> dict[str, Any]:
    prompt_tokens = int(data.get("prompt_tokens", 0))
    image_tokens = ar_steps(info, height, width) * int(info["parallel_num"]) * n
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
        "output_tokens": image_tokens,
        "total_tokens": prompt_tokens + image_tokens,
        "output_tokens_details": {"image_tokens": image_tokens, "text_tokens": 0},
    }


def _model_object(request: Request, model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(request.app.state.started_at), "owned_by": "bitdance"}


@router.get("/models", **MODELS_DOC)
async def list_models(request: Request) -> dict[str, Any]:
    info = model_info(request)
    return {"object": "list", "data": [_model_object(request, info["model"])]}


@router.get("/models/{model_id}", **MODEL_DOC)
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """The served model by its id or one of its aliases (``client.models.retrieve``)."""
    info = model_info(request)
    aliases = request.app.state.settings.model_aliases
    if model_id not in (info["model"], *aliases):
        raise APIError("model_not_found", f"The model {model_id!r} does not exist; this server serves "
                       f"{info['model']!r} (aliases: {', '.join(aliases) or 'none'})", field="model")
    return _model_object(request, model_id)


@router.post("/images/generations", response_model=None, **OPENAI_DOC)
async def images_generations(body: OpenAIImageBody, request: Request) -> Response:
    pool = canceller(request)
    info = model_info(request)
    _check_fields(body, info, request.app.state.settings.model_aliases)
    width, height = parse_size(body.size, info)
    quality = body.quality or "auto"
    steps = body.steps if body.steps is not None else quality_steps(info)[quality]
    partial_images = body.partial_images or 0
    if width is None or height is None:
        height, width = info["default_size"]
    req = build_request(
        info,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        size_field="size",
        num_images=body.n,
        num_images_field="n",
        steps=steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        output_format=body.output_format,
        preview_every=preview_every_for(info, height, width, partial_images) if body.stream else 0,
    )
    if body.output_compression is not None:
        req = dataclasses.replace(req, output_compression=body.output_compression)
    if body.user or body.safety_identifier:
        logger.info("request %s: user=%r safety_identifier=%r", req.request_id, body.user, body.safety_identifier)
    st = await submit(request, req)
    req = st.request  # with an Idempotency-Key: the first request's
    common = {
        "size": f"{req.width}x{req.height}",
        "quality": quality,
        "background": "opaque",
        "output_format": req.output_format,
    }
    headers = {"X-Request-ID": req.request_id, "X-Seed": str(req.seed)}

    if body.stream:
        first = await first_or_refuse(st)
        sent = 0

        def render(event: Event) -> Iterable[bytes]:
            nonlocal sent
            kind, data = event
            now = int(time.time())
            if kind == "preview" and sent < partial_images:
                payload = {
                    "type": "image_generation.partial_image",
                    "b64_json": b64(data["image"]),
                    "partial_image_index": sent,
                    "created_at": now,
                    **common,
                    "output_format": data.get("format", "jpeg"),  # the preview's own encoding, not the final's
                }
                sent += 1
                yield frame("image_generation.partial_image", payload)
            elif kind == "completed":
                usage = _usage(info, req.height, req.width, req.num_images, data)
                for image in data["images"]:
                    payload = {
                        "type": "image_generation.completed",
                        "b64_json": b64(image["data"]),
                        "created_at": now,
                        **common,
                        "usage": usage,
                    }
                    yield frame("image_generation.completed", payload)
            elif kind == "failed":
                err = APIError.from_failed(data).body(openai=True)["error"]
                yield frame("error", {"type": "error", "error": err})

        return sse_response(st, pool, render, request.app.state.settings.stream_heartbeat_s, first, headers)

    data = await completed(request, st, pool)
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": [{"b64_json": b64(image["data"]), "revised_prompt": None} for image in data["images"]],
            **common,
            "usage": _usage(info, req.height, req.width, req.num_images, data),
        },
        headers=headers,
    )
