"""A torch-free stand-in for ``bitdance_core.worker.worker:worker_main`` (same signature).

It speaks the real protocol (``bitdance_core.engine.protocol``) with a toy engine: step-level
continuous batching of up to ``max_batch_requests`` requests, a bounded waiting queue (both read from
``config.engine``, the same ``EngineConfig`` the real worker gets), ``T =
(h/16)*(w/16)/4`` AR steps per image, previews every ``preview_every`` steps. Images are encoded
with PIL: previews are noise PNGs (large on purpose, to exercise flow control), final images are
solid colours and the final PNG carries a ``parameters`` text chunk. Used by the server tests
for faults that are hard to trigger on a real model.

Knobs (environment, inherited by the spawned process):
- ``FAKE_WORKER_STEP_S``: seconds per engine step (default 0.01; raise it for slow requests).
- ``FAKE_WORKER_LOAD_S``: seconds of "loading" before ``WorkerReady`` (default 0.05).
- ``FAKE_WORKER_MAX_TOKENS``: the prompt's word limit (default 32).
It sends ``Heartbeat`` from its loop like the real worker (with its own cancel / freed-row counts).
Special prompts: ``__crash__`` kills the process (exit 1) when the request starts running,
``__fatal__`` sends ``WorkerFatal`` and exits 1, ``__hang__`` never finishes. A prompt of more
than ``max_prompt_tokens`` words (or such a negative prompt) fails as the first event (``invalid_request``, the
real worker's message, field prompt / negative_prompt).
"""

from __future__ import annotations

import io
import os
import queue
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, PngImagePlugin

from bitdance_core.engine.protocol import (
    Cancel,
    ErrorCode,
    EventKind,
    GenerationRequest,
    Heartbeat,
    RequestEvent,
    Shutdown,
    StepStats,
    Submit,
    WorkerConfig,
    WorkerFatal,
    WorkerReady,
)
from bitdance_core.png_metadata import image_parameters, png_text

DOWNSAMPLE, PARALLEL_NUM, BITS = 16, 4, 16
SIZES = [[64, 64], [64, 128], [128, 64], [128, 128], [256, 256]]
LIMITS = {
    "steps": [1, 64],
    "guidance_scale": [1.0, 20.0],
    "num_images": [1, 4],
    "max_prompt_tokens": int(os.environ.get("FAKE_WORKER_MAX_TOKENS", "32")),
    "max_prompt_chars": 1000,
}


@dataclass
class Job:
    req: GenerationRequest
    submitted: float
    total: int
    started: float = 0.0
    step: int = 0
    events: list[Any] = field(default_factory=list)


