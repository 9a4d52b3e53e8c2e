"""Async jobs: ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events``, ``DELETE``.

A job takes the ``/generate`` body (without ``stream``) and answers ``202`` at once; the same
ids come from streaming ``/generate`` calls. Errors are in the ``/generate`` shape (422, not
OpenAI's 400): these routes are BitDance's, not OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from bitdance_core.engine.protocol import ErrorCode
from server.dispatch import canceller, shared
from server.errors import APIError
from server.jobs import Job
from server.openapi_text import JOB_CREATE_DOC, JOB_DELETE_DOC, JOB_EVENTS_DOC, JOB_GET_DOC
from server.routes.generate import model_info, request_from_body, submit_job
from server.schemas import GenerationParams
from server.sse import job_response

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# NOTE: no pattern on the path: a malformed id is an unknown job (404), as the README promises
JobId = Annotated[str, Path(description="The id from POST /v1/jobs or a stream's X-Request-ID (32 hex digits)")]


async def _lookup(request: Request, job_id: str, live: bool = False) -> Job:
    """The job in memory, or with a shared queue its mirror from Redis (``live``: followed until it ends)."""
    queue = shared(request)
    if queue is not None:
        try:
            job = await queue.open(job_id, live)
            why = None if job is not None else await queue.gone(job_id)
        except Exception as exc:  # noqa: BLE001 - redis errors without importing redis here
            raise APIError("queue_unavailable", f"the shared job queue (Redis) is unreachable: {exc}") from exc
        if job is not None:
            return job
    else:
        jobs = request.app.state.jobs
        job = jobs.get(job_id)
        if job is not None:
            return job
        why = jobs.was_here(job_id)
    if why is not None:
        raise APIError("job_expired", f"job {job_id} is gone ({why}); results are kept for a while only")
    raise APIError("job_not_found", f"no job {job_id}")


@router.post("", response_model=None, operation_id="create_job", **JOB_CREATE_DOC)
async def create_job(body: GenerationParams, request: Request) -> JSONResponse:
    """Queue a generation; poll ``status_url`` or stream ``events_url`` (replayed from the start)."""
    req = request_from_body(model_info(request), body, body.output_format, None)
    job = await submit_job(request, req, "job")
    out = job.describe("")
    return JSONResponse(
        {k: out[k] for k in ("id", "status", "status_url", "events_url")},
        status_code=202,
        headers={"Location": out["status_url"], "X-Request-ID": job.id},
    )


@router.get("/{job_id}", response_model=None, operation_id="get_job", **JOB_GET_DOC)
async def get_job(
    job_id: JobId,
    request: Request,
    preview: Annotated[bool, Query(description="Include the newest preview image")] = False,
) -> dict[str, Any]:
    """Status, queue position, progress, the newest preview (``?preview=true``), result or error."""
    return (await _lookup(request, job_id)).describe("", preview=preview)


@router.get("/{job_id}/events", response_model=None, operation_id="job_events", **JOB_EVENTS_DOC)
async def job_events(job_id: JobId, request: Request) -> Response:
    """The job's ``/generate`` SSE events from its start, then live; closing it leaves the job running."""
    job = await _lookup(request, job_id, live=True)
    return job_response(job, canceller(request), request.app.state.settings.stream_heartbeat_s, False, {})


@router.delete("/{job_id}", response_model=None, operation_id="delete_job", **JOB_DELETE_DOC)
async def delete_job(job_id: JobId, request: Request) -> dict[str, Any]:
    """Cancel the job if it still runs (its rows are freed at the engine's next step), then delete it:
    later reads answer 410."""
    job = await _lookup(request, job_id)
    queue = shared(request)
    if queue is not None:
        await queue.delete(job)
        return {**job.describe(""), "deleted": True}
    if not job.st.finished:
        request.app.state.pool.cancel(job.st, ErrorCode.CANCELLED.value, "cancelled by DELETE /v1/jobs/{id}")
    out = job.describe("")
    request.app.state.jobs.delete(job_id)
    return {**out, "deleted": True}
