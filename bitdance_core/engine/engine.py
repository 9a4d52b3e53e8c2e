"""The batching engine: continuous batching of next-patch diffusion across requests.

One ``step()`` is schedule -> run -> update: 1) the scheduler admits waiting requests (FIFO, row
budget); 2) the runner (runner.py) prefills them in ONE batched forward, samples the next block
of every running request with the diffusion head and feeds the blocks back in ONE prior
forward, with fixed shapes and no host sync; 3) the update phase turns the new tokens into
events: progress, previews, final decodes (these may read the device; the step may not).

What depends on the kind of model (prompts or class labels, position tables, guidance schedule,
decode) lives in the model family (family.py); this file is the same for every family.

Contract: a request's images equal the single-request pipeline's for the same parameters,
whatever else shares its batch (its noise comes only from its own generator, in the same order).
The KV cache is allocated once from a memory budget; requests join and leave between steps.
The engine is single-threaded; the worker process (or ``AsyncEngine``) drives it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from ..device import generator
from ..models.attention import resolve_backend
from ..models.kv_cache import KVCache
from .engine_config import EngineConfig
from .faults import EngineDead, on_step_error, prefill_isolating
from .previews import PreviewRenderer, default_preview_every
from .protocol import ErrorCode, EventKind, GenerationRequest
from .request import EngineEvent, InvalidRequest, RequestState
from .runner import Runner
from .scheduler import Scheduler, SchedulerConfig, Ticket
from .serving_config import ServingConfig

logger = logging.getLogger(__name__)

CPU_KV_BUDGET = 1 << 30  # bytes of KV cache on CPU when not configured


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, serving: ServingConfig | None = None,
                 memory_plan=None):
        """``model``: a loaded model of any family (it names the ``ModelFamily`` class that serves it,
        ``model.family_type``). The KV cache gets ``config.kv_budget_bytes``, else ``memory_plan.kv_bytes`` (the
        worker asks ``bitdance_core.planning`` on CUDA), else 1 GiB on CPU."""
        self.model, self.config = model, config or EngineConfig()
        self.serving = serving or model.family_type.default_serving(model)
        self.memory_plan = memory_plan
        self._init_model()
        self._init_cache()
        self.requests: dict[str, RequestState] = {}
        self._positions: dict[str, int] = {}
        self.last_phases: dict[str, float] = {}
        self.last_batch = 0

    # ---- setup -----------------------------------------------------------------------------

    def _init_model(self) -> None:
        self.family = self.model.family_type(self.model, self.serving)
        self.P, self.C, self.device = self.family.parallel_num, self.family.z_channels, self.family.device
        self.sizes = self.family.sizes
        self.previews = PreviewRenderer(self.family.ae, self.family.latent, self.C, self.family.downsample,
                                        self.config.preview_method)

    def _init_cache(self) -> None:
        lim, prior = self.serving.limits, self.family.prior
        max_tokens = max(h * w for h, w in (self.sizes.grid(H, W) for H, W in self.sizes.allowed()))
        self.max_seq_len = self.family.max_prefix_len() + max_tokens - self.P
        layers, kv_heads, head_dim = prior.kv_layout()
        per_row = KVCache.bytes_per_token_row(layers, kv_heads, head_dim, prior.dtype) * self.max_seq_len
        budget = self.config.kv_budget_bytes
        if budget is None and self.memory_plan is not None:
            budget = max(1, self.memory_plan.kv_bytes)
        if budget is None:
            if self.device.type == "cuda":
                raise ValueError("on CUDA the KV budget comes from the memory plan: give kv_budget_bytes or "
                                 "memory_plan (the worker's build_engine asks bitdance_core.planning)")
            budget = CPU_KV_BUDGET
        rows = min(budget // per_row, self.config.max_batch_requests * 2 * lim.num_images[1])
        if rows < 1:
            raise RuntimeError(f"KV budget {budget} bytes is below one row "
                               f"({per_row} bytes at {self.max_seq_len} tokens)")
        self.cache = KVCache(layers, rows, self.max_seq_len, kv_heads, head_dim, prior.dtype, self.device)
        self.runner = Runner(self.family, self.cache, self.config.cuda_graphs, self.config.prefix_cache_entries,
                             self.config.max_cuda_graphs)
        self.scheduler = Scheduler(SchedulerConfig(rows, self.max_seq_len, self.config.max_batch_requests,
                                                   self.config.max_waiting, self.config.max_prefill_rows))
        logger.info("KV cache: %d rows x %d tokens = %.1f MiB", rows, self.max_seq_len, self.cache.nbytes / 2**20)

    def info(self) -> dict:
        cfg, s = self.model.config, self.serving
        h, w = s.default_size
        fam = self.family.info()
        extra_defaults = fam.pop("defaults", {})  # e.g. the class-conditional cfg_schedule
        return {**fam,
            "model": cfg.name, "model_dir": cfg.model_dir, "parallel_num": self.P, "downsample": cfg.downsample,
            "sizes": [list(x) for x in self.sizes.allowed()], "default_size": [h, w],
            "defaults": {"steps": s.default_steps, "guidance_scale": s.default_guidance, "num_images": 1,
                         **extra_defaults},
            "limits": s.limits.as_dict(), "device": str(self.device),
            "dtype": str(self.family.prior.dtype).removeprefix("torch."),
            "attention_backend": resolve_backend(self.device),
            "preview_every": self.preview_every_for(h, w), "preview_method": self.previews.method,
            "max_batch_requests": self.config.max_batch_requests, "max_waiting": self.config.max_waiting,
            "kv_rows": self.cache.rows, "max_seq_len": self.max_seq_len, "cuda_graphs": self.runner.use_graphs,
        }

    def preview_every_for(self, height: int, width: int) -> int:
        if self.config.preview_every is not None:
            return self.config.preview_every
        return default_preview_every(self.sizes.ar_steps(height, width))

    # ---- requests ----------------------------------------------------------------------------

    def with_defaults(self, req: GenerationRequest) -> GenerationRequest:
        """The request with the served model's step and guidance defaults where it left them ``None``."""
        if req.steps is not None and req.guidance_scale is not None:
            return req
        return replace(req, steps=self.serving.default_steps if req.steps is None else req.steps,
                       guidance_scale=self.serving.default_guidance if req.guidance_scale is None
                       else req.guidance_scale)

    def add_request(self, req: GenerationRequest) -> EngineEvent:
        """Validate and queue; raises ``InvalidRequest`` (with ``code`` and ``field``) when refused."""
        req = self.with_defaults(req)
        if req.request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {req.request_id}", field="request_id")
        self.serving.limits.check(req)
        st = RequestState(
            req=req, prep=self.family.prepare(req),
            preview_every=self.preview_every_for(req.height, req.width) if req.preview_every is None
            else req.preview_every,
            generator=generator(self.device, req.seed),
        )
        reason = self.scheduler.submit(Ticket(req.request_id, st.rows, st.seq_len(self.P), st.arrival))
        if reason is not None:
            code = ErrorCode.QUEUE_FULL if reason.value == "queue_full" else ErrorCode.TOO_LARGE
            msg = ("the waiting queue is full" if code is ErrorCode.QUEUE_FULL else
                   f"the request needs {st.rows} KV rows of {st.seq_len(self.P)} tokens; this engine has "
                   f"{self.cache.rows} rows of {self.max_seq_len}")
            raise InvalidRequest(msg, field="num_images" if code is ErrorCode.TOO_LARGE else None, code=code.value)
        self.requests[req.request_id] = st
        pos = self.scheduler.queue_position(req.request_id) or 0
        self._positions[req.request_id] = pos
        return EngineEvent(req.request_id, EventKind.QUEUED, {"position": pos})

    def cancel(self, request_id: str) -> EngineEvent | None:
        st = self.requests.pop(request_id, None)
        self._positions.pop(request_id, None)
        if st is None:
            return None
        self.scheduler.cancel(request_id)
        return EngineEvent(request_id, EventKind.FAILED, {"code": ErrorCode.CANCELLED.value,
                                                          "message": "request cancelled"})

    def has_work(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[EngineEvent]:
        """schedule -> run (the runner: no host sync) -> update (events, previews, final decodes)."""
        events: list[EngineEvent] = []
        phases = dict.fromkeys(("prefill", "head", "projector", "prior", "decode", "preview"), 0.0)
        self.last_phases = phases
        plan = self.scheduler.schedule()
        admitted = [self.requests[a.request_id] for a in plan.admitted]
        running = [self.requests[i] for i in plan.running]
        self.last_batch = len(running)
        try:
            if admitted:
                t0 = self._tick()
                for a, st in zip(plan.admitted, admitted):
                    st.slots, st.started = a.slots, time.monotonic()
                    self._positions.pop(st.id, None)
                    events.append(EngineEvent(st.id, EventKind.STARTED, {"queue_s": st.started - st.arrival}))
                events.extend(prefill_isolating(self, self.runner.prefill, admitted))
                running = [st for st in running if st.id in self.requests]
                phases["prefill"] = self._tick() - t0
            if running:
                phases.update(self.runner.step(running, self._tick))
                self._update(running, events, phases)
        except EngineDead:
            raise
        except Exception as e:  # noqa: BLE001 - the fault ladder: fatal (raises EngineDead), OOM, this batch
            events.extend(on_step_error(self, e, [st for st in running if st.id in self.requests]))
        for rid in self.scheduler.waiting_ids():  # queue positions that moved
            pos = self.scheduler.queue_position(rid)
            if self._positions.get(rid) != pos:
                self._positions[rid] = pos
                events.append(EngineEvent(rid, EventKind.QUEUED, {"position": pos}))
        return events

    def _tick(self) -> float:
        if self.config.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _update(self, running: list[RequestState], events: list[EngineEvent], phases: dict) -> None:
        t0 = self._tick()
        finished = [st for st in running if st.step == st.total_steps]
        for st in running:  # every patch, the last one included (patch N/N, then completed)
            events.append(EngineEvent(st.id, EventKind.PROGRESS, {"step": st.step, "total_steps": st.total_steps}))
            if st.step < st.total_steps and st.preview_every > 0 and st.step % st.preview_every == 0:
                events.append(self._preview(st))
        if finished:
            events.extend(self._finish(finished))
        phases["decode"] = sum(e.data.get("decode_s", 0.0) for e in events if e.kind is EventKind.COMPLETED)
        phases["preview"] = self._tick() - t0 - phases["decode"]

    def _preview(self, st: RequestState) -> EngineEvent:
        img = self.previews.render(st.tokens, st.h, st.w)
        now = time.monotonic()
        if st.first_preview is None:
            st.first_preview = now
        return EngineEvent(st.id, EventKind.PREVIEW, {"step": st.step, "total_steps": st.total_steps, "images": img,
                                                      "since_arrival_s": now - st.arrival})

    @torch.inference_mode()
    def _finish(self, done: list[RequestState]) -> list[EngineEvent]:
        """Decode finished requests, one batched decode per latent size (per request for a GAN decoder,
        whose noise comes from each request's generator)."""
        groups: dict[tuple, list[RequestState]] = {}
        for st in done:
            key = (st.id,) if getattr(self.family.ae, "gan_decoder", False) else (st.h, st.w)
            groups.setdefault(key, []).append(st)
        events = []
        chunks = [g[i : i + self.config.decode_batch] for g in groups.values()
                  for i in range(0, len(g), self.config.decode_batch)]
        for reqs in chunks:
            t0 = time.perf_counter()
            images = self.family.decode(torch.cat([st.tokens for st in reqs]), reqs[0].h, reqs[0].w,
                                        reqs[0].generator)
            decode_s = (time.perf_counter() - t0) / len(reqs)
            for st, imgs in zip(reqs, np.split(images, np.cumsum([st.num_images for st in reqs])[:-1])):
                events.append(self._completed(st, imgs, decode_s))
        return events

    def _completed(self, st: RequestState, images: np.ndarray, decode_s: float) -> EngineEvent:
        self.requests.pop(st.id, None)
        self.scheduler.finish(st.id)
        now = time.monotonic()
        return EngineEvent(st.id, EventKind.COMPLETED, {
            "images": images, "tokens": st.tokens.to(torch.int8).cpu(), "seed": st.req.seed,
            "width": st.req.width, "height": st.req.height, "decode_s": decode_s,
            "timings": {"queue_s": (st.started or now) - st.arrival, "generation_s": now - (st.started or now)},
        })

    # ---- warm-up -----------------------------------------------------------------------------

    def warmup(self) -> None:
        """Warm kernels and the allocator, then choose the preview method from measured costs.

        1) one small request end to end; 2) a default-size request at the default step count for a
        few AR steps after its prefill (the steady-state cost of a step), then cancelled; 3) with CUDA
        graphs on, the declared graphs (``Runner.declared_keys``: the default step count, every bucket).
        """
        H, W = min(self.sizes.allowed(), key=lambda s: s[0] * s[1])
        self.add_request(self.family.example_request("__warmup__", H, W, seed=0, steps=2, guidance_scale=2.0,
                                                     preview_every=0))
        while self.has_work():
            self.step()
        dh, dw = self.serving.default_size
        self.add_request(self.family.example_request("__warmup2__", dh, dw, seed=0, steps=self.serving.default_steps,
                                                     guidance_scale=self.serving.default_guidance, preview_every=0))
        self.step()  # prefill + first step
        n = min(3, self.requests["__warmup2__"].total_steps - 1)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        step_s = (time.perf_counter() - t0) / max(1, n)
        self.cancel("__warmup2__")
        h, w = self.sizes.grid(dh, dw)
        self.previews.choose_method(step_s, h * w // self.P, self.preview_every_for(dh, dw), h, w)
        self.runner.capture_declared([self.serving.default_steps])  # graphs on: none captured while serving
