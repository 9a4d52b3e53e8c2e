"""The SSE events of ``POST /generate`` and ``GET /v1/jobs/{id}/events``, from worker events.

One table, used by both routes and by the job store (README "SSE events")::

    queued     {id, position}                                   position 0 = next to start
    started    {id, queue_s}
    progress   {step, total_steps, patch, patches, diffusion_steps}
    preview    {step, total_steps, patch, patches, b64_json, width, height, format}
    completed  the /generate JSON response body
    error      {code, message}
    requeued   {id, reason, attempt}    (shared queue only: its replica was lost; runs again from the start)

``patch`` / ``patches`` count the AR steps (each decodes one patch of ``parallel_num`` tokens) and
``diffusion_steps`` is the request's ``steps`` (sampling steps of the diffusion head per patch);
``step`` / ``total_steps`` are the same numbers as ``patch`` / ``patches``, kept for old clients.
"""

from __future__ import annotations

import time
from typing import Any

from bitdance_core.engine.protocol import GenerationRequest
from server.params import b64, completed_body

Rendered = tuple[str, dict[str, Any]]


def render_generate_event(
    kind: str, data: dict[str, Any], req: GenerationRequest, created: float
) -> Rendered | None:
    """``(event name, payload)`` for one worker event, or None for events clients do not see."""
    if kind == "queued":
        return "queued", {"id": req.request_id, "position": data.get("position", 0)}
    if kind == "started":
        return "started", {"id": req.request_id, "queue_s": round(float(data.get("queue_s", 0.0)), 4)}
    if kind == "progress":
        return "progress", {
            "step": data["step"],
            "total_steps": data["total_steps"],
            "patch": data["step"],
            "patches": data["total_steps"],
            "diffusion_steps": req.steps,
        }
    if kind == "preview":
        return "preview", {
            "step": data["step"],
            "total_steps": data.get("total_steps"),
            "patch": data["step"],
            "patches": data.get("total_steps"),
            "b64_json": b64(data["image"]),
            "width": data.get("width"),
            "height": data.get("height"),
            "format": data.get("format", "jpeg"),
        }
    if kind == "completed":
        return "completed", completed_body(data, time.monotonic() - created, req.return_tokens)
    if kind == "requeued":
        return "requeued", {"id": req.request_id, "reason": data.get("reason"), "attempt": data.get("attempt")}
    if kind == "failed":
        return "error", {"code": data.get("code"), "message": data.get("message")}
    return None
