"""The batching engine: continuous batching of next-patch diffusion across requests.

One ``step()`` = 1) admit waiting requests (FIFO, row budget) and prefill them in ONE batched
forward; 2) for every running request, sample its next block with the diffusion head (one
sampler call per distinct step count; conditional and unconditional rows of all requests
together); 3) project the sampled blocks and run ONE prior forward for all rows, each at its own
cache length; 4) decode finished requests, emit previews and events.

Contract: a request's images equal the single-request pipeline's for the same parameters,
whatever else shares its batch (its noise comes only from its own generator, in the same order).
The KV cache is allocated once from a memory budget; requests join and leave between steps.
The engine is single-threaded; the worker process (or ``AsyncEngine``) drives it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..device import to_device
from ..models.kv_cache import KVCache
from ..models.projector import pos2d_table, sincos_1d, unpatchify_tokens
from ..pipeline import to_uint8
from ..prompts import PromptEncoder
from ..resolutions import POS_TABLE_ROWS, SizeError
from ..sampling import binarize, euler_maruyama, schedule
from ..serving_config import ServingConfig
from ..weights import LoadedModel
from .previews import PreviewRenderer, default_preview_every
from .protocol import ErrorCode, EventKind, GenerationRequest
from .request import EngineEvent, InvalidRequest, RequestState
from .scheduler import Scheduler, SchedulerConfig, Ticket

logger = logging.getLogger(__name__)

CPU_KV_BUDGET = 1 << 30  # bytes of KV cache on CPU when not configured


@dataclass(frozen=True)
class EngineConfig:
    max_batch_requests: int = 16
    max_waiting: int = 64
    kv_budget_bytes: int | None = None  # None: 90% of free memory on CUDA (after weights), 1 GiB on CPU
    preview_every: int | None = None  # None: about 8 previews per image
    preview_method: str = "auto"  # auto | full | linear
    prefix_cache_entries: int = 32
    profile: bool = False  # synchronise CUDA around phases so phase timings are exact
    decode_batch: int = 1  # requests decoded together: bounds the decoder's full-size activations (memory plan)


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, serving: ServingConfig | None = None):
        self.model, self.config = model, config or EngineConfig()
        self.serving = serving or ServingConfig.for_model(model.config)
        self._init_model()
        self._init_cache()
        self.requests: dict[str, RequestState] = {}
        self._positions: dict[str, int] = {}
        self.last_phases: dict[str, float] = {}
        self.last_batch = 0

    # ---- setup -----------------------------------------------------------------------------

    def _init_model(self) -> None:
        cfg = self.model.config
        self.P, self.C, self.device = cfg.parallel_num, cfg.z_channels, self.model.placement.device
        self.prompts = PromptEncoder(self.model.tokenizer, self.P)
        self.sizes = self.serving.size_policy(cfg)
        self._pos_1d = sincos_1d(cfg.llm.hidden_size // 2, POS_TABLE_ROWS).to(self.device)
        self._pe: dict[tuple[int, int], torch.Tensor] = {}
        self._t_emb: dict[int, torch.Tensor] = {}
        self._uncond_prefix: OrderedDict = OrderedDict()
        self.previews = PreviewRenderer(self.model.ae, cfg.patch_side, self.C, cfg.downsample,
                                        self.config.preview_method)

    def _init_cache(self) -> None:
        cfg, lim = self.model.config, self.serving.limits
        template = len(self.prompts.cond_ids(""))
        max_tokens = max(h * w for h, w in (self.sizes.grid(H, W) for H, W in self.sizes.allowed()))
        self.max_seq_len = template + lim.max_prompt_tokens + 2 + max_tokens
        per_row = KVCache.bytes_per_token_row(cfg.llm.num_layers, cfg.llm.num_kv_heads, cfg.llm.head_dim,
                                              self.model.llm.dtype) * self.max_seq_len
        budget = self.config.kv_budget_bytes
        if budget is None:
            if self.device.type == "cuda":
                from ..memory_plan import plan_on_device

                self.memory_plan = plan_on_device(self.model, self.serving, self.config)
                budget = max(1, self.memory_plan.kv_bytes)
            else:
                budget = CPU_KV_BUDGET
        rows = min(budget // per_row, self.config.max_batch_requests * 2 * lim.num_images[1])
        if rows < 1:
            raise RuntimeError(f"KV budget {budget} bytes is below one row "
                               f"({per_row} bytes at {self.max_seq_len} tokens)")
        self.cache = KVCache(cfg.llm.num_layers, rows, self.max_seq_len, cfg.llm.num_kv_heads, cfg.llm.head_dim,
                             self.model.llm.dtype, self.device)
        self.scheduler = Scheduler(SchedulerConfig(rows, self.max_seq_len, self.config.max_batch_requests,
                                                   self.config.max_waiting))
        logger.info("KV cache: %d rows x %d tokens = %.1f MiB", rows, self.max_seq_len, self.cache.nbytes / 2**20)

    def info(self) -> dict:
        cfg, s = self.model.config, self.serving
        h, w = s.default_size
        return {
            "model": cfg.name, "model_dir": cfg.model_dir, "parallel_num": self.P, "downsample": cfg.downsample,
            "sizes": [list(x) for x in self.sizes.allowed()], "default_size": [h, w],
            "defaults": {"steps": s.default_steps, "guidance_scale": s.default_guidance, "num_images": 1},
            "limits": s.limits.as_dict(), "device": str(self.device),
            "dtype": str(self.model.llm.dtype).removeprefix("torch."),
            "attention_backend": __import__("bitdance_core.attention", fromlist=["x"]).resolve_backend(self.device),
            "preview_every": self.preview_every_for(h, w), "preview_method": self.previews.method,
            "max_batch_requests": self.config.max_batch_requests, "max_waiting": self.config.max_waiting,
            "kv_rows": self.cache.rows, "max_seq_len": self.max_seq_len,
        }

    def preview_every_for(self, height: int, width: int) -> int:
        if self.config.preview_every is not None:
            return self.config.preview_every
        return default_preview_every(self.sizes.ar_steps(height, width))

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, req: GenerationRequest) -> EngineEvent:
        """Validate and queue; raises ``InvalidRequest`` (with ``code`` and ``field``) when refused."""
        if req.request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {req.request_id}", field="request_id")
        self.serving.limits.check(req)
        try:
            h, w = self.sizes.grid(req.height, req.width)
        except SizeError as e:
            raise InvalidRequest(str(e), field="size") from e
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if text is not None and (n := self.prompts.count_user_tokens(text)) > self.serving.limits.max_prompt_tokens:
                raise InvalidRequest(f"{name} is {n} tokens long; at most {self.serving.limits.max_prompt_tokens} "
                                     "tokens are allowed", field=name)
        use_cfg = req.guidance_scale > 1.0
        st = RequestState(
            req=req, h=h, w=w, total_steps=(h * w) // self.P,
            cond_ids=self.prompts.cond_ids(req.prompt),
            uncond_ids=self.prompts.uncond_ids(req.negative_prompt) if use_cfg else None,
            preview_every=self.preview_every_for(req.height, req.width) if req.preview_every is None
            else req.preview_every,
            generator=torch.Generator(device=self.device).manual_seed(req.seed),
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
                self._prefill(admitted)
                phases["prefill"] = self._tick() - t0
            if running:
                self._ar_step(running, events, phases)
        except Exception as e:  # noqa: BLE001 - one bad batch must not take the engine down
            logger.exception("engine step failed; failing %d running requests", len(running))
            for st in running:
                self.requests.pop(st.id, None)
                self.scheduler.cancel(st.id)
                events.append(EngineEvent(st.id, EventKind.FAILED, {"code": ErrorCode.INTERNAL.value,
                                                                    "message": f"generation failed: {e}"}))
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

    def _time_table(self, steps: int) -> torch.Tensor:
        """Head time embeddings of every sampler evaluation for a step count (the same at every AR step)."""
        if steps not in self._t_emb:
            sch = schedule(steps, self.model.config.time_shift, str(self.device))
            self._t_emb[steps] = self.model.head.time_table(sch.t_values)
        return self._t_emb[steps]

    def _pos(self, h: int, w: int) -> torch.Tensor:
        key = (h, w)
        if key not in self._pe:
            self._pe[key] = pos2d_table(h, w, self.model.config.patch_side, self.model.config.llm.hidden_size,
                                        self._pos_1d)
        return self._pe[key]

    @torch.inference_mode()
    def _prefill(self, batch: list[RequestState]) -> None:
        """One forward over the unique prefixes of the admitted requests; copies fill the other rows."""
        llm, cache, P = self.model.llm, self.cache, self.P
        rows: list[tuple[int, list[int]]] = []  # (slot, ids) actually computed
        pending: dict[tuple, int] = {}  # uncond key -> slot computing it in this batch
        for st in batch:
            cache.reset(st.slots)
            prefix = self.prompts.image_prefix_ids(st.h, st.w)
            rows.append((st.cond_slots[0], st.cond_ids + prefix))
            if st.use_cfg:
                key = (st.h, st.w, st.req.negative_prompt)
                if key not in self._uncond_prefix and key not in pending:
                    pending[key] = st.uncond_slots[0]
                    rows.append((st.uncond_slots[0], st.uncond_ids + prefix))
        slots = [s for s, _ in rows]
        lengths = [len(ids) for _, ids in rows]
        longest = max(lengths)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, (_, x) in enumerate(rows):
            ids[r, : len(x)] = torch.tensor(x)
        plan = llm.plan_cached(cache, slots, lengths, longest, block=P)
        hidden = llm(llm.embed_tokens(to_device(ids, self.device)), plan)
        last = to_device(lengths, self.device)[:, None] - P + torch.arange(P, device=self.device)
        hid = hidden.gather(1, last[:, :, None].expand(len(rows), P, hidden.shape[-1]))
        by_slot = {s: hid[r] for r, s in enumerate(slots)}
        for key, slot in pending.items():
            k, v = cache.export_prefix(slot)
            self._uncond_prefix[key] = (k, v, by_slot[slot].clone())
            while len(self._uncond_prefix) > self.config.prefix_cache_entries:
                self._uncond_prefix.popitem(last=False)
        for st in batch:
            B, src = st.num_images, st.cond_slots[0]
            n = cache.lengths[src]
            st.hidden = torch.empty(st.rows, P, hidden.shape[-1], dtype=hidden.dtype, device=self.device)
            st.hidden[:B] = by_slot[src]
            for dst in st.cond_slots[1:]:
                cache.k[:, dst, :n] = cache.k[:, src, :n]
                cache.v[:, dst, :n] = cache.v[:, src, :n]
                cache.lengths[dst] = n
            if st.use_cfg:
                key = (st.h, st.w, st.req.negative_prompt)
                self._uncond_prefix.move_to_end(key)
                k, v, h_u = self._uncond_prefix[key]
                for dst in st.uncond_slots:
                    if cache.lengths[dst] == 0:
                        cache.copy_prefix(dst, k, v)
                st.hidden[B:] = h_u
            st.tokens = torch.zeros(B, st.h * st.w, self.C, device=self.device)

    @torch.inference_mode()
    def _ar_step(self, running: list[RequestState], events: list[EngineEvent], phases: dict) -> None:
        m, P = self.model, self.P
        t0 = self._tick()
        groups: dict[int, list[RequestState]] = {}
        for st in running:
            groups.setdefault(st.req.steps, []).append(st)
        pe_s = {st.id: self._pos(st.h, st.w)[st.step * P : (st.step + 1) * P] for st in running}
        bits_of: dict[str, torch.Tensor] = {}
        for steps, reqs in groups.items():
            c_cond = [st.hidden[: st.num_images].float() + pe_s[st.id] for st in reqs]
            c_unc = [st.hidden[st.num_images :].float() + pe_s[st.id] for st in reqs if st.use_cfg]
            cond = m.head.condition(torch.cat(c_cond + c_unc).to(m.head.dtype))
            guidance = [st.req.guidance_scale for st in reqs for _ in range(st.num_images)]

            def noise(reqs=reqs):
                return torch.cat([torch.randn((st.num_images, P, self.C), generator=st.generator, device=self.device)
                                  for st in reqs])

            t_emb = self._time_table(steps)
            def predict(xr, tr, i, cond=cond, te=t_emb):
                return m.head.predict(xr, tr, cond, te[i])

            x = euler_maruyama(predict, noise, guidance, steps, m.config.time_shift, device=self.device)
            for st, bits in zip(reqs, binarize(x).split([st.num_images for st in reqs])):
                bits_of[st.id] = bits
        t1 = self._tick()
        phases["head"] = t1 - t0
        feed, feed_rows = [], []
        for st in running:
            bits = bits_of[st.id]
            st.tokens[:, st.step * P : (st.step + 1) * P] = bits
            st.step += 1
            if st.step < st.total_steps:
                emb = m.projector(bits).float() + pe_s[st.id]
                feed.append(st)
                feed_rows.append(torch.cat([emb, emb]) if st.use_cfg else emb)
        t2 = self._tick()
        phases["projector"] = t2 - t1
        if feed:
            slots = [s for st in feed for s in st.slots]
            hidden = m.llm(torch.cat(feed_rows), m.llm.plan_cached(self.cache, slots, [P] * len(slots), P, block=P))
            for st, h in zip(feed, hidden.split([st.rows for st in feed])):
                st.hidden = h
        t3 = self._tick()
        phases["prior"] = t3 - t2
        finished = [st for st in running if st.step == st.total_steps]
        if finished:
            events.extend(self._finish(finished))
        for st in running:
            if st.step < st.total_steps:
                events.append(EngineEvent(st.id, EventKind.PROGRESS, {"step": st.step, "total_steps": st.total_steps}))
                if st.preview_every > 0 and st.step % st.preview_every == 0:
                    events.append(self._preview(st))
        t4 = self._tick()
        phases["decode"] = sum(e.data.get("decode_s", 0.0) for e in events if e.kind is EventKind.COMPLETED)
        phases["preview"] = t4 - t3 - phases["decode"]

    def _preview(self, st: RequestState) -> EngineEvent:
        img = self.previews.render(st.tokens, st.h, st.w)
        now = time.monotonic()
        if st.first_preview is None:
            st.first_preview = now
        return EngineEvent(st.id, EventKind.PREVIEW, {"step": st.step, "total_steps": st.total_steps, "images": img,
                                                      "since_arrival_s": now - st.arrival})

    def _finish(self, done: list[RequestState]) -> list[EngineEvent]:
        """Decode finished requests, one batched decode per latent size (per request for a GAN decoder,
        whose noise comes from each request's generator)."""
        ae, ps = self.model.ae, self.model.config.patch_side
        groups: dict[tuple, list[RequestState]] = {}
        for st in done:
            key = (st.h, st.w) if not ae.gan_decoder else (st.id,)
            groups.setdefault(key, []).append(st)
        events = []
        chunks = [g[i : i + self.config.decode_batch] for g in groups.values()
                  for i in range(0, len(g), self.config.decode_batch)]
        for reqs in chunks:
            t0 = time.perf_counter()
            latent = torch.cat([unpatchify_tokens(st.tokens, st.h, st.w, ps) for st in reqs])
            images = to_uint8(ae.decode(latent.to(ae.dtype), generator=reqs[0].generator))
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
        few AR steps after its prefill (the steady-state cost of a step), then cancelled.
        """
        H, W = min(self.sizes.allowed(), key=lambda s: s[0] * s[1])
        self.add_request(GenerationRequest("__warmup__", "warm up", H, W, seed=0, steps=2, guidance_scale=2.0,
                                           preview_every=0))
        while self.has_work():
            self.step()
        dh, dw = self.serving.default_size
        self.add_request(GenerationRequest("__warmup2__", "warm up", dh, dw, seed=0, steps=self.serving.default_steps,
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
