"""``create_app(settings)``: the FastAPI application and its lifespan.

Startup spawns the worker processes and returns at once (``/readyz`` stays 503 until a worker
sends ``WorkerReady``); shutdown stops them. ``drain()`` is the SIGTERM path used by
:mod:`server.cli`: refuse new work with 503, let in-flight requests finish within
``drain_grace_s``, then cancel what is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from bitdance_core.engine.protocol import ErrorCode
from server.drain import retry_after_s
from server.errors import count_rejection, install_error_handlers
from server.jobs import JobStore
from server.metrics import Metrics
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from server.openapi_text import install_openapi
from server.routes import generate, health, jobs, openai, web
from server.settings import Settings
from server.waits import install as install_waits
from server.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    pool = WorkerPool(settings, metrics)
    shared = None
    if settings.redis_url:
        from server.shared_queue import SharedQueue  # imports redis: only with a shared queue

        shared = SharedQueue(settings, pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        if shared is not None:
            await shared.start()
        try:
            yield
        finally:
            await pool.shutdown(timeout_s=max(10.0, settings.drain_grace_s))
            if shared is not None:
                await shared.close()

    app = FastAPI(
        title="bitdance-serve",
        version="0.1.0",
        description="Text-to-image with BitDance: POST /generate, async jobs (/v1/jobs), the OpenAI images "
        "API, SSE previews. Limits in this schema are the served model's (also GET /info).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pool = pool
    app.state.shared = shared
    app.state.retry_after = (
        shared.retry_after if shared is not None else lambda: retry_after_s(pool.num_waiting, pool.drain.rate())
    )
    app.state.started_at = time.time()
    app.state.jobs = JobStore(settings.job_ttl_s, settings.job_max_results, settings.job_max_bytes)
    install_error_handlers(app)
    install_waits(app)  # ClientGone (a client gone before its answer) -> 499
    for module in (generate, jobs, openai, health, web):
        app.include_router(module.router)
    if settings.tokenizer_enabled():  # POST /v1/tokenize, /v1/detokenize
        from server.routes import tokenize

        app.include_router(tokenize.router)
    install_openapi(app, lambda: pool.info, settings.model_aliases)
    if settings.a1111_api:  # AUTOMATIC1111-compatible routes (issue 18), after install_openapi: they patch it
        from server.routes import a1111

        a1111.install(app)
    if web.STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")

    # the last added middleware is the outermost: CORS -> API key -> body limit -> routes
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        on_reject=lambda scope: count_rejection(metrics, scope["method"], scope["path"], "payload_too_large"),
    )
    if settings.api_key is not None and settings.api_key.get_secret_value():
        app.add_middleware(
            APIKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            on_reject=lambda scope: count_rejection(metrics, scope["method"], scope["path"], "unauthorized"),
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["X-Request-ID", "X-Seed", "Retry-After"],
        )
    return app


async def drain(app: FastAPI) -> None:
    """Stop taking requests; wait for in-flight ones up to ``drain_grace_s``; cancel the rest."""
    pool: WorkerPool = app.state.pool
    grace = app.state.settings.drain_grace_s
    pool.draining = True
    pending = [st for st in pool.requests.values() if not st.finished]
    logger.info("draining: %d request(s) in flight, grace %.0fs", len(pending), grace)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(not st.finished for st in pool.requests.values()):
        await asyncio.sleep(0.05)
    left = [st for st in pool.requests.values() if not st.finished]
    if left:
        logger.warning("drain grace over: cancelling %d request(s)", len(left))
        pool.cancel_all(ErrorCode.SHUTTING_DOWN.value, "the server is shutting down")
    await asyncio.sleep(0.2)  # let the last responses and error events go out
