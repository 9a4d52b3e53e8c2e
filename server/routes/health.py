"""``/healthz`` (process alive), ``/readyz`` (a worker is ready), ``/metrics``, ``/info``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import bitdance_core
from server.openapi_text import INFO_DOC, METRICS_DOC, READYZ_DOC
from server.params import allowed_sizes
from server.routes.generate import model_info
from server.routes.openai import quality_steps

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None, **READYZ_DOC)
async def readyz(request: Request) -> JSONResponse:
    pool = request.app.state.pool
    ready, total = pool.num_ready, len(pool.workers)
    if pool.draining or pool.closed:
        status = "draining"
    elif ready:
        status = "ready"
    elif pool.load_error is not None:
        status = "failed"  # the model cannot load; no restart will change that
    else:
        status = "starting" if all(w.restarts == 0 and w.state == "starting" for w in pool.workers) else "unavailable"
    states = [{"index": w.index, "state": w.state, "hangs": w.hangs, "restarts": w.restarts} for w in pool.workers]
    body = {"status": status, "workers_ready": ready, "workers": total, "worker_states": states}
    shared = request.app.state.shared
    if shared is not None:  # several replicas: no queue, no service
        body["redis"] = "ok" if shared.up else f"unreachable ({shared.error}); retrying"
        if not shared.up and status == "ready":
            body["status"] = status = "unavailable"
    if status == "failed":
        body["error"] = pool.load_error
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/metrics", response_model=None, **METRICS_DOC)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/info", **INFO_DOC)
async def info(request: Request) -> dict[str, Any]:
    """What the served model accepts: sizes ('WxH'), defaults, limits, and the workers."""
    pool = request.app.state.pool
    if (pool.info or {}).get("kind") == "tokenizer":
        return {"kind": "tokenizer", "model": pool.info["model"], "model_dir": pool.info.get("model_dir"),
                "version": bitdance_core.__version__, "tokenizer": pool.info["tokenizer"],
                "workers": [wk.describe() for wk in pool.workers]}
    info = model_info(request)
    h, w = info["default_size"]
    return {
        "kind": info.get("kind", "text-to-image"),
        **{k: info[k] for k in ("num_classes", "class_names", "cfg_schedules") if k in info},
        **({"size": f"{w}x{h}"} if info.get("kind") == "class-conditional" else {}),
        "model": info["model"],
        "model_dir": info.get("model_dir"),
        "version": bitdance_core.__version__,
        "sizes": allowed_sizes(info),
        "default_size": f"{w}x{h}",
        "defaults": info["defaults"],
        "limits": info["limits"],
        "parallel_num": info["parallel_num"],
        "downsample": info["downsample"],
        "preview_every": info.get("preview_every"),
        "output_formats": ["png", "jpeg", "webp"],
        "tokenizer": info.get("tokenizer"),  # set when the tokenizer routes are on
        "max_queue": request.app.state.settings.max_queue,
        "openai": {"quality_steps": quality_steps(info), "model_aliases": request.app.state.settings.model_aliases},
        "jobs": {
            "ttl_s": request.app.state.settings.job_ttl_s,
            "max_results": request.app.state.settings.job_max_results,
            "max_bytes": request.app.state.settings.job_max_bytes,
        },
        "workers": [
            {
                **wk.describe(),
                "dtype": (wk.info or {}).get("dtype"),
                "quantize": (wk.info or {}).get("quantize"),
                "attention_backend": (wk.info or {}).get("attention_backend"),
            }
            for wk in pool.workers
        ],
    }
