"""``POST /generate``: JSON, a raw image (``Accept: image/png|jpeg|webp``) or SSE.

SSE events: ``queued`` {position}, ``progress`` {step, total_steps}, ``preview`` {step,
total_steps, b64_json, width, height, format}, then exactly one ``completed`` (the JSON response
body) or ``error`` {code, message}.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bitdance_core.engine.protocol import ErrorCode
from server.errors import APIError
from server.params import b64, build_request, completed_body
from server.schemas import GenerateBody
from server.sse import ClientGone, Event, first_event, frame, sse_response, wait_result

router = APIRouter()

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def negotiate(accept: str | None) -> str:
    """'json', 'sse' or an image format, from the first recognised media range of ``Accept``."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        if media == "text/event-stream":
            return "sse"
        if media in IMAGE_TYPES:
            return IMAGE_TYPES[media]
        if media in ("application/json", "application/*", "*/*"):
            return "json"
    return "json"


def model_info(request: Request) -> dict[str, Any]:
    info = request.app.state.pool.info
    if info is None:
        raise APIError("not_ready", "no model worker is ready yet; retry shortly")
    return info


@router.post("/generate", response_model=None)
async def generate(body: GenerateBody, request: Request) -> Response:
    pool = request.app.state.pool
    settings = request.app.state.settings
    mode = negotiate(request.headers.get("accept"))
    output_format = body.output_format
    if mode in IMAGE_TYPES.values():
        if body.stream:
            raise APIError(ErrorCode.INVALID.value, "stream cannot be combined with Accept: image/*", field="stream")
        if output_format not in (None, mode):
            raise APIError(
                ErrorCode.INVALID.value,
                f"output_format {output_format!r} contradicts Accept: image/{mode}",
                field="output_format",
            )
        output_format = mode
        if body.num_images not in (None, 1):
            raise APIError(
                ErrorCode.INVALID.value,
                "a raw image response (Accept: image/*) holds one image; use num_images 1 or Accept JSON",
                field="num_images",
                allowed={"min": 1, "max": 1},
            )
    streaming = body.stream or mode == "sse"
    req = build_request(
        model_info(request),
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=body.width,
        height=body.height,
        size_field="size",
        num_images=body.num_images,
        num_images_field="num_images",
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        output_format=output_format,
        preview_every=None if streaming else 0,
        return_tokens=body.return_tokens,
        class_label=body.class_label,
        cfg_schedule=body.cfg_schedule,
    )
    st = pool.submit(req)
    headers = {"X-Request-ID": req.request_id}

    if streaming:
        first = await first_event(st)
        if first is not None and first[0] == "failed":
            raise APIError.from_failed(first[1])

        def render(event: Event) -> Iterable[bytes]:
            kind, data = event
            if kind == "queued":
                yield frame("queued", {"position": data.get("position", 0)})
            elif kind == "progress":
                yield frame("progress", {"step": data["step"], "total_steps": data["total_steps"]})
            elif kind == "preview":
                yield frame(
                    "preview",
                    {
                        "step": data["step"],
                        "total_steps": data.get("total_steps"),
                        "b64_json": b64(data["image"]),
                        "width": data.get("width"),
                        "height": data.get("height"),
                        "format": data.get("format", "jpeg"),
                    },
                )
            elif kind == "completed":
                yield frame("completed", completed_body(data, time.monotonic() - st.created, req.return_tokens))
            elif kind == "failed":
                yield frame("error", {"code": data.get("code"), "message": data.get("message")})

        return sse_response(st, pool, render, settings.stream_heartbeat_s, first, headers)

    try:
        kind, data = await wait_result(request, st, pool)
    except ClientGone:
        return Response(status_code=499)
    if kind == "failed":
        raise APIError.from_failed(data)
    body_out = completed_body(data, time.monotonic() - st.created, req.return_tokens)
    if mode in IMAGE_TYPES.values():
        image = data["images"][0]
        timings = body_out["timings"]
        headers.update(
            {
                "X-Seed": str(body_out["seed"]),
                "X-Width": str(body_out["width"]),
                "X-Height": str(body_out["height"]),
                "X-Queue-Time": str(timings["queue_s"]),
                "X-Generation-Time": str(timings["generation_s"]),
                "X-Total-Time": str(timings["total_s"]),
            }
        )
        return Response(image["data"], media_type=f"image/{image.get('format', mode)}", headers=headers)
    return JSONResponse(body_out, headers=headers)