def _encode(img: Image.Image, fmt: str, text: dict[str, str] | None = None, quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for k, v in (text or {}).items():
            info.add_text(k, v)
        img.save(buf, format="PNG", pnginfo=info)
    else:
        img.save(buf, format={"jpeg": "JPEG", "webp": "WEBP"}[fmt], quality=85 if quality is None else quality)
    return buf.getvalue()


def _colour(seed: int, k: int) -> tuple[int, int, int]:
    rng = random.Random(seed * 7919 + k)
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def worker_main(config: WorkerConfig, inbox: Any, outbox: Any) -> None:
    step_s = float(os.environ.get("FAKE_WORKER_STEP_S", "0.01"))
    time.sleep(float(os.environ.get("FAKE_WORKER_LOAD_S", "0.05")))
    sizes = [[h, w] for h, w in config.sizes] if config.sizes else SIZES
    preview_default = config.engine.preview_every if config.engine.preview_every is not None else 1
    info = {
        "model": "fake-tiny",
        "model_dir": config.model_dir,
        "parallel_num": PARALLEL_NUM,
        "downsample": DOWNSAMPLE,
        "sizes": sizes,
        "default_size": sizes[0],
        "defaults": {"steps": 4, "guidance_scale": 4.0, "num_images": 1},
        "limits": LIMITS,
        "device": config.device,
        "dtype": "float32",
        "attention_backend": "none",
        "preview_every": preview_default,
        "max_batch_requests": config.engine.max_batch_requests,
        "max_waiting": config.engine.max_waiting,
    }
    outbox.put(WorkerReady(config.worker_index, info))

    waiting: deque[Job] = deque()
    running: list[Job] = []
    stopping: Shutdown | None = None
    counts = {"cancelled": 0, "freed_rows": 0}
    last_beat = 0.0

    def rows(job: Job) -> int:
        return job.req.num_images * (2 if job.req.guidance_scale > 1 else 1)

    def emit(rid: str, kind: EventKind, data: dict[str, Any]) -> None:
        outbox.put(RequestEvent(rid, kind, data))

    def _too_many_tokens(req: Any) -> tuple[str, str] | None:
        limit = LIMITS["max_prompt_tokens"]
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if text is not None and (n := len(text.split())) > limit:
                return name, f"{name} is {n} tokens long; at most {limit} tokens are allowed"
        return None

    def fail(rid: str, code: ErrorCode, message: str, **extra: Any) -> None:
        emit(rid, EventKind.FAILED, {"code": code.value, "message": message, **extra})

    def handle(msg: Any) -> None:
        nonlocal stopping
        if isinstance(msg, Submit):
            req = msg.request
            if stopping is not None:
                fail(req.request_id, ErrorCode.SHUTTING_DOWN, "worker is shutting down")
            elif too_long := _too_many_tokens(req):  # the real worker's check and message (words as tokens)
                fail(req.request_id, ErrorCode.INVALID, too_long[1], field=too_long[0])
            elif len(waiting) >= config.engine.max_waiting:
                fail(req.request_id, ErrorCode.QUEUE_FULL, "waiting queue is full")
            else:
                total = (req.height // DOWNSAMPLE) * (req.width // DOWNSAMPLE) // PARALLEL_NUM
                waiting.append(Job(req, time.monotonic(), total))
                emit(req.request_id, EventKind.QUEUED, {"position": len(waiting) - 1})
        elif isinstance(msg, Cancel):
            for jobs in (waiting, running):
                for job in list(jobs):
                    if job.req.request_id == msg.request_id:
                        jobs.remove(job)
                        counts["cancelled"] += 1
                        counts["freed_rows"] += rows(job) if jobs is running else 0
                        fail(msg.request_id, ErrorCode.CANCELLED, "cancelled")
        elif isinstance(msg, Shutdown):
            stopping = msg
            if not msg.drain:
                for job in [*waiting, *running]:
                    fail(job.req.request_id, ErrorCode.SHUTTING_DOWN, "worker is shutting down")
                waiting.clear()
                running.clear()

    while True:
        # 1) messages: block briefly when idle, never while requests run
        try:
            handle(inbox.get(timeout=0.05) if not (waiting or running) else inbox.get_nowait())
            while True:
                handle(inbox.get_nowait())
        except queue.Empty:
            pass
        if stopping is not None and not (waiting or running):
            break
        now = time.monotonic()
        if now - last_beat >= (0.5 if (waiting or running) else 2.0):
            last_beat = now
            used = sum(rows(j) for j in running)
            outbox.put(Heartbeat(config.worker_index, bool(waiting or running), len(waiting) + len(running), used,
                                 counts["cancelled"], counts["freed_rows"]))  # fmt: skip
        # 2) admit
        while waiting and len(running) < config.engine.max_batch_requests:
            job = waiting.popleft()
            job.started = time.monotonic()
            if job.req.prompt == "__crash__":
                os._exit(1)
            if job.req.prompt == "__fatal__":
                outbox.put(WorkerFatal(config.worker_index, "simulated fatal error"))
                outbox.close()
                outbox.join_thread()
                os._exit(1)
            running.append(job)
            emit(job.req.request_id, EventKind.STARTED, {"queue_s": job.started - job.submitted})
        for pos, job in enumerate(waiting):
            emit(job.req.request_id, EventKind.QUEUED, {"position": pos})
        if not running:
            continue
        # 3) one engine step for every running request
        t0, batch = time.monotonic(), len(running)
        time.sleep(step_s)
        for job in list(running):
            if job.req.prompt == "__hang__":
                continue
            job.step += 1
            rid, req = job.req.request_id, job.req
            emit(rid, EventKind.PROGRESS, {"step": job.step, "total_steps": job.total})
            every = preview_default if req.preview_every is None else req.preview_every
            if every and job.step % every == 0 and job.step < job.total:
                # noise, so previews are big enough (incompressible) to exercise flow control
                img = Image.frombytes("RGB", (req.width, req.height), os.urandom(req.width * req.height * 3))
                emit(
                    rid,
                    EventKind.PREVIEW,
                    {
                        "step": job.step,
                        "total_steps": job.total,
                        "format": "png",
                        "image": _encode(img, "png"),
                        "width": req.width,
                        "height": req.height,
                    },
                )
            if job.step >= job.total:
                running.remove(job)
                outbox.put(RequestEvent(rid, EventKind.COMPLETED, _completed(job, info["model"])))
        outbox.put(
            StepStats(
                requests=batch,
                rows=2 * batch,
                waiting=len(waiting),
                running=len(running),
                step_s=time.monotonic() - t0,
                phase_s={"head": step_s},
                kv_usage=min(1.0, len(running) / 16),
            )
        )
    outbox.close()
    outbox.join_thread()


def _completed(job: Job, model: str) -> dict[str, Any]:
    req = job.req
    n_tokens = (req.height // DOWNSAMPLE) * (req.width // DOWNSAMPLE)
    params = image_parameters(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        seed=req.seed,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        width=req.width,
        height=req.height,
        model=model,
        num_images=req.num_images,
        **req.metadata,
    )
    images = []
    for k in range(req.num_images):
        img = Image.new("RGB", (req.width, req.height), _colour(req.seed, 1000 + k))
        tokens = random.Random(req.seed + k).randbytes(n_tokens * BITS // 8) if req.return_tokens else None
        images.append(
            {
                "data": _encode(img, req.output_format, png_text({**params, "index": k}), req.output_compression),
                "format": req.output_format,
                "tokens": tokens,
            }
        )
    now = time.monotonic()
    return {
        "seed": req.seed,
        "width": req.width,
        "height": req.height,
        "images": images,
        "token_shape": [n_tokens, BITS],
        "prompt_tokens": len(req.prompt.split()),
        "timings": {"queue_s": job.started - job.submitted, "generation_s": now - job.started},
    }
