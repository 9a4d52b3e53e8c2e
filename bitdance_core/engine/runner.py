"""The fixed-shape step runner: persistent buffers, row buckets, device-side lengths, CUDA graphs.

The engine decides *what* runs (admission, which requests step); the runner *runs* it:

* ``prefill(states)``: one prior forward over the admitted requests' unique prefixes (the
  shared unconditional prefixes come from an LRU cache), then copies fill the other rows.
* ``step(running)``: one AR step for every running request: the head's sampler for all rows of
  each step-count group, then one prior block step for every row that feeds a block back.

Layout. Everything per row is indexed by KV slot. ``hidden[slot]`` holds the predictors of a
row's next block, ``bits[slot]`` its last sampled block, ``starts[slot]`` its cache length on
the device (the host mirror ``cache.lengths`` is kept by the same code, so nothing is read
back). A prior block step runs over the contiguous slot range ``[0, R)`` (``R`` a bucket):
keys are a view of the cache, never a gather; rows in the range that do not feed (free slots,
finished requests) are computed and ignored (``active = 0``: they write at positions ``0..P-1``
of their own free or finished slot). The per-row key mask ``(R, 1, 1, Lk)`` is built on the
device into a persistent buffer; RoPE rows are gathered from a table built once.

The head works on packed rows (each request's cond rows then uncond rows, padded to a bucket)
and packed samples: ``sample_rows`` (sampling.py) with per-row and per-sample index buffers, so a
request can be guided at one step (B samples, each read by a cond and an uncond row) and sample
every row independently at another (2B samples); the family decides. All the noise of an AR
step is drawn *before* the sampler loop into a persistent buffer, from each request's own
generator in the reference's order (initial state, then one draw per Euler-Maruyama step;
``(B, P, C)`` when guided, ``(rows, P, C)`` when every row is independent).

On CUDA with ``cuda_graphs`` on, the head's whole sampler loop (per step count and bucket) and
the prior's block step (per row bucket and key-length bucket) are captured once and replayed
(``cuda_graphs.py``: the declared keys at warm-up, others into a bounded LRU). Whatever a graph reads
is owned for the graph's life: the runner's persistent buffers, and the schedule, time table and
noise buffer kept by the graph set with the graph. Nothing in a warm step reads a device value on
the host.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..device import to_device
from ..models.kv_cache import KVCache
from ..sampling import RowGuidance, Schedule, make_schedule, sample_rows
from .cuda_graphs import GraphSet
from .engine_config import CUDA_GRAPHS

logger = logging.getLogger(__name__)

KEY_BUCKET = 256  # key lengths of a captured prior step are rounded up to this
TABLES_KEPT = 64  # schedules and time tables kept for eager steps (a graph keeps its own)


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then steps of x1.5 (rounded to 8), capped by and ending at ``max_rows``."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b = b * 2 if b < 8 else -(-int(b * 1.5) // 8) * 8
    return out + [max_rows]


def graphs_enabled(setting: str, device: torch.device) -> bool:
    """``cuda_graphs``: ``auto`` (on for CUDA), ``on``, ``off``. The setting's one owner is the caller's
    ``EngineConfig`` (``bitdance serve`` reads ``BITDANCE_CUDA_GRAPHS`` into it); nothing here reads the
    environment, so an explicit ``off`` is off."""
    setting = setting.lower()
    if setting not in CUDA_GRAPHS:
        raise ValueError(f"cuda_graphs must be auto, on or off, got {setting!r}")
    if setting == "on" and device.type != "cuda":
        logger.warning("cuda_graphs=on has no effect on %s: CUDA graphs need a CUDA device", device)
    return device.type == "cuda" and setting != "off"


@dataclass
class StepBuffers:
    """Persistent device tensors of a prior block step (the prior's ``plan_step`` reads them)."""

    starts: torch.Tensor  # (rows,) long: cache length of each slot
    active: torch.Tensor  # (rows,) long: 1 when the slot feeds a block this step
    arange_p: torch.Tensor  # (P,) long
    arange_k: torch.Tensor  # (max_len,) long
    row_index: torch.Tensor  # (rows, 1) long: 0..rows-1
    rope_cos: torch.Tensor  # (max_len, head_dim) cos of every cache position
    rope_sin: torch.Tensor
    cos: torch.Tensor  # (rows * P, head_dim) this step's gathered rows
    sin: torch.Tensor
    mask: torch.Tensor  # (rows, max_len) bool
    block: int  # P


class Runner:
    def __init__(self, family, cache: KVCache, cuda_graphs: str, prefix_cache_entries: int,
                 max_cuda_graphs: int):  # EngineConfig's knobs (their one declaration)
        self.family, self.cache = family, cache
        f, dev, R = family, family.device, cache.rows
        self.device, self.P, self.C = dev, f.parallel_num, f.z_channels
        self.buckets = row_buckets(R)
        self.max_cuda_graphs = max_cuda_graphs
        self.graphs = GraphSet(dev, graphs_enabled(cuda_graphs, dev), max_cuda_graphs)
        prior, P = f.prior, self.P
        self.hidden = torch.zeros(R, P, f.hidden_size, dtype=prior.dtype, device=dev)
        self.bits = torch.zeros(R, P, self.C, device=dev)
        self.feed_off = torch.zeros(R, P, f.hidden_size, device=dev)
        self.head_off = torch.zeros(R, P, f.cond_dim, device=dev)
        cos, sin = prior.rope(torch.arange(cache.max_len, device=dev)[None], prior.dtype)
        hd = cos.shape[-1]
        self.buf = StepBuffers(
            starts=torch.zeros(R, dtype=torch.long, device=dev), active=torch.zeros(R, dtype=torch.long, device=dev),
            arange_p=torch.arange(P, device=dev), arange_k=torch.arange(cache.max_len, device=dev),
            row_index=torch.arange(R, device=dev)[:, None], rope_cos=cos[0], rope_sin=sin[0],
            cos=torch.zeros(R * P, hd, dtype=cos.dtype, device=dev),  # rope's dtype (the prior's contract)
            sin=torch.zeros(R * P, hd, dtype=sin.dtype, device=dev),
            mask=torch.zeros(R, cache.max_len, dtype=torch.bool, device=dev), block=P)
        self.rows = RowGuidance(  # packed head rows
            *(torch.zeros(R, dtype=torch.long, device=dev) for _ in range(4)), scale=torch.ones(R, 1, 1, device=dev))
        self.noise = torch.zeros(0, R, P, self.C, device=dev)  # (steps + 1, rows, P, C): reserved at warm-up
        self._noise_extra = self.noise  # graphs on: longer step counts than reserved (grows; its graphs go)
        self._tables: OrderedDict[int, tuple[Schedule, torch.Tensor]] = OrderedDict()
        self.prefix_cache: OrderedDict = OrderedDict()
        self.prefix_cache_entries = prefix_cache_entries
        self._name_buffers()

    @property
    def use_graphs(self) -> bool:
        return self.graphs.enabled

    def set_graph_backend(self, backend) -> None:
        """Graphs on through ``backend`` (tests and ``gpu_check --smoke`` on CPU: the recording stand-in,
        ``recorded_graph.RecordingBackend``); the graphs captured so far are forgotten."""
        self.graphs = GraphSet(self.device, True, self.max_cuda_graphs, backend)
        self._name_buffers()

    def _name_buffers(self) -> None:
        self.graphs.names = {"runner.hidden": self.hidden, "runner.bits": self.bits, "runner.feed_off": self.feed_off,
                             "runner.head_off": self.head_off, "runner.buf": self.buf, "runner.rows": self.rows,
                             "cache.k": self.cache.k, "cache.v": self.cache.v}

    def bucket(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    # ---- prefill ----------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, batch) -> None:
        """One forward over the unique prefixes of the admitted requests; copies fill the other rows."""
        f, cache, P, dev = self.family, self.cache, self.P, self.device
        rows: list[tuple[int, object]] = []  # (slot, prefix) actually computed
        pending: dict = {}  # uncond key -> slot computing it in this batch
        for st in batch:
            cache.reset(st.slots)
            rows.extend((st.cond_slots[imgs[0]], p) for p, imgs in st.prep.cond_groups(st.num_images))
            key = st.prep.uncond_key
            if key in self.prefix_cache:
                self.prefix_cache.move_to_end(key)  # used now: not the one evicted below
            elif st.prep.uses_cfg and key not in pending:
                pending[key] = st.uncond_slots[0]
                rows.append((st.uncond_slots[0], st.prep.uncond_prefix))
        embeds = [f.prefix_embeddings(p) for _, p in rows]
        slots, lengths = [s for s, _ in rows], [e.shape[0] for e in embeds]
        x = torch.zeros(len(rows), max(lengths), embeds[0].shape[-1], dtype=embeds[0].dtype, device=dev)
        for r, e in enumerate(embeds):
            x[r, : e.shape[0]] = e
        hidden = f.prior(x, f.prior.plan_cached(cache, slots, lengths, max(lengths), block=f.prefill_block))
        last = to_device(lengths, dev)[:, None] - P + self.buf.arange_p
        hid = hidden.gather(1, last[:, :, None].expand(len(rows), P, hidden.shape[-1]))
        self.hidden[to_device(slots, dev)] = hid
        for key, slot in pending.items():
            k, v = cache.export_prefix(slot)
            self.prefix_cache[key] = (k, v, self.hidden[slot].clone())
        for st in batch:
            B = st.num_images
            for _, imgs in st.prep.cond_groups(B):
                src = st.cond_slots[imgs[0]]
                n = cache.lengths[src]
                for dst in (st.cond_slots[j] for j in imgs[1:]):
                    cache.k[:, dst, :n] = cache.k[:, src, :n]
                    cache.v[:, dst, :n] = cache.v[:, src, :n]
                    cache.lengths[dst] = n
                    self.hidden[dst] = self.hidden[src]
            if st.prep.uses_cfg:
                self.prefix_cache.move_to_end(st.prep.uncond_key)
                k, v, h_u = self.prefix_cache[st.prep.uncond_key]
                for dst in st.uncond_slots:
                    if cache.lengths[dst] == 0:
                        cache.copy_prefix(dst, k, v)
                    self.hidden[dst] = h_u
            st.slot_index = to_device(list(st.slots), dev)
            st.tokens = torch.zeros(B, st.prep.h * st.prep.w, self.C, device=dev)
        while len(self.prefix_cache) > self.prefix_cache_entries:  # after use: this batch's entries stay valid
            self.prefix_cache.popitem(last=False)
        every = [s for st in batch for s in st.slots]
        self.buf.starts[to_device(every, dev)] = to_device([cache.lengths[s] for s in every], dev)

    # ---- one AR step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, running, tick) -> dict[str, float]:
        """Sample the next block of every running request, then feed the blocks back (one prior
        forward). Advances ``st.step`` and fills ``st.tokens``. Returns phase times."""
        t0 = tick()
        groups: dict[int, list] = {}
        for st in running:
            groups.setdefault(st.req.steps, []).append(st)
        for steps, reqs in groups.items():
            self._sample(steps, reqs)
        t1 = tick()
        feed = [st for st in running if st.step < st.prep.total_steps]
        if feed:
            self._feed(feed)
        return {"head": t1 - t0, "prior": tick() - t1}

    def _schedule(self, steps: int) -> tuple[Schedule, torch.Tensor]:
        """The schedule and the head's time table of a step count (an LRU for eager steps; a graph that
        reads them keeps its own reference, so eviction here never frees what a graph reads)."""
        if steps in self._tables:
            self._tables.move_to_end(steps)
        else:
            sch = make_schedule(steps, float(self.family.time_shift), str(self.device))
            self._tables[steps] = (sch, self.family.head.time_table(sch.t_values))
            while len(self._tables) > TABLES_KEPT:
                self._tables.popitem(last=False)
        return self._tables[steps]

    def _time_table(self, steps: int) -> torch.Tensor:
        return self._schedule(steps)[1]

    def _noise_for(self, steps: int) -> torch.Tensor:
        """The noise buffer of a step count: the reserved one when it is long enough; else (graphs on) a
        second one that grows, dropping the graphs that read it, so the declared graphs never go."""
        if self.noise.shape[0] < steps + 1 and not self.use_graphs:
            self.reserve_steps(steps)
        if self.noise.shape[0] >= steps + 1:
            return self.noise
        if self._noise_extra.shape[0] < steps + 1:
            old = self._noise_extra
            self._noise_extra = torch.zeros(steps + 1, *self.noise.shape[1:], device=self.device)
            self.graphs.drop(lambda k, g: g.keep.get("noise") is old)
        return self._noise_extra

    def reserve_steps(self, steps: int) -> None:
        """Size the noise buffer for ``steps`` (the warm-up: the declared step counts)."""
        if self.noise.shape[0] < steps + 1:
            old = self.noise
            self.noise = torch.zeros(steps + 1, *old.shape[1:], device=self.device)
            self.graphs.drop(lambda k, g: g.keep.get("noise") is old)

    def _sample(self, steps: int, reqs) -> None:
        f, P, dev = self.family, self.P, self.device
        index, state, c_idx, u_idx, scale, spans = [], [], [], [], [], []
        for st in reqs:
            g = f.step_guidance(st, st.step)
            B, a, s0 = st.num_images, len(index), len(c_idx)
            index.extend(st.slots)
            if g is not None:  # guided: B samples, each read by its cond row and its uncond row
                state.extend(s0 + j % B for j in range(st.rows))
                c_idx.extend(a + j for j in range(B))
                u_idx.extend(a + B + j for j in range(B))
                scale.extend([float(g)] * B)
            else:  # every row its own sample
                state.extend(s0 + j for j in range(st.rows))
                c_idx.extend(a + j for j in range(st.rows))
                u_idx.extend(a + j for j in range(st.rows))
                scale.extend([1.0] * st.rows)
            spans.append((st, a, s0, len(c_idx) - s0))
        n, ns = len(index), len(c_idx)
        Hb, Sb = self.bucket(n), self.bucket(ns)
        rg = self.rows
        rg.index[:Hb].copy_(to_device(index + [0] * (Hb - n), dev))
        rg.state_index[:Hb].copy_(to_device(state + [0] * (Hb - n), dev))
        rg.cond_index[:Sb].copy_(to_device(c_idx + [0] * (Sb - ns), dev))
        rg.uncond_index[:Sb].copy_(to_device(u_idx + [0] * (Sb - ns), dev))
        rg.scale[:Sb].copy_(to_device(scale + [1.0] * (Sb - ns), dev, torch.float32)[:, None, None])
        noise = self._noise_for(steps)
        for st, a, s0, k in spans:  # the reference's draw order, per request, before the loop
            off = f.head_offset(st, st.step)
            if off is not None:
                self.head_off[a : a + st.rows] = off
            for j in range(steps + 1):
                noise[j, s0 : s0 + k].normal_(generator=st.generator)
        x = self._run_head(steps, Hb, Sb, noise)
        bits = torch.sign(x[:ns]).index_select(0, rg.state_index[:n])  # per row
        self.bits.index_copy_(0, rg.index[:n], bits)
        for st, a, _, _ in spans:
            s0 = st.step * P
            st.tokens[:, s0 : s0 + P] = bits[a : a + st.num_images]
            st.step += 1

    def _run_head(self, steps: int, Hb: int, Sb: int, noise: torch.Tensor, capture_only: bool = False):
        sch, t_emb = self._schedule(steps)
        key = ("head", steps, Hb, Sb)

        def fn():
            return self._sample_fn(steps, Hb, Sb, sch, t_emb, noise)

        if capture_only:
            return self.graphs.capture(key, fn, self._graph_keep(key))
        return self._replay(key, fn)

    def _sample_fn(self, steps: int, Hb: int, Sb: int, sch: Schedule, t_emb: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
        f, rg = self.family, self.rows
        hidden = self.hidden.index_select(0, rg.index[:Hb])
        cond = f.head.condition(f.head_condition(hidden, self.head_off[:Hb]).to(f.head.dtype))

        def predict(x, i):
            return f.head.predict(x, None, cond, t_emb[i])

        return sample_rows(predict, noise[: steps + 1, :Sb], rg.slice(Hb, Sb), sch)

    def _feed(self, feed) -> None:
        f, cache, P, dev = self.family, self.cache, self.P, self.device
        hi = 1 + max(s for st in feed for s in st.slots)
        R = self.bucket(hi)
        active = [0] * R
        key_len = P
        for st in feed:
            off = f.feed_offset(st, st.step - 1)
            if off is not None:
                self.feed_off.index_copy_(0, st.slot_index, off.expand(st.rows, *off.shape))
            for s in st.slots:
                active[s] = 1
                if cache.lengths[s] + P > cache.max_len:
                    raise ValueError(f"KV cache row {s} overflows: {cache.lengths[s]} + {P} > {cache.max_len}")
                key_len = max(key_len, cache.lengths[s] + P)
                cache.lengths[s] += P
        self.buf.active[:R].copy_(to_device(active, dev))
        if self.use_graphs or dev.type == "cuda":  # the same shapes with graphs on and off: same kernels, same bits
            key_len = min(-(-key_len // KEY_BUCKET) * KEY_BUCKET, cache.max_len)
        self._replay(("prior", R, key_len), lambda: self._prior_fn(R, key_len))

    def _prior_fn(self, R: int, key_len: int) -> None:
        f, b = self.family, self.buf
        emb = f.feed_embeddings(self.bits[:R], self.feed_off[:R])
        out = f.prior(emb, f.prior.plan_step(self.cache, b, R, key_len))
        self.hidden[:R].copy_(out)
        b.starts[:R].add_(b.active[:R] * b.block)

    def _replay(self, key: tuple, fn):
        """``fn()`` through the graph of ``key`` (``GraphSet.run``: replayed, captured now, or eager). The one
        seam every graphed call goes through (the memory plan wraps it to measure the graphs' pool)."""
        return self.graphs.run(key, fn, self._graph_keep(key), None if key[0] == "head" else self._save_starts)

    def _graph_keep(self, key: tuple) -> dict:
        """What the graph of ``key`` reads that only it must keep alive (the head's: its step count's schedule,
        time table and noise buffer; the prior's reads only the runner's persistent buffers)."""
        if key[0] != "head":
            return {}
        sch, t_emb = self._schedule(key[1])
        return {"schedule": sch, "time_table": t_emb, "noise": self._noise_for(key[1])}

    def _save_starts(self):
        """A run that is not the real one (a capture's warm-up) must not advance the lengths."""
        saved = self.buf.starts.clone()
        return lambda: self.buf.starts.copy_(saved)

    # ---- declared CUDA graphs -------------------------------------------------------------------

    def key_lengths(self) -> list[int]:
        """Every key length of a captured prior step (rounded up to ``KEY_BUCKET``, capped by the cache)."""
        top = self.cache.max_len
        return sorted({min(-(-k // KEY_BUCKET) * KEY_BUCKET, top) for k in range(self.P, top + 1)})

    def declared_keys(self, steps: list[int]) -> list[tuple]:
        """The graphs served without a capture in the middle of serving: the head's loop for each step
        count in ``steps`` at every (rows, samples) bucket pair a batch can have (samples between half the
        rows, all guided, and all of them, unguided), and the prior's step at every (rows, key length)."""
        keys, prev = [], 0
        for hb in self.buckets:
            lo = self.bucket(-(-(prev + 1) // 2))
            keys += [("head", s, hb, sb) for s in sorted(set(steps)) for sb in self.buckets if lo <= sb <= hb]
            prev = hb
        return keys + [("prior", r, n) for r in self.buckets for n in self.key_lengths()]

    @torch.inference_mode()
    def capture_declared(self, steps: list[int]) -> dict[str, int]:
        """Capture the declared keys (the warm-up; no request may be running: a prior step writes the KV
        rows of inactive slots at positions 0..P-1). Returns counts of captured and failed keys."""
        if not self.use_graphs:
            return {"captured": 0, "failed": 0}
        keys = self.declared_keys(steps)
        self.graphs.declare(keys)
        self.reserve_steps(max(steps))
        for t in (self.rows.index, self.rows.state_index, self.rows.cond_index, self.rows.uncond_index,
                  self.buf.active):
            t.zero_()  # in range for every bucket
        self.rows.scale.fill_(1.0)
        ok = 0
        for k in keys:
            if k[0] == "head":
                ok += bool(self._run_head(k[1], k[2], k[3], self._noise_for(k[1]), capture_only=True))
            else:
                ok += self.graphs.capture(k, lambda r=k[1], n=k[2]: self._prior_fn(r, n), save=self._save_starts)
        logger.info("captured %d declared CUDA graphs (%d failed, run eagerly)", ok, len(keys) - ok)
        return {"captured": ok, "failed": len(keys) - ok}
