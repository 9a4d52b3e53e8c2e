"""Error classification at the HTTP boundary: one code -> status table, one outcome per request.

Every error body is ``{"error": {"message", "type", "param", "code", "field"?, "allowed"?}}``:
OpenAI's four keys plus ours. The OpenAI-compatible routes (``/v1/images/*``, ``/v1/models``)
drop ``field``/``allowed`` and answer invalid parameters with 400 instead of 422, as OpenAI
does. Worker failure codes (``bitdance_core.engine.protocol.ErrorCode``) map onto HTTP statuses
here and nowhere else; SSE streams carry the same ``{code, message}``.

Accounting: every request to a generation route (``GENERATION_ROUTES``) ends in exactly one
``bitdance_requests_total{status}``: the pool counts the ones a worker saw (at their end),
:func:`count_rejection` the ones refused before (validation, 401, 413, 429, 503).
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
from starlette.routing import Match

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
    "worker_hung": 503,
    "out_of_memory": 503,
    "overloaded": 429,
    "not_ready": 503,
    "queue_unavailable": 503,
    "unauthorized": 401,
    "payload_too_large": 413,
    "not_acceptable": 406,
    "model_not_found": 404,
    "job_not_found": 404,
    "not_found": 404,  # no such route
    "method_not_allowed": 405,
    "job_expired": 410,
    "no_generator": 501,
    "unsupported_media_type": 415,  # a tokenizer-only server (a lone autoencoder --model) asked to generate
}

# the one final status of a generation-route request in bitdance_requests_total{status}
OUTCOME_BY_CODE: dict[str, str] = {
    ErrorCode.INVALID.value: "invalid",
    "not_acceptable": "invalid",
    "model_not_found": "invalid",
    ErrorCode.TOO_LARGE.value: "too_large",
    "payload_too_large": "too_large",
    ErrorCode.QUEUE_FULL.value: "rejected",
    "overloaded": "rejected",
    "not_ready": "rejected",
    "queue_unavailable": "rejected",
    "unauthorized": "rejected",
    ErrorCode.SHUTTING_DOWN.value: "rejected",
    ErrorCode.CANCELLED.value: "cancelled",
    ErrorCode.TIMEOUT.value: "timeout",
    ErrorCode.WORKER_DIED.value: "worker_died",
    "worker_hung": "worker_hung",
    "completed": "completed",
}
OUTCOMES = ("completed", "invalid", "rejected", "too_large", "cancelled", "timeout", "worker_died", "worker_hung",
            "error")

# the breakdown of rejections in bitdance_requests_rejected_total{reason}
REJECT_REASON_BY_CODE: dict[str, str] = {
    ErrorCode.INVALID.value: "validation",
    "not_acceptable": "validation",
    "model_not_found": "validation",
    ErrorCode.TOO_LARGE.value: "too_large",
    "payload_too_large": "payload_too_large",
    ErrorCode.QUEUE_FULL.value: "queue_full",  # the worker's waiting queue
    "overloaded": "queue_full",  # the API's per-worker capacity: the same full queue, seen earlier
    "not_ready": "not_ready",
    "queue_unavailable": "queue_unavailable",
    "unauthorized": "unauthorized",
    ErrorCode.SHUTTING_DOWN.value: "shutting_down",
}

RETRY_AFTER_S = {
    "overloaded": 1, ErrorCode.QUEUE_FULL.value: 1, "not_ready": 5, ErrorCode.WORKER_DIED.value: 2, "worker_hung": 2,
    "out_of_memory": 5, ErrorCode.SHUTTING_DOWN.value: 5, "queue_unavailable": 2,
}
QUEUE_FULL_CODES = ("overloaded", ErrorCode.QUEUE_FULL.value)  # Retry-After from the measured drain (app.state)

# routes whose every request ends in exactly one bitdance_requests_total{status}
GENERATION_ROUTES = frozenset({("POST", "/generate"), ("POST", "/v1/images/generations"), ("POST", "/v1/jobs")})
OPENAI_PREFIXES = ("/v1/images", "/v1/models")


def outcome_of(code: str) -> str:
    return OUTCOME_BY_CODE.get(code, "error")


def is_openai_path(path: str) -> bool:
    """The OpenAI-compatible routes answer errors in OpenAI's shape and with its statuses (400, not 422)."""
    return path.startswith(OPENAI_PREFIXES)


