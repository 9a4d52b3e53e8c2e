"""Messages between the HTTP process and a model-worker process.

This module is the whole contract between ``server/`` (which never imports torch) and the
worker (which owns the device). It imports nothing but the standard library. Messages are
small frozen dataclasses sent over ``multiprocessing`` queues; images travel as already
encoded bytes (PNG/JPEG/WebP), binary tokens as packed bits, never as pickled tensors.

Flow::

    API  --Submit(GenerationRequest)-->  worker      (one per request)
    API  --Cancel(request_id)-------->   worker      (client gone, timeout, shutdown)
    API  --Shutdown(drain)----------->   worker
    API  <--WorkerReady(info)---------   worker      (after load + warm-up; readiness)
    API  <--RequestEvent(id, kind, data) worker      (queued, started, progress, preview, completed, failed)
    API  <--StepStats(...)------------   worker      (one per engine step, for metrics)
    API  <--WorkerFatal(message)------   worker      (then the worker exits non-zero)

Every accepted request ends with exactly one ``completed`` or ``failed`` event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1


class EventKind(str, enum.Enum):
    QUEUED = "queued"  # data: {"position": int}  (0 = next to start)
    STARTED = "started"  # data: {"queue_s": float}
    PROGRESS = "progress"  # data: {"step": int, "total_steps": int}   step is 1-based AR step done
    PREVIEW = "preview"  # data: {"step", "total_steps", "image": bytes, "format": "jpeg"|"png", "width", "height"}
    COMPLETED = "completed"  # data: see CompletedData below
    FAILED = "failed"  # data: {"code": str, "message": str}


class ErrorCode(str, enum.Enum):
    INVALID = "invalid_request"  # parameters the model cannot honour (HTTP 422)
    TOO_LARGE = "too_large"  # can never fit the KV-cache / row budget (HTTP 422)
    QUEUE_FULL = "queue_full"  # waiting queue is full (HTTP 429)
    CANCELLED = "cancelled"  # cancelled by the client / server
    TIMEOUT = "timeout"  # per-request deadline passed (HTTP 504)
    WORKER_DIED = "worker_died"  # the worker process died mid-request (HTTP 503)
    SHUTTING_DOWN = "shutting_down"  # draining, no new work (HTTP 503)
    INTERNAL = "internal_error"  # anything else (HTTP 500)


@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image request as the engine sees it (already validated by the API)."""

    request_id: str
    prompt: str
    height: int
    width: int
    seed: int
    steps: int = 50  # diffusion sampling steps per AR step
    guidance_scale: float = 7.5  # <= 1 disables classifier-free guidance
    num_images: int = 1
    negative_prompt: str | None = None  # replaces the unconditional prompt when given
    preview_every: int | None = None  # AR steps between previews; None = engine default; 0 = none
    output_format: str = "png"  # png | jpeg | webp (final images, encoded by the worker)
    return_tokens: bool = False
    metadata: dict[str, str] = field(default_factory=dict)  # extra PNG text chunk entries


@dataclass(frozen=True)
class Submit:
    request: GenerationRequest


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    drain: bool = True  # finish in-flight work first


@dataclass(frozen=True)
class WorkerReady:
    worker_index: int
    info: dict[str, Any]  # model name, parallel_num, sizes, limits, device, dtype, attention backend, ...


@dataclass(frozen=True)
class RequestEvent:
    request_id: str
    kind: EventKind
    data: dict[str, Any]


@dataclass(frozen=True)
class StepStats:
    requests: int  # requests in this engine step (the batch size)
    rows: int  # LLM rows (cond + uncond) in this step
    waiting: int
    running: int
    step_s: float
    phase_s: dict[str, float] = field(default_factory=dict)  # prefill / prior / head / projector / preview
    kv_usage: float = 0.0  # 0..1


@dataclass(frozen=True)
class WorkerFatal:
    worker_index: int
    message: str


# ``completed`` event data, documented here because both sides rely on it:
#   {"seed": int, "width": int, "height": int,
#    "images": [{"data": bytes, "format": "png"|"jpeg"|"webp",
#                "tokens": bytes | None}],          # packed bits (np.packbits of (N, C) 0/1, big-endian bit order)
#    "token_shape": [N, C],
#    "timings": {"queue_s": float, "generation_s": float}}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs to start; built by the API process from its settings."""

    model_dir: str
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str | None = None  # None = policy (float32 on CPU, bfloat16 on CUDA)
    attention_backend: str = "auto"  # auto | sdpa | xformers
    max_batch_requests: int = 16  # most requests in one engine step
    max_waiting: int = 64  # bounded waiting queue (beyond it: queue_full)
    kv_budget_bytes: int | None = None  # None: derived (free memory on CUDA, a fixed default on CPU)
    preview_every: int | None = None  # engine default cadence; None = about 8 previews per image
    preview_format: str = "jpeg"
    sizes: tuple[tuple[int, int], ...] | None = None  # (height, width) allowed; None = checkpoint policy
    warmup: bool = True
    worker_index: int = 0
    threads: int | None = None  # torch intra-op threads on CPU
    quantize: str = "none"  # weight-only quantisation of the prior at load: none | int8 | fp8 (bitdance_core.quantize)
