"""AUTOMATIC1111-compatible routes (``--a1111-api`` / ``BITDANCE_A1111_API``), for A1111 clients and bots.

``POST /sdapi/v1/txt2img``, ``GET /sdapi/v1/progress``, ``POST /sdapi/v1/interrupt``, ``GET /sdapi/v1/sd-models``,
``GET``/``POST /sdapi/v1/options``, in A1111's response shapes. A txt2img call is one job of the job store
(``submit_job`` of ``/generate``: queue refusals are HTTP errors, the job is readable at ``/v1/jobs/{id}``),
awaited like a ``/generate`` call (``waits.completed``: a client that goes away cancels it) and interrupted through
the pool's cancel path. Progress reports the oldest unfinished txt2img call (A1111 runs one at a time): the
engine's patch counter, an ETA from the time per patch so far, the newest engine preview. Errors keep this
server's JSON error shape (422 naming the field). Text-to-image models only. Field mapping:
``server/a1111_schemas.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from bitdance_core.engine.protocol import ErrorCode
from bitdance_core.png_metadata import image_parameters, infotext
from server.a1111_schemas import SAMPLER, A1111Options, Txt2ImgBody, current_options, patch_schema
from server.class_params import is_class_conditional
from server.errors import APIError
from server.jobs import Job
from server.openapi_text import COMMON_ERRORS
from server.params import b64, build_request, preview_every_for
from server.routes.generate import model_info, submit_job
from server.waits import completed

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
INVALID = ErrorCode.INVALID.value
PREVIEWS = 4  # previews per txt2img call, for /progress's current_image
_OBJ = {"application/json": {"schema": {"type": "object"}}}


def _doc(description: str, schema: dict[str, Any] | None = None, errors: tuple[int, ...] = (401, 503)) -> dict:
    content = {"application/json": {"schema": schema or {"type": "object"}}}
    return {"responses": {200: {"description": description, "content": content},
                          **{k: COMMON_ERRORS[k] for k in errors}}}


TXT2IMG_RESULT = {"type": "object", "required": ["images", "parameters", "info"], "properties": {
    "images": {"type": "array", "items": {"type": "string", "description": "base64 PNG (with A1111 infotext)"}},
    "parameters": {"type": "object"}, "info": {"type": "string", "description": "JSON: seed, all_seeds, infotexts"}}}
PROGRESS_RESULT = {"type": "object", "required": ["progress", "eta_relative", "state", "current_image", "textinfo"],
                   "properties": {"progress": {"type": "number"}, "eta_relative": {"type": "number"},
                                  "state": {"type": "object"}, "current_image": {"type": ["string", "null"]},
                                  "textinfo": {"type": ["string", "null"]}}}


class Tracker:
    """The txt2img jobs still running, oldest first (event-loop owned)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def active(self) -> list[Job]:
        self.jobs = [j for j in self.jobs if not j.done]
        return self.jobs


def tracker(request: Request) -> Tracker:
    state = request.app.state
    if not hasattr(state, "a1111"):
        state.a1111 = Tracker()
    return state.a1111


def t2i_info(request: Request) -> dict[str, Any]:
    info = model_info(request)
    if is_class_conditional(info):
        raise APIError(INVALID, "the AUTOMATIC1111 routes serve text-to-image models; this server holds a "
                                "class-conditional model: use POST /generate with class_label")
    return info


def check_options(opts: A1111Options | None, info: dict[str, Any], field: str) -> None:
    """Options can be set to their current values only (one model, one format per server)."""
    current = current_options(info)
    for key, value in (opts.model_dump(exclude_unset=True) if opts is not None else {}).items():
        if value is not None and value != current[key]:
            raise APIError(INVALID, f"{key} cannot be changed on this server (it is {current[key]!r})",
                           field=f"{field}.{key}" if field else key, allowed=[current[key]])


@router.post("/txt2img", response_model=None, operation_id="a1111_txt2img",
             **_doc("A1111's txt2img response", TXT2IMG_RESULT, (401, 413, 422, 429, 503, 504)))
