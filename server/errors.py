"""Error classification at the HTTP boundary: one JSON shape, one code -> status table.

Every error body is ``{"error": {"code", "message", "field"?, "allowed"?}}`` (OpenAI-style
clients read ``error.message``). Worker failure codes (``bitdance_core.engine.protocol.ErrorCode``)
map onto HTTP statuses here and nowhere else; SSE streams carry the same ``{code, message}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitdance_core.engine.protocol import ErrorCode

logger = logging.getLogger(__name__)

STATUS_BY_CODE: dict[str, int] = {
    ErrorCode.INVALID.value: 422,
    ErrorCode.TOO_LARGE.value: 422,
    ErrorCode.QUEUE_FULL.value: 429,
    ErrorCode.CANCELLED.value: 499,  # nginx's "client closed request"; nobody is listening anyway
    ErrorCode.TIMEOUT.value: 504,
    ErrorCode.WORKER_DIED.value: 503,
    ErrorCode.SHUTTING_DOWN.value: 503,
    ErrorCode.INTERNAL.value: 500,
    "overloaded": 429,
    "not_ready": 503,
    "unauthorized": 401,
    "payload_too_large": 413,
    "not_acceptable": 406,
}

# rejections counted in bitdance_requests_rejected_total{reason}
REJECT_REASON_BY_CODE: dict[str, str] = {
    ErrorCode.INVALID.value: "validation",
    ErrorCode.TOO_LARGE.value: "validation",
    ErrorCode.QUEUE_FULL.value: "queue_full",
    "overloaded": "overloaded",
    "not_ready": "not_ready",
    ErrorCode.SHUTTING_DOWN.value: "shutting_down",
}

RETRY_AFTER_S = {"overloaded": 1, ErrorCode.QUEUE_FULL.value: 1, "not_ready": 5, ErrorCode.WORKER_DIED.value: 2}


class APIError(Exception):
    """An error with a code from ``STATUS_BY_CODE``; raised anywhere, rendered by the handler."""

    def __init__(
        self, code: str, message: str, *, field: str | None = None, allowed: Any = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.allowed = allowed
        self.retry_after = retry_after if retry_after is not None else RETRY_AFTER_S.get(code)

    @property
    def status(self) -> int:
        return STATUS_BY_CODE.get(self.code, 500)

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        if self.allowed is not None:
            err["allowed"] = self.allowed
        return {"error": err}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after and self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def from_failed(cls, data: dict[str, Any]) -> APIError:
        """From a worker ``failed`` event's data."""
        code = str(data.get("code", ErrorCode.INTERNAL.value))
        return cls(code, str(data.get("message", code)), field=data.get("field"), allowed=data.get("allowed"))


def _describe_validation(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) if loc else "body"
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        message = f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}"
        field = "body"
    elif kind == "model_attributes_type" or (kind.endswith("_type") and field == "body"):
        message = "request body must be a JSON object (Content-Type: application/json)"
    elif kind == "missing":
        message = f"{field} is required"
    elif kind == "extra_forbidden":
        message = f"{field} is not a known parameter"
    else:
        message = f"{field}: {first.get('msg', 'invalid value')}"
        if "input" in first and kind not in ("json_invalid",):
            with contextlib.suppress(TypeError, ValueError):
                message += f" (got {json.dumps(first['input'])[:80]})"
    allowed = None
    ctx = first.get("ctx") or {}
    if "expected" in ctx:
        allowed = re.findall(r"'([^']*)'", str(ctx["expected"])) or ctx["expected"]
    elif "ge" in ctx or "le" in ctx or "gt" in ctx or "lt" in ctx:
        allowed = {k: v for k, v in ctx.items() if k in ("ge", "le", "gt", "lt")}
    elif "max_length" in ctx or "min_length" in ctx:
        allowed = {k: v for k, v in ctx.items() if k in ("min_length", "max_length")}
    return APIError(ErrorCode.INVALID.value, message, field=field, allowed=allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        reason = REJECT_REASON_BY_CODE.get(exc.code)
        if metrics is not None and reason is not None:
            metrics.rejected.labels(reason).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
