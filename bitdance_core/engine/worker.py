"""The model-worker process: owns the device, runs the engine's busy loop, talks protocol.

``worker_main(config, inbox, outbox)`` is the process entry point (spawned by the API process):

1) load the checkpoint, build the engine, warm up; then send ``WorkerReady`` (readiness);
2) loop: drain the inbox (blocking only when idle) → ``engine.step()`` → hand events to the
   output thread, which encodes images (PNG/JPEG/WebP, packed token bits) and puts protocol
   messages on the outbox in order, so encoding never stalls the device loop;
3) ``Shutdown(drain=True)``: refuse new work, finish what runs, exit 0.

A failure to load is a ``WorkerFatal`` and exit code 1; the parent restarts the worker. The
worker exits by itself if its parent dies.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .protocol import (
    Cancel,
    ErrorCode,
    EventKind,
    RequestEvent,
    Shutdown,
    StepStats,
    Submit,
    WorkerConfig,
    WorkerFatal,
    WorkerReady,
)

logger = logging.getLogger(__name__)
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def encode_image(array: np.ndarray, fmt: str, params: dict | None = None) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    img = Image.fromarray(array)
    buf = io.BytesIO()
    kw: dict = {}
    if fmt == "png" and params:
        info = PngInfo()
        info.add_text("parameters", _a1111_parameters(params))
        info.add_text("bitdance", json.dumps(params, sort_keys=True))
        kw["pnginfo"] = info
    elif fmt in ("jpeg", "jpg", "webp"):
        kw["quality"] = 90
    img.save(buf, format=_PIL_FORMAT[fmt], **kw)
    return buf.getvalue()


def _a1111_parameters(p: dict) -> str:
    text = p["prompt"]
    if p.get("negative_prompt"):
        text += f"\nNegative prompt: {p['negative_prompt']}"
    return (f"{text}\nSteps: {p['steps']}, CFG scale: {p['guidance_scale']}, Seed: {p['seed']}, "
            f"Size: {p['width']}x{p['height']}, Model: {p['model']}")


def pack_tokens(tokens) -> bytes:
    """(N, C) ±1 tokens → packed bits (1 = +1), row-major, big-endian bit order."""
    return np.packbits(np.asarray(tokens) > 0).tobytes()


class _Output:
    """One output thread: encodes and sends in submission order (per-request order is kept)."""

    def __init__(self, outbox, model_name: str):
        self.outbox, self.model_name = outbox, model_name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitdance-output")
        self.requests: dict[str, object] = {}

    def send(self, msg) -> None:
        self.pool.submit(self.outbox.put, msg)

    def event(self, ev) -> None:
        self.pool.submit(self._event, ev)

    def _event(self, ev) -> None:
        try:
            req = self.requests.get(ev.request_id)
            data = dict(ev.data)
            if ev.kind is EventKind.PREVIEW:
                data = {"step": data["step"], "total_steps": data["total_steps"], "format": "jpeg",
                        "image": encode_image(data["images"][0], "jpeg"), "since_arrival_s": data["since_arrival_s"],
                        "height": int(data["images"].shape[1]), "width": int(data["images"].shape[2])}
            elif ev.kind is EventKind.COMPLETED:
                data = self._completed(req, data)
            if ev.kind in (EventKind.COMPLETED, EventKind.FAILED):
                self.requests.pop(ev.request_id, None)
            self.outbox.put(RequestEvent(ev.request_id, ev.kind, data))
        except Exception as e:  # noqa: BLE001 - an encoding failure must still end the request
            logger.exception("output failed for %s", ev.request_id)
            self.requests.pop(ev.request_id, None)
            self.outbox.put(RequestEvent(ev.request_id, EventKind.FAILED,
                                         {"code": ErrorCode.INTERNAL.value, "message": f"encoding failed: {e}"}))

    def _completed(self, req, data: dict) -> dict:
        fmt = req.output_format if req is not None else "png"
        params = None
        if req is not None:
            params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
                      "steps": req.steps, "guidance_scale": req.guidance_scale, "width": req.width,
                      "height": req.height, "model": self.model_name, **req.metadata}
        tokens = data["tokens"].numpy()
        want_tokens = req is not None and req.return_tokens
        images = [{"data": encode_image(img, fmt, params), "format": fmt,
                   "tokens": pack_tokens(tokens[i]) if want_tokens else None}
                  for i, img in enumerate(data["images"])]
        return {"seed": data["seed"], "width": data["width"], "height": data["height"], "images": images,
                "token_shape": list(tokens.shape[1:]), "timings": data["timings"]}


def _watch_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="bitdance-parent-watch", daemon=True).start()


def build_engine(config: WorkerConfig):
    """Load the model and build a warmed-up engine (also used by benchmarks in-process)."""
    import torch

    from .. import attention
    from ..serving_config import ServingConfig
    from ..weights import load_model
    from .engine import Engine, EngineConfig

    if config.threads:
        torch.set_num_threads(config.threads)
    attention.set_backend(config.attention_backend)
    model = load_model(config.model_dir, config.device, config.dtype, quantize=config.quantize)
    sizes = [list(s) for s in config.sizes] if config.sizes else None
    serving = ServingConfig.for_model(model.config, {"sizes": sizes})
    engine = Engine(model, EngineConfig(max_batch_requests=config.max_batch_requests, max_waiting=config.max_waiting,
                                        kv_budget_bytes=config.kv_budget_bytes, preview_every=config.preview_every),
                    serving)
    if config.warmup:
        engine.warmup()
    return engine


def worker_main(config: WorkerConfig, inbox, outbox) -> None:
    logging.basicConfig(level=os.environ.get("BITDANCE_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s worker{config.worker_index} %(levelname)s %(name)s: %(message)s")
    _watch_parent()
    try:
        engine = build_engine(config)
    except Exception as e:  # noqa: BLE001 - report any load failure to the parent, then exit non-zero
        logger.exception("worker %d failed to start", config.worker_index)
        outbox.put(WorkerFatal(config.worker_index, f"failed to load {config.model_dir}: {e}"))
        sys.exit(1)
    out = _Output(outbox, engine.model.config.name)
    out.send(WorkerReady(config.worker_index, {**engine.info(), "quantize": engine.model.quantize}))
    run_loop(engine, inbox, out)
    out.pool.shutdown(wait=True)
    sys.exit(0)


def run_loop(engine, inbox, out: _Output) -> None:
    from ..serving_config import InvalidRequest

    draining = False
    while True:
        # 1) drain the inbox; block only when there is nothing to step
        msgs = []
        try:
            msgs.append(inbox.get(timeout=0.2) if not engine.has_work() else inbox.get_nowait())
            while True:
                msgs.append(inbox.get_nowait())
        except queue.Empty:
            pass
        for msg in msgs:
            if isinstance(msg, Submit):
                rid = msg.request.request_id
                if draining:
                    out.event(_failed(rid, ErrorCode.SHUTTING_DOWN, "the worker is shutting down"))
                    continue
                out.requests[rid] = msg.request
                try:
                    out.event(engine.add_request(msg.request))
                except InvalidRequest as e:
                    ev = _failed(rid, e.code, str(e))
                    ev.data["field"] = e.field
                    out.event(ev)
            elif isinstance(msg, Cancel):
                ev = engine.cancel(msg.request_id)
                if ev is not None:
                    out.event(ev)
            elif isinstance(msg, Shutdown) or msg is None:
                draining = True
                if msg is None or not msg.drain:
                    for rid in list(engine.requests):
                        out.event(engine.cancel(rid))
        # 2) one engine step
        if engine.has_work():
            t0 = time.perf_counter()
            for ev in engine.step():
                out.event(ev)
            out.send(StepStats(requests=engine.last_batch, rows=engine.scheduler.used_rows,
                               waiting=engine.num_waiting, running=engine.num_running,
                               step_s=time.perf_counter() - t0, phase_s=dict(engine.last_phases),
                               kv_usage=engine.scheduler.kv_usage()))
        elif draining:
            return


def _failed(request_id: str, code, message: str):
    from .request import EngineEvent

    return EngineEvent(request_id, EventKind.FAILED, {"code": getattr(code, "value", code), "message": message})