async def txt2img(body: Txt2ImgBody, request: Request) -> Response:
    """Generate ``batch_size`` x ``n_iter`` images of one prompt (one request, one seed, as ``/generate``)."""
    info = t2i_info(request)
    check_options(body.override_settings, info, "override_settings")
    if body.cfg_scale is not None:
        lo, hi = info["limits"]["guidance_scale"]
        if not lo <= body.cfg_scale <= hi:
            raise APIError(INVALID, f"cfg_scale must be between {lo} and {hi} (got {body.cfg_scale})",
                           field="cfg_scale", allowed={"min": lo, "max": hi})
    req = build_request(
        info, prompt=body.prompt, negative_prompt=body.negative_prompt or None, width=body.width, height=body.height,
        size_field="width", num_images=body.batch_size * body.n_iter, num_images_field="batch_size",
        steps=body.steps, guidance_scale=body.cfg_scale, seed=None if body.seed == -1 else body.seed,
        output_format="png", preview_every=0)
    req = dataclasses.replace(req, preview_every=preview_every_for(info, req.height, req.width, PREVIEWS))
    job = await submit_job(request, req, "a1111")
    tracker(request).jobs.append(job)
    data = await completed(request, job.st, request.app.state.pool)  # an interrupt: a failed cancel (499)
    n, seed = len(data["images"]), int(data["seed"])
    texts = [infotext(image_parameters(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed,
                                       steps=req.steps, guidance_scale=req.guidance_scale, width=req.width,
                                       height=req.height, model=info["model"], index=i, num_images=n))
             for i in range(n)]
    out_info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * n, "seed": seed, "all_seeds": [seed] * n,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": req.width, "height": req.height,
        "sampler_name": SAMPLER, "cfg_scale": req.guidance_scale, "steps": req.steps,
        "batch_size": body.batch_size, "n_iter": body.n_iter, "restore_faces": False, "sd_model_name": info["model"],
        "sd_model_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "version": "bitdance-serve",
        "job_id": job.id,
    }
    images = [b64(im["data"]) for im in data["images"]] if body.send_images else []
    return JSONResponse({"images": images, "parameters": body.model_dump(mode="json"), "info": json.dumps(out_info)},
                        headers={"X-Request-ID": job.id})


@router.get("/progress", response_model=None, operation_id="a1111_progress",
            **_doc("Progress of the oldest running txt2img call", PROGRESS_RESULT))
async def progress(
    request: Request,
    skip_current_image: Annotated[bool, Query(description="Leave current_image out")] = False,
) -> dict[str, Any]:
    """``progress`` 0-1 over the AR patches, ``eta_relative`` seconds left at the time per patch so far,
    ``current_image`` the newest preview (base64), ``state.job_count`` the txt2img calls unfinished."""
    active = tracker(request).active()
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(active), "job_timestamp": "0",
             "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    body: dict[str, Any] = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                            "textinfo": None}
    if not active:
        return body
    job = active[0]
    state["job"] = job.id
    state["job_timestamp"] = time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at))
    if job.progress is None:
        body["textinfo"] = "queued" if not job.started else "started"
        return body
    done, total = int(job.progress["patch"]), max(1, int(job.progress["patches"]))
    state["sampling_step"], state["sampling_steps"] = done, total
    frac = done / total
    started = next((e.data for e in job.log if e.name == "started"), None)
    if started is not None and done > 0:
        elapsed = time.monotonic() - (job.st.created + float(started.get("queue_s", 0.0)))
        body["eta_relative"] = round(max(0.0, elapsed) * (total - done) / done, 3)
    body["progress"] = round(frac, 4)
    body["textinfo"] = f"patch {done}/{total}, {job.progress['diffusion_steps']} diffusion steps each"
    if job.preview is not None and not skip_current_image:
        body["current_image"] = job.preview["b64_json"]
    return body


@router.post("/interrupt", response_model=None, operation_id="a1111_interrupt",
             **_doc("Always {} (A1111's answer)"))
async def interrupt(request: Request) -> dict[str, Any]:
    """Cancel the oldest unfinished txt2img call (the one /progress reports); its caller gets an error.
    Requests of the other routes are not touched."""
    active = tracker(request).active()
    if active:
        request.app.state.pool.cancel(active[0].st, ErrorCode.CANCELLED.value,
                                      "interrupted by POST /sdapi/v1/interrupt")
    return {}


@router.get("/sd-models", response_model=None, operation_id="a1111_sd_models",
            **_doc("The served model (one per server)", {"type": "array", "items": {"type": "object"}}))
async def sd_models(request: Request) -> list[dict[str, Any]]:
    info = t2i_info(request)
    name = info["model"]
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]


@router.get("/options", response_model=None, operation_id="a1111_get_options", **_doc("A1111 options"))
async def get_options(request: Request) -> dict[str, Any]:
    return current_options(t2i_info(request))


@router.post("/options", response_model=None, operation_id="a1111_set_options",
             **_doc("Accepted (the values were already current): null", {"type": "null"}, (401, 422, 503)))
async def set_options(body: A1111Options, request: Request) -> Response:
    """Only the current values can be 'set' (one model, PNG); anything else is a 422 naming the option."""
    check_options(body, t2i_info(request), "")
    return JSONResponse(None)


def install(app: FastAPI) -> None:
    """Add the routes and the served model's bounds to the OpenAPI schema (after ``install_openapi``)."""
    app.include_router(router)
    prior = app.openapi
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        schema = prior()
        info = app.state.pool.info
        if info is None or is_class_conditional(info):
            return schema
        key = (id(schema), repr((info.get("model"), info.get("sizes"), info.get("limits"))))
        if cache.get("key") != key:
            cache["key"], cache["schema"] = key, patch_schema(schema, info)
        return cache["schema"]

    app.openapi = openapi  # type: ignore[method-assign]
