"""Pure-ASGI middleware: API-key check and request-body size limit.

The body-limit middleware also relabels a JSON object sent as ``application/x-www-form-urlencoded``
(what ``curl -d`` does by default) as ``application/json``: every POST route here takes JSON only.

Both answer before any route runs. The body limit buffers the body (request bodies here are small
JSON) so that a chunked body that crosses the limit is refused with 413 as cleanly as one with an
honest ``Content-Length``; the route then reads the buffered copy, and later ``receive()`` calls
(disconnect detection) go to the server as usual.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.errors import APIError, is_openai_path

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/openapi.json")
OPEN_PREFIXES = ("/static/",)


async def _send_error(send: Send, scope: Scope, err: APIError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    openai = is_openai_path(scope["path"])
    await _send_json(send, err.status_for(openai), err.body(openai), headers)


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` on everything but health, metrics and the web page."""

    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[Scope], None] | None = None) -> None:
        self.app = app
        self.key = api_key.encode()
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject(scope)
        err = APIError("unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")
        await _send_error(send, scope, err, [(b"www-authenticate", b"Bearer")])

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes`` (declared or actual)."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[Scope], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        while not too_big:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            too_big = size > self.max_bytes
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if too_big:
            if self.on_reject is not None:
                self.on_reject(scope)
            err = APIError(
                "payload_too_large",
                f"request body over the limit of {self.max_bytes} bytes",
                field="body",
                allowed={"max_bytes": self.max_bytes},
            )
            await _send_error(send, scope, err, [(b"connection", b"close")])
            return
        body = b"".join(chunks)
        replayed = False
        headers = dict(scope["headers"])
        if (
            headers.get(b"content-type", b"").startswith(b"application/x-www-form-urlencoded")
            and body.lstrip()[:1] == b"{"
        ):
            # NOTE: `curl -d '{...}'` labels JSON as a form; every POST route here takes JSON only
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