def is_generation_route(method: str, path: str) -> bool:
    return (method, path) in GENERATION_ROUTES


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """An error with a code from ``STATUS_BY_CODE``; raised anywhere, rendered by the handler.

    ``counted`` is set when the request already has its final status (it reached a worker, whose
    end was counted by the pool), so the handler does not count it twice.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        allowed: Any = None,
        retry_after: int | None = None,
        counted: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.allowed = allowed
        self.retry_after = retry_after if retry_after is not None else RETRY_AFTER_S.get(code)
        self.counted = counted

    @property
    def status(self) -> int:
        return STATUS_BY_CODE.get(self.code, 500)

    def status_for(self, openai: bool) -> int:
        if openai and self.status == 422:
            return 400  # OpenAI answers invalid parameters with 400 (the client's BadRequestError)
        return self.status

    def body(self, openai: bool = False) -> dict[str, Any]:
        """Both shapes carry OpenAI's four keys; ours adds ``field`` and ``allowed``."""
        status = self.status_for(openai)
        code = "invalid_api_key" if openai and self.code == "unauthorized" else self.code
        err: dict[str, Any] = {"message": self.message, "type": _openai_type(status), "param": self.field, "code": code}
        if not openai:
            if self.field is not None:
                err["field"] = self.field
            if self.allowed is not None:
                err["allowed"] = self.allowed
        return {"error": err}

    def response(self, openai: bool = False) -> JSONResponse:
        status = self.status_for(openai)
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after and status in (429, 503) else None
        return JSONResponse(self.body(openai), status_code=status, headers=headers)

    @classmethod
    def from_failed(cls, data: dict[str, Any]) -> APIError:
        """From a worker ``failed`` event's data (the pool has counted the request already)."""
        code = str(data.get("code", ErrorCode.INTERNAL.value))
        return cls(
            code, str(data.get("message", code)), field=data.get("field"), allowed=data.get("allowed"), counted=True
        )


def count_rejection(metrics: Any, method: str, path: str, code: str) -> None:
    """Count a generation-route request that ends before reaching a worker (else nothing)."""
    if metrics is None or not is_generation_route(method, path):
        return
    metrics.requests.labels(outcome_of(code)).inc()
    reason = REJECT_REASON_BY_CODE.get(code)
    if reason is not None:
        metrics.rejected.labels(reason).inc()


def _unparsable_body(cause: BaseException | None) -> APIError:
    """A body FastAPI could not parse: too deeply nested for the JSON parser, or not UTF-8."""
    if isinstance(cause, RecursionError):
        message = ("request body nests JSON arrays/objects too deeply to parse (no parameter here nests more than "
                   "two levels)")
    elif isinstance(cause, UnicodeError):
        message = "request body is not UTF-8 encoded JSON"
    else:
        message = f"request body cannot be parsed as JSON ({type(cause).__name__ if cause else 'unknown error'})"
    return APIError(ErrorCode.INVALID.value, message, field="body")


# pydantic's names of union members in an error's loc ("class_label.int"): not part of the client's field name
_UNION_MEMBERS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
                  "list[int]": "a list of integers", "list[str]": "a list of strings", "none": "null"}


def _union_error(errors: list[Any]) -> tuple[str, str] | None:
    """(field, message) when every error is about one union-typed field, told by its members' names."""
    locs = [tuple(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
    if len(locs) < 2:
        return None
    depth = next((i for i in range(min(map(len, locs))) if len({loc[i] for loc in locs}) > 1), None)
    if depth is None or not all(loc[depth] in _UNION_MEMBERS for loc in locs):
        return None
    field = ".".join(locs[0][:depth]) or "body"
    members = " or ".join(dict.fromkeys(_UNION_MEMBERS[loc[depth]] for loc in locs))
    message = f"{field} must be {members}"
    with contextlib.suppress(TypeError, ValueError, KeyError):
        message += f" (got {json.dumps(errors[0]['input'])[:80]})"
    return field, message


def _describe_validation(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    union = _union_error(list(errors))
    if union is not None:
        return APIError(ErrorCode.INVALID.value, union[1], field=union[0])
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
        hint = getattr(request.app.state, "retry_after", None)
        if exc.code in QUEUE_FULL_CODES and hint is not None:
            exc.retry_after = hint() or exc.retry_after
        if not exc.counted:
            count_rejection(getattr(request.app.state, "metrics", None), request.method, request.url.path, exc.code)
        return exc.response(openai=is_openai_path(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # NOTE: FastAPI's answer to a body it cannot parse at all; the cause says why
            return await _api_error(request, _unparsable_body(exc.__cause__))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = APIError(code, str(exc.detail))
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route matched
            headers["Allow"] = ", ".join(_allowed_methods(request))
        openai = is_openai_path(request.url.path)
        return JSONResponse(
            err.body(openai),
            status_code=exc.status_code,
            headers=headers or None,
        )


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)  # PARTIAL: the path matches, the method does not
        if match is not Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)
