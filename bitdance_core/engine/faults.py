"""The fault ladder: what an exception in an engine step takes down.

Three rungs, from the widest to the narrowest (vLLM's engine-dead vs request errors):

1. **Device error** (a CUDA error, a device-side assert, cuBLAS / cuDNN failures, an illegal memory
   access, any ``torch.AcceleratorError``): the CUDA context is broken and every later kernel would
   fail too. Fatal: the engine raises :class:`EngineDead`; the worker sends ``WorkerFatal`` and exits
   non-zero, its requests end with ``worker_died`` (503) and the pool restarts the process.
2. **Out of memory** in a step: only that step's requests fail, with ``out_of_memory`` (503) naming the
   batch and the sizes. The engine halves its admission limit (``max_batch_requests``, never below 1)
   and keeps serving; the limit stays lowered (logged) until the worker restarts.
3. **A bug in one request's data**: the batched prefill is retried request by request, so a request
   that fails alone fails alone; the others are prefilled and go on. A failure in the shared AR step
   that is neither of the above fails that step's requests (``internal_error``).
"""

from __future__ import annotations

import enum
import logging
import re

import torch

from .protocol import ErrorCode, EventKind
from .request import EngineEvent

logger = logging.getLogger(__name__)

_DEVICE_PATTERNS = re.compile(
    r"CUDA error|device-side assert|cudaError|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|illegal memory access|"
    r"unspecified launch failure|an illegal instruction|misaligned address|NCCL error|HIP error|"
    r"CUDA driver error|uncorrectable ECC|device not ready|XPU error",
    re.IGNORECASE,
)
_OOM_PATTERNS = re.compile(r"out of memory|can't allocate memory|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)


class Fault(str, enum.Enum):
    DEVICE = "device"  # fatal: the worker exits
    OUT_OF_MEMORY = "out_of_memory"  # the step's requests fail, the admission limit drops
    REQUEST = "request"  # a bug in the data of the requests involved


class EngineDead(RuntimeError):
    """The device is unusable; the process that owns it must exit."""


def classify(exc: BaseException) -> Fault:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, torch.OutOfMemoryError) or _OOM_PATTERNS.search(text):
        return Fault.OUT_OF_MEMORY
    accel = getattr(torch, "AcceleratorError", None)
    if (accel is not None and isinstance(exc, accel)) or (isinstance(exc, RuntimeError) and
                                                           _DEVICE_PATTERNS.search(text)):
        return Fault.DEVICE
    return Fault.REQUEST


def _fail(engine, states, code: str, message: str) -> list[EngineEvent]:
    events = []
    for st in states:
        if engine.requests.pop(st.id, None) is None:
            continue
        engine.scheduler.cancel(st.id)
        events.append(EngineEvent(st.id, EventKind.FAILED, {"code": code, "message": message}))
    return events


def _sizes(states) -> str:
    sizes = sorted({f"{st.req.width}x{st.req.height}" for st in states})
    return ", ".join(sizes)


def on_step_error(engine, exc: Exception, states) -> list[EngineEvent]:
    """Classify a failed step over ``states`` (the step's requests): raise :class:`EngineDead`, or fail them
    (lowering the admission limit after an out-of-memory) and return their ``failed`` events."""
    kind = classify(exc)
    if kind is Fault.DEVICE:
        logger.critical("device error in an engine step of %d requests; the engine is dead: %s", len(states), exc)
        raise EngineDead(f"device error: {exc}") from exc
    if kind is Fault.OUT_OF_MEMORY:
        rows = sum(st.rows for st in states)
        old = engine.scheduler.max_batch_requests
        new = max(1, min(old, len(states)) // 2)
        engine.scheduler.set_max_batch_requests(new)
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        msg = (f"out of memory in a step of {len(states)} requests ({rows} KV rows) at {_sizes(states)}; "
               f"the engine now admits at most {new} requests at once (was {old})")
        logger.error("%s: %s", msg, exc)
        return _fail(engine, states, ErrorCode.OUT_OF_MEMORY.value, msg)
    logger.exception("engine step failed; failing %d requests", len(states), exc_info=exc)
    return _fail(engine, states, ErrorCode.INTERNAL.value, f"generation failed: {exc}")


def prefill_isolating(engine, prefill, admitted) -> list[EngineEvent]:
    """``prefill(admitted)``; if that fails for a reason other than the device or memory, prefill each
    request alone, so only the ones that fail alone fail. Returns their ``failed`` events."""
    try:
        prefill(admitted)
        return []
    except Exception as e:  # noqa: BLE001 - classified below
        if classify(e) is not Fault.REQUEST or len(admitted) == 1:
            return on_step_error(engine, e, admitted)
        logger.warning("batched prefill of %d requests failed (%s); prefilling them one by one", len(admitted), e)
    events: list[EngineEvent] = []
    for st in admitted:
        try:
            prefill([st])
        except Exception as e:  # noqa: BLE001 - classified in on_step_error
            events.extend(on_step_error(engine, e, [st]))
    return events
