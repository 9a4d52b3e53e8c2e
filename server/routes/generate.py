"""``POST /generate``: JSON, a raw image (``Accept: image/png|jpeg|webp``) or SSE.

SSE events (:mod:`server.events`): ``queued``, ``started``, ``progress``, ``preview``, then
exactly one ``completed`` (the JSON response body) or ``error`` {code, message}. A streaming
request is a job (:mod:`server.jobs`): cancellable and readable by id while it runs.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bitdance_core.engine.protocol import ErrorCode, GenerationRequest
from server.dispatch import IDEMPOTENCY_HEADER, canceller, shared, submit
from server.errors import APIError
from server.jobs import Job
from server.openapi_text import GENERATE_DOC
from server.params import build_request, completed_body
from server.schemas import GenerateBody, GenerationParams
from server.sse import job_response
from server.waits import completed, first_or_refuse

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
        load_error = request.app.state.pool.load_error  # no restart fixes it: say so
        raise APIError("not_ready", f"the model could not be loaded: {load_error}" if load_error
                       else "no model worker is ready yet; retry shortly")
    if info.get("kind") == "tokenizer":  # a lone autoencoder --model: POST /v1/tokenize, /v1/detokenize only
        raise APIError("no_generator", f"this server serves the autoencoder {info.get('model')} only (a tokenizer "
                       "service): no generation; use POST /v1/tokenize and /v1/detokenize")
    return info


def request_from_body(
    info: dict[str, Any], body: GenerationParams, output_format: str | None, preview_every: int | None
) -> GenerationRequest:
    return build_request(
        info,
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
        preview_every=preview_every,
        return_tokens=body.return_tokens,
        class_label=body.class_label,
        cfg_schedule=body.cfg_schedule,
    )


async def submit_job(request: Request, req: GenerationRequest, kind: str) -> Job:
    """Submit and register a job; a refusal the worker sends first (queue full, prompt too long in
    tokens) is still answered as an HTTP error, not an accepted job. With a shared queue the job is
    in Redis and this is its mirror (an ``Idempotency-Key`` gives an earlier job back)."""
    queue = shared(request)
    if queue is not None:
        return await queue.submit(req, kind, request.headers.get(IDEMPOTENCY_HEADER))
    st = request.app.state.pool.submit(req)
    jobs = request.app.state.jobs
    job = jobs.add(st, kind)  # before the first await: it sees every event
    try:
        await first_or_refuse(st)
    except APIError:
        jobs.discard(job.id)
        raise
    return job


@router.post("/generate", response_model=None, **GENERATE_DOC)
async def generate(body: GenerateBody, request: Request) -> Response:
    """Generate images: JSON (default), one raw image (``Accept: image/png|jpeg|webp``) or a stream
    of server-sent events (``"stream": true`` or ``Accept: text/event-stream``). A stream's id is in
    its ``queued`` event and the ``X-Request-ID`` header: ``DELETE /v1/jobs/{id}`` cancels it."""
    pool = canceller(request)
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
    req = request_from_body(model_info(request), body, output_format, None if streaming else 0)

    if streaming:
        job = await submit_job(request, req, "stream")
        return job_response(job, pool, settings.stream_heartbeat_s, True, {"X-Request-ID": job.id})

    st = await submit(request, req)
    req = st.request  # with an Idempotency-Key: the first request's
    headers = {"X-Request-ID": req.request_id}
    data = await completed(request, st, pool)
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
