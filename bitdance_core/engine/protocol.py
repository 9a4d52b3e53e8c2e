"""Messages between the HTTP process and a model-worker process.

This module is the whole contract between ``server/`` (which never imports torch) and the
worker (which owns the device). It imports nothing but the standard library (and the
torch-free ``engine_config``, the owner of the engine's defaults). Messages are
small frozen dataclasses sent over ``multiprocessing`` queues; images travel as already
encoded bytes (PNG/JPEG/WebP), binary tokens as packed bits, never as pickled tensors.

Flow::

    API  --Submit(GenerationRequest)-->  worker      (one per request)
    API  --Cancel(request_id)-------->   worker      (client gone, timeout, shutdown)
    API  --Shutdown(drain)----------->   worker
    API  --Tokenize / Detokenize----->   worker      (tokenizer routes; run between engine steps)
    API  <--WorkerReady(info)---------   worker      (after load + warm-up; readiness)
    API  <--RequestEvent(id, kind, data) worker      (queued, started, progress, preview, completed, failed)
    API  <--StepStats(...)------------   worker      (one per engine step, for metrics)
    API  <--Heartbeat(...)------------   worker      (from the loop: every ~0.5 s with work, ~2 s idle)
    API  <--WorkerFatal(message)------   worker      (then the worker exits non-zero)
    API  <--TokenizerResult(id, ...)--   worker      (one per Tokenize / Detokenize)

Every accepted request ends with exactly one ``completed`` or ``failed`` event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .engine_config import EngineConfig

PROTOCOL_VERSION = 4  # 2: Heartbeat, out_of_memory, WorkerReady/WorkerConfig carry the version; 3: Tokenize;
# 4: WorkerConfig carries an EngineConfig (every engine knob) instead of six forwarded fields


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
    OUT_OF_MEMORY = "out_of_memory"  # the step ran out of device memory; the worker goes on (HTTP 503)
    INTERNAL = "internal_error"  # anything else (HTTP 500)


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it (already validated by the API): text-to-image, or class-conditional
    (``class_label`` set, ``prompt`` the class name or empty)."""

    request_id: str
    prompt: str
    height: int
    width: int
    seed: int
    steps: int | None = None  # diffusion sampling steps per AR step; None: the served model's default
    guidance_scale: float | None = None  # <= 1 disables classifier-free guidance; None: the served default
    num_images: int = 1
    negative_prompt: str | None = None  # replaces the unconditional prompt when given
    class_label: tuple[int, ...] | None = None  # class-conditional models: one label per image (prompt = names)
    cfg_schedule: str = "linear"  # class-conditional models: linear (ramp from 1) | constant guidance
    preview_every: int | None = None  # AR steps between previews; None = engine default; 0 = none
    output_format: str = "png"  # png | jpeg | webp (final images, encoded by the worker)
    return_tokens: bool = False
    output_compression: int | None = None  # jpeg/webp encoder quality 0..100 (None = encoder default)
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
class Tokenize:
    """Image -> binary tokens (``bitdance_core.tokenize`` conventions). The API has probed ``image`` (format,
    size bound) and applied the size policy: ``height`` x ``width`` is the size to encode."""

    request_id: str
    image: bytes  # PNG / JPEG / WebP as uploaded
    height: int
    width: int
    resize: str = "refuse"  # refuse | fit | crop (how the image reaches height x width)
    patch_size: int | None = None  # token order; None = the served model's


@dataclass(frozen=True)
class Detokenize:
    """Packed binary tokens -> image (PNG); the API has checked ``token_shape`` and the packing."""

    request_id: str
    tokens: bytes
    token_shape: tuple[int, int]
    height: int
    width: int
    patch_size: int | None = None


@dataclass(frozen=True)
class TokenizerResult:
    """The answer to one ``Tokenize`` ({"tokens": bytes, "token_shape", "height", "width", "patch_size"}) or
    ``Detokenize`` ({"image": bytes, "format": "png", "height", "width"}); ``error`` {code, message, field?,
    allowed?} instead when it failed."""

    request_id: str
    data: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class WorkerReady:
    worker_index: int
    info: dict[str, Any]  # model name, parallel_num, sizes, limits, device, dtype, attention backend, ...
    protocol_version: int = PROTOCOL_VERSION


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
class Heartbeat:
    """Sent by the worker's own loop (never a side thread), so silence means the loop is stuck."""

    worker_index: int
    busy: bool  # the engine has requests
    requests: int  # requests the engine holds (waiting + running)
    used_rows: int  # KV rows in use now
    cancelled: int  # requests dropped by ``Cancel`` since the worker started
    freed_rows: int  # KV rows those cancels released (the engine's own count)


@dataclass(frozen=True)
class WorkerFatal:
    worker_index: int
    message: str
    permanent: bool = False  # a load error no restart can fix (a CheckpointError): the pool does not restart it


# ``completed`` event data, documented here because both sides rely on it:
#   {"seed": int, "width": int, "height": int,
#    "images": [{"data": bytes, "format": "png"|"jpeg"|"webp",
#                "tokens": bytes | None}],          # packed bits (np.packbits of (N, C) 0/1, big-endian bit order)
#    "token_shape": [N, C],
#    "prompt_tokens": int,                            # tokens of the (user) prompt, for OpenAI usage
#    "timings": {"queue_s": float, "generation_s": float}}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs to start; built by the API process from its settings."""

    model_dir: str
    vae: str | None = None  # class-conditional .pt models: the autoencoder file (None: found beside the model)
    model_args: str | None = None  # class-conditional .pt models: architecture JSON when it cannot be inferred
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str | None = None  # None = policy (float32 on CPU, bfloat16 on CUDA)
    attention_backend: str = "auto"  # auto | sdpa | xformers
    engine: EngineConfig = field(default_factory=EngineConfig)  # the engine's knobs, as declared there
    sizes: tuple[tuple[int, int], ...] | None = None  # (height, width) allowed; None = checkpoint policy
    warmup: bool = True
    worker_index: int = 0
    threads: int | None = None  # torch intra-op threads on CPU
    quantize: str = "none"  # weight-only quantisation of the prior at load: none | int8 | fp8 (loading/quantize.py)
    interop_threads: int | None = None  # torch inter-op threads (CPU); None = torch default
    tokenizer: bool = False  # load the autoencoder's encoder and answer Tokenize / Detokenize
    ae_config: str | None = None  # a lone autoencoder file (tokenizer-only): its JSON config
    protocol_version: int = PROTOCOL_VERSION  # the API process's; the worker refuses to start on a mismatch

