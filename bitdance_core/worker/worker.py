"""The model-worker process: owns the device, runs the engine's busy loop, talks protocol.

``worker_main(config, inbox, outbox)`` is the process entry point (spawned by the API process):

1) load the checkpoint, build the engine, warm up; then send ``WorkerReady`` (readiness);
2) loop: drain the inbox (blocking only when idle) → ``engine.step()`` → hand events to the
   output thread, which encodes images (PNG/JPEG/WebP, packed token bits) and puts protocol
   messages on the outbox in order, so encoding never stalls the device loop;
3) ``Shutdown(drain=True)``: refuse new work, finish what runs, exit 0.

A failure to load, a protocol version other than the API process's, or a device error in a step
(``faults.EngineDead``) is a ``WorkerFatal`` and exit code 1; the parent fails the worker's requests
with ``worker_died`` and restarts it. An out-of-memory fails only its step's requests
(``faults.py``). The worker exits by itself if its parent dies.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..engine.faults import EngineDead
from ..engine.loop import EngineLoop
from ..engine.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    EventKind,
    Heartbeat,
    RequestEvent,
    StepStats,
    WorkerConfig,
    WorkerFatal,
    WorkerReady,
)
from ..png_metadata import image_parameters

logger = logging.getLogger(__name__)
HEARTBEAT_BUSY_S, HEARTBEAT_IDLE_S = 0.5, 2.0
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def encode_image(array: np.ndarray, fmt: str, params: dict | None = None, quality: int | None = None) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from ..png_metadata import png_text

    img = Image.fromarray(array)
    buf = io.BytesIO()
    kw: dict = {}
    if fmt == "png" and params:
        info = PngInfo()
        for key, value in png_text(params).items():
            info.add_text(key, value)
        kw["pnginfo"] = info
    elif fmt in ("jpeg", "jpg", "webp"):
        kw["quality"] = 90 if quality is None else int(quality)
    img.save(buf, format=_PIL_FORMAT[fmt], **kw)
    return buf.getvalue()


def _image_params(params: dict, req, i: int) -> dict:
    """One image's metadata: the request's, its index and (class-conditional) its own label."""
    if req.class_label is None:
        return {**params, "index": i}
    return {**params, "index": i, "class_label": req.class_label[i]}


def pack_tokens(tokens) -> bytes:
    """(N, C) ±1 tokens → packed bits (1 = +1), row-major, big-endian bit order."""
    return np.packbits(np.asarray(tokens) > 0).tobytes()


class _Output:
    """One output thread: encodes and sends in submission order (per-request order is kept)."""

    def __init__(self, outbox, model_name: str, worker_index: int = 0):
        self.outbox, self.model_name, self.worker_index = outbox, model_name, worker_index
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitdance-output")
        self.requests: dict[str, object] = {}
        self.prompt_tokens: dict[str, int] = {}

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
                self.prompt_tokens.pop(ev.request_id, None)
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
            params = image_parameters(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed,
                                      steps=req.steps, guidance_scale=req.guidance_scale, width=req.width,
                                      height=req.height, model=self.model_name, num_images=req.num_images,
                                      **req.metadata)
            if req.class_label is not None:
                params.update(cfg_schedule=req.cfg_schedule)
        tokens = data["tokens"].numpy()
        want_tokens = req is not None and req.return_tokens
        quality = getattr(req, "output_compression", None)
        images = [{"data": encode_image(img, fmt, params and _image_params(params, req, i), quality), "format": fmt,
                   "tokens": pack_tokens(tokens[i]) if want_tokens else None}
                  for i, img in enumerate(data["images"])]
        return {"seed": data["seed"], "width": data["width"], "height": data["height"], "images": images,
                "token_shape": list(tokens.shape[1:]), "timings": data["timings"],
                "prompt_tokens": self.prompt_tokens.get(req.request_id, 0) if req is not None else 0}


def _watch_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="bitdance-parent-watch", daemon=True).start()


def engine_for(model, engine_config, serving=None):
    """An engine for a loaded model of any family. On CUDA without a configured ``kv_budget_bytes`` the memory plan
    (``bitdance_core.planning``) sizes its KV cache; the engine keeps the plan (``engine.memory_plan``)."""
    from ..engine.engine import Engine
    from ..planning.memory_plan import plan_on_device

    serving = serving or model.family_type.default_serving(model)
    plan = None
    if engine_config.kv_budget_bytes is None and model.placement.device.type == "cuda":
        plan = plan_on_device(model, serving, engine_config)
    return Engine(model, engine_config, serving, memory_plan=plan)


def build_engine(config: WorkerConfig):
    """Load the model (its family's loader, by the checkpoint's layout) and build a warmed-up engine; on CUDA the KV
    budget comes from the memory plan unless configured (also used by benchmarks in-process)."""
    # imported here, not at the top: torch must not load before the CPU thread policy is applied
    from ..cpu_threads import apply_thread_policy
    from ..device import bind
    from ..families import registry
    from ..image_tokenizer import attach_encoder
    from ..models import attention
    from ..planning.memory_plan import measure_warm_step

    if config.threads:  # a CPU worker: the CPU thread policy (its OMP_WAIT_POLICY came with its environment)
        apply_thread_policy(config.threads, getattr(config, "interop_threads", None), wait_policy=None)
    attention.set_backend(config.attention_backend)
    bind(config.device)  # before anything touches CUDA: streams, graphs and pinned memory belong to this device
    model, serving = registry.for_path(config.model_dir).load(config)
    if getattr(config, "tokenizer", False):  # before the plan: it counts the encoder
        attach_encoder(model)
    engine = engine_for(model, config.engine, serving)
    if config.warmup:
        engine.warmup()
        if engine.device.type == "cuda":
            measure_warm_step(engine)  # logs the plan's predicted peak step against the measured one
    return engine


def worker_main(config: WorkerConfig, inbox, outbox) -> None:
    """Logging is set up by the spawning trampoline (``server.worker_entry``, from the server's log level)."""
    _watch_parent()
    if config.protocol_version != PROTOCOL_VERSION:
        msg = (f"protocol version mismatch: the API process speaks {config.protocol_version}, this worker "
               f"{PROTOCOL_VERSION} (bitdance_core installed twice?)")
        logger.error(msg)
        outbox.put(WorkerFatal(config.worker_index, msg))
        sys.exit(1)
    from ..tokenize import is_autoencoder_file

    if is_autoencoder_file(config.model_dir):
        _tokenizer_only(config, inbox, outbox)
    try:
        engine = build_engine(config)
        tokenizer = _tokenizer_for(engine) if config.tokenizer else None
    except Exception as e:  # noqa: BLE001 - report any load failure to the parent, then exit non-zero
        logger.exception("worker %d failed to start", config.worker_index)
        permanent = isinstance(e, ValueError)  # CheckpointError, a bad option: the same on every restart
        outbox.put(WorkerFatal(config.worker_index, f"failed to load {config.model_dir}: {e}", permanent=permanent))
        sys.exit(1)
    out = _Output(outbox, engine.model.config.name, config.worker_index)
    out.send(WorkerReady(config.worker_index, {**engine.info(), "quantize": engine.model.quantize,
                                               "tokenizer": tokenizer.spec.to_info() if tokenizer else None}))
    try:
        run_loop(engine, inbox, out, _handler(tokenizer, out, engine.has_work) if tokenizer else None)
    except EngineDead as e:  # the device is unusable: the pool fails this worker's requests and restarts it
        out.pool.shutdown(wait=True)  # what was already produced goes out first, in order
        outbox.put(WorkerFatal(config.worker_index, str(e)))
        sys.exit(1)
    out.pool.shutdown(wait=True)
    sys.exit(0)


def _tokenizer_for(engine):
    from ..image_tokenizer import ImageTokenizer

    return ImageTokenizer.for_model(engine.model, tuple(tuple(s) for s in engine.info()["sizes"]))


def _handler(tokenizer, out: _Output, busy=lambda: False):
    from .tokenizer_worker import TokenizerHandler

    return TokenizerHandler(tokenizer, lambda make: out.pool.submit(lambda: out.outbox.put(make())), busy)


def _tokenizer_only(config: WorkerConfig, inbox, outbox) -> None:
    """``--model`` is a lone autoencoder file: serve the tokenizer messages only, then exit."""
    import torch

    from ..image_tokenizer import ImageTokenizer
    from .tokenizer_worker import run_tokenizer_only

    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        tok = ImageTokenizer.from_file(config.model_dir, config.ae_config, config.device, config.dtype)
    except Exception as e:  # noqa: BLE001 - report any load failure to the parent, then exit non-zero
        logger.exception("worker %d failed to start", config.worker_index)
        outbox.put(WorkerFatal(config.worker_index, f"failed to load {config.model_dir}: {e}"))
        sys.exit(1)
    out = _Output(outbox, tok.name, config.worker_index)
    out.send(WorkerReady(config.worker_index, {
        "kind": "tokenizer", "model": tok.name, "model_dir": config.model_dir, "device": str(tok.device),
        "dtype": str(tok.ae.dtype).removeprefix("torch."), "tokenizer": tok.spec.to_info()}))
    run_tokenizer_only(_handler(tok, out), inbox, out.send, config.worker_index)
    out.pool.shutdown(wait=True)
    sys.exit(0)


def run_loop(engine, inbox, out: _Output, on_message=None) -> None:
    """The shared engine loop (``loop.EngineLoop``) with the worker's outputs: encoded events, one
    ``StepStats`` per step, and a ``Heartbeat`` from the loop itself (its silence = a stuck worker)."""
    last_beat = [0.0]

    def on_submit(req) -> None:
        out.requests[req.request_id] = req
        out.prompt_tokens[req.request_id] = _count_tokens(engine, req.prompt)

    def on_step(step_s: float) -> None:
        out.send(StepStats(requests=engine.last_batch, rows=engine.scheduler.used_rows, waiting=engine.num_waiting,
                           running=engine.num_running, step_s=step_s, phase_s=dict(engine.last_phases),
                           kv_usage=engine.scheduler.kv_usage()))

    def on_tick() -> None:
        if on_message is not None:
            on_message.tick()  # tokenizer messages: one per engine step while busy
        now = time.monotonic()
        if now - last_beat[0] >= (HEARTBEAT_BUSY_S if engine.has_work() else HEARTBEAT_IDLE_S):
            last_beat[0] = now
            out.send(Heartbeat(out.worker_index, engine.has_work(), len(engine.requests),
                               engine.scheduler.used_rows, loop.cancelled, loop.freed_rows))

    loop = EngineLoop(engine, out.event, on_submit=on_submit, on_step=on_step, on_tick=on_tick, on_message=on_message)
    loop.run(inbox)


def _count_tokens(engine, text: str) -> int:
    try:
        prompts = getattr(engine.family, "prompts", None)
        return int(prompts.count_user_tokens(text)) if prompts is not None and text else 0
    except Exception:  # noqa: BLE001 - usage reporting must never fail a request
        logger.exception("could not count prompt tokens")
        return 0
