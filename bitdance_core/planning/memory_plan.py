"""The memory plan: how many requests fit on a device, computed from the engine's own step.

A plan adds five terms and solves for the number of concurrent requests ``N`` (``--size``, with
guidance, one image each, so 2 KV rows per request)::

    gpu_memory >= weights + N * 2 * kv_tokens_per_row * kv_bytes_per_token_row
                  + max(peak_prefill, peak_step)(N) + graph_pool(N) + reserved

It measures the CUDA path: the engine runs on fake tensors of device ``cuda`` (on a build without CUDA
too, see :func:`~bitdance_core.planning.fake_memory.fake_cuda_ready`), so its CUDA branches are what is measured:
the CUDA attention path (grouped-query heads folded into the query length under a per-row key mask),
key lengths rounded up to ``runner.KEY_BUCKET``, persistent buffers on the device. Nothing here knows
the kind of model: the model family builds the fake model, names its modules' bytes and makes the
worst-case requests (``family.module_bytes()``, ``family.plan_requests(...)``).

* ``weights_bytes``: the parameter and buffer bytes of the modules as built (whatever their dtype or
  quantisation), the LLM body without ``lm_head``, the head, the projector and the AE decoder.
* KV: ``2 * layers * kv_heads * head_dim * itemsize`` bytes per token and row (160 KiB for 14B in
  bf16); a row holds the longest sequence of any allowed size (template + the longest prompt + the
  image prefix + the image tokens).
* ``peak_prefill_bytes`` / ``peak_step_bytes``: the most bytes the engine holds beyond weights and
  KV while it runs the N requests: per-request state, the unconditional prefix cache, the sampler's
  noise buffer sized for the longest request the limits allow (:func:`_reserve_noise`) and every
  transient (activations, attention inputs, masks). They are *measured*: the real ``Engine`` runs
  its real ``step()`` under ``FakeTensorMode`` (no memory allocated, no kernel run) on a model built
  from the configs (no weight read) and :class:`~bitdance_core.planning.fake_memory.LiveBytes` records the
  peak. The requests are the worst case: the longest prompt and a distinct longest negative prompt
  each (two prefill rows per request, a full prefix cache): every admission step, the AR step with
  the longest keys (a step's peak grows with its key length, so the steps before it cannot exceed it),
  then the batched decode of one decode batch.
* The measured model has ``PLAN_LAYERS`` prior layers and a head of at most 2 x 2 blocks
  (:func:`shallow_config`): the layers (blocks) are identical and a layer's transient is freed before the
  next one runs, so the step's peak does not grow with depth; what
  does (the KV cache, the weights) is counted at full depth: the weights as built plus the layers and blocks
  left out, each the bytes of one built (:func:`planned_weights`), the KV
  analytically, and the exported prefixes of the prefix cache (every layer's K/V of a prefix) are counted
  as full-depth bytes while they are made (``LiveBytes.scaled``). ``tests/test_memory_plan.py`` checks that
  the shallow measurement equals the full one.
* ``graph_pool_bytes``: the CUDA graphs' memory. The runner captures the head's sampler loop and the
  prior's block step into graphs that share ONE private memory pool (``runner._pool``); what a captured
  function allocates stays in that pool for the graph's life and is not available to anything else.
  The plan runs those functions eagerly inside :meth:`LiveBytes.pool` regions: their allocations are
  counted apart from the step's, and the term is their peak (the transient of the largest captured
  function at the planned batch, the longest key bucket and the largest row bucket, plus the outputs
  still held). With ``cuda_graphs=off`` it is 0 and those bytes count in ``peak_step`` instead.
* ``reserved_bytes``: CUDA context, library workspaces and allocator slack, assumed
  (``RESERVED_FIXED`` + ``RESERVED_FRACTION`` of the device).

The transient grows with N, so N is solved by :func:`solve`: the largest N the KV alone allows is measured
first; its peak bounds every smaller batch's, which gives an N that fits; N + 1 is measured only when the
peak at N does not already rule it out (usually 2 measured batch sizes). The plan reports the peaks measured
at its N.
The engine sizes its KV cache on CUDA with the same function (:func:`cuda_kv_budget`).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..device import Placement, dtype_name, resolve  # noqa: F401 - Placement: re-exported for tests
from ..engine.engine import Engine
from ..engine.engine_config import EngineConfig
from ..engine.runner import graphs_enabled
from ..engine.serving_config import ServingConfig
from ..families import registry
from ..families.class_conditional.family import ClassConditional, refuse_quantize, serving_for
from ..families.class_conditional.random_checkpoint import CLASS_PRESETS
from ..families.text_to_image.config import ModelConfig
from ..families.text_to_image.loader import load_tokenizer
from ..families.text_to_image.random_checkpoint import PRESETS, get_preset, model_config, write_tokenizer
from ..loading.quantize import fake_build
from ..loading.quantize import module_bytes as bytes_of
from ..models.autoencoder import BinaryAutoencoder
from .fake_memory import FakeMode, LiveBytes, fake_cuda_ready

logger = logging.getLogger(__name__)

RESERVED_FIXED = 1 << 30  # CUDA context + cuBLAS / attention workspaces + kernel images
RESERVED_FRACTION = 0.03  # caching-allocator fragmentation
MAX_PLANNED_REQUESTS = 256  # the solve's upper bound (a plan of a huge device stays quick)
PLAN_LAYERS = 2  # prior layers of the measured model: layer 1 and on see what every later layer sees
PLAN_STEPS = 2  # sampler steps of the planning requests: the head's peak is per evaluation, not per step count
JSON_KEYS = ("weights_bytes", "kv_bytes_per_token_row", "kv_rows", "kv_tokens_per_row", "kv_bytes",
             "peak_prefill_bytes", "peak_step_bytes", "graph_pool_bytes", "reserved_bytes", "max_concurrent_requests",
             "fits", "gpu_memory_bytes")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"80GiB"`` → 85899345920, ``"141GB"`` → 141e9, ``"48G"`` (binary), or a plain byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r} is not a number with a unit like 80GiB, 141GB or 48G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def reserved_bytes_for(gpu_memory_bytes: int) -> int:
    return RESERVED_FIXED + int(RESERVED_FRACTION * gpu_memory_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int
    kv_bytes_per_token_row: int
    kv_rows: int
    kv_tokens_per_row: int
    kv_bytes: int
    peak_prefill_bytes: int
    peak_step_bytes: int
    reserved_bytes: int
    max_concurrent_requests: int
    fits: bool
    gpu_memory_bytes: int
    graph_pool_bytes: int = 0
    # context (not in the JSON)
    model: str = ""
    dtype: str = ""
    size: tuple[int, int] = (0, 0)  # (height, width)
    reason: str = ""  # why it does not fit
    plan_s: float = 0.0
    weights_by_module: tuple[tuple[str, int], ...] = ()
    device: str = ""  # the device type measured: "cuda" (fake CUDA tensors) or "cpu" (fallback)
    suggestions: tuple[str, ...] = ()  # what would fit, when this does not

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_bytes + max(self.peak_prefill_bytes, self.peak_step_bytes)
                + self.graph_pool_bytes + self.reserved_bytes)

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in JSON_KEYS}

    def table(self) -> str:
        h, w = self.size
        parts = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in self.weights_by_module)
        without_encoder = "" if "ae_encoder" in dict(self.weights_by_module) else " / AE encoder"
        rows = [
            ("weights", gib(self.weights_bytes), f"as built, no lm_head{without_encoder} ({parts})"),
            ("KV per token and row", f"{self.kv_bytes_per_token_row / 1024:g} KiB", "2 x layers x kv_heads x "
             "head_dim x itemsize"),
            ("KV cache", gib(self.kv_bytes), f"{self.kv_rows} rows x {self.kv_tokens_per_row} tokens"),
            ("peak prefill", gib(self.peak_prefill_bytes), "measured: the admission steps (max_prefill_rows each)"),
            ("peak step", gib(self.peak_step_bytes), "measured: worst AR step (longest keys) or final decode"),
            ("CUDA graph pool", gib(self.graph_pool_bytes), "measured: the captured functions' transient (one "
             "pool)"),
            ("reserved", gib(self.reserved_bytes), "CUDA context, workspaces, allocator slack (assumed)"),
            ("total", gib(self.total_bytes), f"of {gib(self.gpu_memory_bytes)}"),
        ]
        head = (f"memory plan: {self.model} ({self.dtype}) at {w}x{h} on {self.device}, guidance on, one image per "
                f"request\n"
                f"max_concurrent_requests: {self.max_concurrent_requests}   fits: {'yes' if self.fits else 'NO'}")
        width = max(len(r[0]) for r in rows)
        body = "\n".join(f"  {a:<{width}}  {b:>11}  {c}" for a, b, c in rows)
        return f"{head}\n{body}"


# ---- building a model without memory -------------------------------------------------------------


def plan_device() -> torch.device:
    """The device the plan measures: fake ``cuda:0`` tensors (the CUDA path), or fake CPU tensors (with a
    warning) on a torch build where fake CUDA tensors cannot be made."""
    if fake_cuda_ready():
        return torch.device("cuda", 0)
    logger.warning("the memory plan measures the CPU code path on this torch build (no fake CUDA tensors)")
    return torch.device("cpu")


def fake_model(config, tokenizer, dtype: torch.dtype, build=None, device: torch.device | str = "cpu"):
    """A model of fake tensors (call inside a ``FakeTensorMode``), built by its family: see
    :func:`bitdance_core.families.registry.fake_model`."""
    device = torch.device(device)
    if device.type == "cuda" and not fake_cuda_ready():
        raise RuntimeError("fake CUDA tensors are not available on this torch build")
    return registry.fake_model(config, dtype, device, tokenizer=tokenizer, build=build)


def module_bytes(model) -> dict[str, int]:
    """Bytes of every parameter and buffer of each module, as built (quantised or not), named by the family."""
    return registry.family_class(model).model_bytes(model)


def planned_weights(model, config) -> dict[str, int]:
    """The module bytes of ``config``'s full depth from a model built from :func:`shallow_config`: its bytes as
    built, plus the prior layers and head blocks (and adaLN projections) it leaves out, each the bytes of one it
    has (they are identical, quantised or not)."""
    out = module_bytes(model)
    name = next(n for n in registry.family_class(model).MODULES if hasattr(getattr(model, n), "kv_layout"))
    prior, net = getattr(model, name), model.head.net
    out[name] += (prior_layers(config) - len(prior.layers)) * bytes_of(prior.layers[0])
    _, depth, adaln = config.depths()
    out["head"] += ((depth - len(net.res_blocks)) * bytes_of(net.res_blocks[0])
                    + (adaln - len(net.ada_ln_blocks)) * bytes_of(net.ada_ln_blocks[0]))
    return out


# ---- measuring the engine --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """What the plan derives from the engine: one row's KV bytes and tokens."""

    kv_bytes_per_token_row: int
    kv_tokens_per_row: int
    rows_per_request: int = 2


def prior_layers(config) -> int:
    """The prior's layer count of either family's config."""
    return config.depths()[0]


def _shallow_head(depth: int, adaln: int) -> tuple[int, int]:
    """(blocks, adaLN projections) of a head that runs every case of the full head's loop: a block that makes a
    new modulation while the last is alive (a later group) and one that reuses it (a later block of its group).
    A valid head has ``depth // k`` == ``adaln`` groups of ``k = depth // adaln`` blocks each."""
    k = max(1, depth // adaln)
    groups = min(adaln, 2)
    return groups * min(k, 2), groups


def shallow_config(config, layers: int | None = None):
    """The same model with at most ``layers`` (default ``PLAN_LAYERS``) prior layers and a head of at most two
    adaLN groups of two blocks: what the plan runs (see the module docstring)."""
    full_layers, full_depth, full_adaln = config.depths()
    layers = min(layers or PLAN_LAYERS, full_layers)
    out = config.with_depths(layers, *_shallow_head(full_depth, full_adaln))
    return config if out == config else out


def engine_shapes(model, serving: ServingConfig, engine_config, layers: int | None = None) -> Shapes:
    """``layers``: the depth planned for (default: the model's); the KV bytes per token grow with it."""
    probe = Engine(model, replace(engine_config, kv_budget_bytes=1 << 62, max_batch_requests=1, cuda_graphs="off"),
                   serving)  # a shape probe: no graph set (a CPU build has no CUDA graph pool to make)
    built = probe.family.prior.kv_layout()[0]
    per_row = probe.cache.nbytes // (probe.cache.rows * probe.max_seq_len)
    return Shapes(per_row * (layers or built) // built, probe.max_seq_len)


def measure_peaks(model, serving: ServingConfig, engine_config, size: tuple[int, int], n: int, *,
                  fast_forward: bool = True, progress=None, decode_cache: dict | None = None,
                  layers: int | None = None) -> dict[str, int]:
    """Run N worst-case requests through the real engine (inside a ``FakeTensorMode``); returns the bytes
    beyond weights and KV: {"prefill", "step" (worst of AR steps and the final decode), "ar_step", "decode"
    (the decode's own transient), "graph_pool" (the captured functions' pool, 0 with graphs off)}.
    ``fast_forward`` skips the AR steps after admission up to T-2 (a smaller peak: fewer keys); without it every
    step is measured (tests). ``progress(line)`` hears one line per measured step. ``decode_cache`` (shared by
    the runs of one plan) keeps the decode's transient, which depends only on the decode batch
    ``min(N, decode_batch)``: measured once, then added to each run's base. ``layers``: the prior depth planned
    for, when ``model`` is a shallow copy (:func:`shallow_config`): the exported prefixes count at that depth."""
    say = progress or (lambda line: None)
    shapes = engine_shapes(model, serving, engine_config)
    rows = n * shapes.rows_per_request
    graphs = graphs_enabled(engine_config.cuda_graphs, model.placement.device)
    cfg = replace(engine_config, max_batch_requests=n, max_waiting=n,
                  kv_budget_bytes=rows * shapes.kv_tokens_per_row * shapes.kv_bytes_per_token_row,
                  preview_every=0, preview_method="full", cuda_graphs="off")  # graphs: measured as pool regions
    engine = Engine(model, cfg, serving)
    _decode_without_pixels(engine)
    h, w = size
    guidance = max(serving.default_guidance, 1.5)
    for req in engine.family.plan_requests(n, h, w, steps=PLAN_STEPS, guidance=guidance,
                                           distinct=engine_config.prefix_cache_entries):
        engine.add_request(req)
    total = engine.sizes.ar_steps(h, w)
    built = engine.family.prior.kv_layout()[0]
    peaks = {}
    with LiveBytes() as live:
        _reserve_noise(engine, serving, graphs)
        if (layers or built) != built:  # a prefix's K/V holds every layer: count it at the planned depth
            def export_prefix(slot, export=engine.cache.export_prefix, live=live):
                with live.scaled(layers, built):
                    return export(slot)
            engine.cache.export_prefix = export_prefix
        if graphs:
            def pooled(key, fn, live=live):
                with live.pool():
                    return fn()
            engine.runner._replay = pooled
        peaks["prefill"] = 0
        k = 0
        while True:  # admission: prefills of at most max_prefill_rows rows, each with an AR step
            live.reset_peak()
            _step(engine)
            k += 1
            say(f"N={n}: admission step {k} ({n - engine.num_waiting}/{n} requests)")
            peaks["prefill"] = max(peaks["prefill"], live.peak)
            if engine.num_waiting == 0:
                break
        steps = []
        if total > 2:
            while not fast_forward and max(st.step for st in engine.requests.values()) < total - 2:
                live.reset_peak()  # (tests: every step, to show the longest keys are the worst)
                _step(engine)
                steps.append(live.peak)
            _fast_forward(engine, total - 2)
            live.reset_peak()
            _step(engine)  # AR step T-1 of every request: the longest keys a prior forward sees
            steps.append(live.peak)
            say(f"N={n}: AR step {total - 1} of {total} (the longest keys)")
        peaks["ar_step"] = peaks["step"] = max(steps, default=0)
        # the last step: its head as above, no prior forward, then the decode of one decode batch
        base = live.reset_peak()
        batch = min(n, engine.config.decode_batch)
        key = (h, w, batch, model.placement.dtype)
        if decode_cache is None or key not in decode_cache:  # the decode's transient depends on its batch only
            gh, gw = engine.sizes.grid(h, w)
            fam = engine.family
            fam.ae.decode(torch.zeros(batch, engine.C, gh, gw, dtype=fam.ae.dtype, device=engine.device))
            say(f"N={n}: final decode")
            if decode_cache is not None:
                decode_cache[key] = live.peak - base
        peaks["decode"] = decode_cache[key] if decode_cache is not None else live.peak - base
        peaks["step"] = max(peaks["step"], base + peaks["decode"])
        peaks["graph_pool"] = live.pool_peak if graphs else 0
    for rid in list(engine.requests):
        engine.cancel(rid)
    return peaks


def _decode_without_pixels(engine) -> None:
    """A request can finish while later ones are still being admitted (a small ``max_prefill_rows``, an image of
    few AR steps): its final decode then runs inside an admission step, as served, on the fake tensors; only the
    host copy of its pixels (which fake tensors cannot give) is left out."""
    fam = engine.family

    def decode(tokens, h, w, generator):
        fam.ae.decode(fam.latent(tokens, h, w).to(fam.ae.dtype), generator=generator)
        return np.zeros((tokens.shape[0], h, w, 3), dtype=np.uint8)

    fam.decode = decode


def _reserve_noise(engine, serving: ServingConfig, graphs: bool) -> None:
    """The sampler's noise buffer at its largest as served: ``steps + 1`` slices for the longest request the
    limits allow, plus, with graphs on, the warm-up's buffer of the default step count, which the declared
    graphs keep beside it (``Runner._noise_for``). The planning requests run ``PLAN_STEPS`` steps in it."""
    longest = serving.limits.steps[1]
    engine.runner.reserve_steps(longest + (serving.default_steps + 1 if graphs else 0))


def _fast_forward(engine, to_step: int) -> None:
    """Advance every running request to AR step ``to_step`` without computing the steps between (the fake
    data is never read): only the lengths that shape the next step move. Planning only."""
    P = engine.P
    starts = getattr(getattr(engine, "runner", None), "buf", None)
    slots, moved = [], []
    for st in engine.requests.values():
        k = to_step - st.step
        if k <= 0 or not st.slots:
            continue
        st.step += k
        for s in st.slots:
            engine.cache.lengths[s] += k * P
            slots.append(s)
            moved.append(k * P)
    if starts is not None and slots:  # the runner's device-side mirror of the lengths (one op, not one per row)
        starts.starts.index_add_(0, torch.tensor(slots, device=starts.starts.device),
                                 torch.tensor(moved, dtype=starts.starts.dtype, device=starts.starts.device))


def _step(engine) -> None:
    failed = [e for e in engine.step() if e.kind.value == "failed"]
    if failed:
        raise RuntimeError(f"the planned step failed: {failed[0].data.get('message')}")


def solve(available_bytes: int, kv_per_request: int, peaks, cap: int | None = None) -> tuple[int, int, int]:
    """Most requests N (at most ``cap``) with N * kv_per_request + peak(N) <= available_bytes, the peak
    growing with N. ``peaks(n) -> (prefill, step[, graph pool])``, each call a measured run. The largest N the
    KV allows (``hi``) is measured first; its peak bounds every smaller batch's from above, so ``n0`` requests
    fit with it; a secant between ``n0`` and ``hi`` guesses the answer. N + 1 is measured only when the peak
    already measured at N (a bound from below) does not rule it out: usually 2 runs, at most a few more.
    Returns (N, *peaks(N)); N = 0 when not even one request fits (the peaks are then those of one request)."""
    def need(p) -> int:  # (prefill, step[, graph pool]): the pool is held beside either
        return max(p[0], p[1]) + sum(p[2:])

    def fits(n: int) -> bool:
        return n * kv_per_request + need(peaks(n)) <= available_bytes

    def next_fits(n: int) -> bool:  # n + 1 fits (measured only when the peak at n does not rule it out)
        return (n + 1) * kv_per_request + need(peaks(n)) <= available_bytes and fits(n + 1)

    hi = max(1, min(available_bytes // kv_per_request, MAX_PLANNED_REQUESTS, cap or MAX_PLANNED_REQUESTS))
    if fits(hi):
        return hi, *peaks(hi)
    if hi == 1:
        return 0, *peaks(1)
    top = need(peaks(hi))
    n = min(max(1, (available_bytes - top) // kv_per_request), hi - 1)
    while n > 1 and not fits(n):  # (only if a smaller batch peaked higher)
        n -= 1
    if not fits(n):
        return 0, *peaks(1)
    p_n = need(peaks(n))
    if (n + 1) * kv_per_request + p_n > available_bytes:  # the peak at n already rules n + 1 out
        return n, *peaks(n)
    slope = (top - p_n) / (hi - n)
    guess = int((available_bytes - p_n + slope * n) // (kv_per_request + slope))
    guess = min(max(guess, n + 1), hi - 1)
    while guess > n and not fits(guess):
        guess -= 1
    while guess + 1 < hi and next_fits(guess):
        guess += 1
    return guess, *peaks(guess)


def _solve_fake(config, tokenizer, dtype: torch.dtype, serving: ServingConfig | None, engine_config,
                size: tuple[int, int] | None, available, build=None, cap: int | None = None, device=None,
                progress=None):
    """Inside one fake mode: (weights by module, serving, size, shapes, N, peak_prefill, peak_step, graph_pool).
    ``available(weights_bytes) -> bytes`` for the KV cache and the engine's peaks."""
    device = torch.device(device) if device is not None else plan_device()
    layers = prior_layers(config)
    with FakeMode():
        model = fake_model(shallow_config(config), tokenizer, dtype, build, device)  # (module docstring)
        serving = serving or registry.default_serving(model)
        size = tuple(size or serving.default_size)
        by_module = planned_weights(model, config)
        weights = sum(by_module.values())
        shapes = engine_shapes(model, serving, engine_config, layers)
        kv_req = shapes.rows_per_request * shapes.kv_tokens_per_row * shapes.kv_bytes_per_token_row
        cache: dict[int, tuple[int, int, int]] = {}
        decode_cache: dict = {}

        def peaks(n: int) -> tuple[int, int, int]:
            if n not in cache:
                p = measure_peaks(model, serving, engine_config, size, n, progress=progress,
                                  decode_cache=decode_cache, layers=layers)
                cache[n] = (p["prefill"], p["step"], p["graph_pool"])
            return cache[n]

        n, pf, ps, pool = solve(available(weights), kv_req, peaks, cap)
    return by_module, serving, size, shapes, n, pf, ps, pool


def _make_plan(by_module: dict[str, int], shapes: Shapes, n, pf, ps, pool, reserved, gpu_memory_bytes, config,
               dtype, size, t0, device: str = "") -> MemoryPlan:
    weights = sum(by_module.values())
    kv_req = shapes.rows_per_request * shapes.kv_tokens_per_row * shapes.kv_bytes_per_token_row
    reason = ""
    if n == 0:
        need = weights + kv_req + max(pf, ps) + pool + reserved
        reason = (f"one request at {size[1]}x{size[0]} needs {gib(need)} (weights {gib(weights)}, KV {gib(kv_req)}, "
                  f"engine peak {gib(max(pf, ps))}, graph pool {gib(pool)}, reserved {gib(reserved)}) but the "
                  f"device has {gib(gpu_memory_bytes)}")
    return MemoryPlan(weights, shapes.kv_bytes_per_token_row, n * shapes.rows_per_request, shapes.kv_tokens_per_row,
                      n * kv_req, pf, ps, reserved, n, n > 0, gpu_memory_bytes, graph_pool_bytes=pool,
                      model=config.name, dtype=dtype_name(dtype), size=tuple(size), reason=reason,
                      plan_s=time.perf_counter() - t0, weights_by_module=tuple(by_module.items()), device=device)


# ---- entry points --------------------------------------------------------------------------------


def plan(config, tokenizer, dtype: torch.dtype, gpu_memory_bytes: int, *,
         size: tuple[int, int] | None = None, serving: ServingConfig | None = None, engine_config=None,
         build=None, reserved_bytes: int | None = None, device=None, progress=None,
         tokenizer_routes: bool = False) -> MemoryPlan:
    """The plan for one device of ``gpu_memory_bytes`` serving ``size`` (height, width; default: the
    serving default size). With ``size`` the deployment allows that size only (``--sizes``). ``config``: a
    text-to-image ``ModelConfig`` (with its ``tokenizer``) or a class-conditional ``ClassModelConfig``.
    ``tokenizer_routes``: the AE encoder is loaded too (``--tokenizer-routes``), counted as ``ae_encoder``."""
    t0 = time.perf_counter()
    engine_config = engine_config or EngineConfig()
    if serving is None:
        serving = _serving_for(config, size)
    reserved = reserved_bytes_for(gpu_memory_bytes) if reserved_bytes is None else reserved_bytes
    device = torch.device(device) if device is not None else plan_device()
    extra = {"ae_encoder": encoder_bytes(config, dtype)} if tokenizer_routes else {}
    by_module, serving, size, shapes, n, pf, ps, pool = _solve_fake(
        config, tokenizer, dtype, serving, engine_config, size,
        lambda w: gpu_memory_bytes - w - sum(extra.values()) - reserved, build, device=device, progress=progress)
    by_module = {**by_module, **extra}
    p = _make_plan(by_module, shapes, n, pf, ps, pool, reserved, gpu_memory_bytes, config, dtype, size, t0,
                   device.type)
    if not p.fits:
        p = replace(p, suggestions=_suggestions(p, config, tokenizer, dtype, serving, build, device))
    return p


def _suggestions(p: MemoryPlan, config, tokenizer, dtype, serving: ServingConfig, build, device) -> tuple[str, ...]:
    """What would fit one request, from the terms already measured (N = 1): a bigger device (exactly what one
    request needs), ``--quantize int8`` (its weights as that load keeps them: built, not measured again),
    a smaller ``--size``."""
    kv_req = p.kv_bytes_per_token_row * p.kv_tokens_per_row * 2
    rest = kv_req + max(p.peak_prefill_bytes, p.peak_step_bytes) + p.graph_pool_bytes + p.reserved_bytes
    out = []
    if build is None and registry.family_of(config).quantizable:
        with FakeMode():
            w8 = sum(planned_weights(fake_model(shallow_config(config), tokenizer, dtype, fake_build("int8"), device),
                                     config).values())
        if w8 + rest <= p.gpu_memory_bytes:
            out.append(f"--quantize int8 (weights {gib(w8)}: one request needs {gib(w8 + rest)})")
    smaller = [s for s in serving.size_policy(config).allowed() if s[0] * s[1] < p.size[0] * p.size[1]]
    if smaller:
        h, w = max(smaller, key=lambda s: s[0] * s[1])
        out.append(f"a smaller --size (e.g. {w}x{h}: fewer KV tokens and a smaller step)")
    out.append(f"a device of at least {gib(p.weights_bytes + rest)} (--gpu-memory)")
    return tuple(out)


def _serving_for(config, size) -> ServingConfig:
    if config.family == ClassConditional.name:
        serving = serving_for(config)
        if size is not None and tuple(size) != tuple(config.size):
            h, w = config.size
            raise ValueError(f"--size {size[1]}x{size[0]}: this class-conditional model generates {w}x{h} only")
        return serving
    return ServingConfig.for_model(config, {"sizes": [list(size)], "default_size": list(size)} if size else None)


def encoder_bytes(config, dtype: torch.dtype) -> int:
    """The AE encoder's weight bytes (loaded only with the tokenizer routes), of either family's config."""
    ddconfig = config.vae_ddconfig if hasattr(config, "vae_ddconfig") else config.ae_ddconfig
    return BinaryAutoencoder.encoder_parameters(ddconfig) * torch.empty((), dtype=dtype).element_size()


def plan_on_device(model, serving: ServingConfig, engine_config) -> MemoryPlan:
    """The engine's start-up plan on CUDA, weights already loaded: the KV cache gets what the free memory
    leaves after the measured peak of a max-batch step, the graph pool and the allocator slack (at most
    ``max_batch_requests`` requests). Logged; ``Engine.memory_plan`` keeps it."""
    t0 = time.perf_counter()
    device = model.placement.device
    free, total = torch.cuda.mem_get_info(device)
    slack = int(RESERVED_FRACTION * total)
    h, w = max(serving.size_policy(model.config).allowed(), key=lambda s: s[0] * s[1])
    dtype = model.placement.dtype
    _, _, _, shapes, n, pf, ps, pool = _solve_fake(
        model.config, getattr(model, "tokenizer", None), dtype, serving, engine_config, (h, w),
        lambda _: free - slack, cap=engine_config.max_batch_requests, device=device)
    by_module = module_bytes(model)  # as loaded (quantised or not)
    reserved = total - free - sum(by_module.values()) + slack  # context and workspaces measured, plus the slack
    p = _make_plan(by_module, shapes, n, pf, ps, pool, reserved, total, model.config, dtype, (h, w), t0, device.type)
    logger.info("memory plan on %s: %d requests at %dx%d, KV %s, predicted peak step %s, prefill %s, graph pool %s, "
                "free %s (%.1f s)", device, n, w, h, gib(p.kv_bytes), gib(ps), gib(pf), gib(pool), gib(free),
                p.plan_s)
    return p


def measure_warm_step(engine) -> dict:
    """On CUDA: run a warm max-batch step (the largest size, guidance on) and compare its measured peak with
    the plan's prediction. Returns {"predicted_bytes", "measured_bytes", "requests"} and logs it."""
    dev = engine.device
    h, w = max(engine.sizes.allowed(), key=lambda s: s[0] * s[1])
    n = engine.scheduler.config.total_rows // 2
    n = min(n, engine.config.max_batch_requests)
    for i in range(n):
        engine.add_request(engine.family.example_request(f"__plan_check_{i}__", h, w, seed=i, steps=PLAN_STEPS,
                                                         guidance_scale=2.0, preview_every=0))
    engine.step()  # prefill + AR step 1 (warms the kernels of this batch)
    while engine.num_waiting:  # admission is spread over steps (max_prefill_rows)
        engine.step()
    engine.step()  # a warm step of the whole batch
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    engine.step()
    torch.cuda.synchronize(dev)
    measured = torch.cuda.max_memory_allocated(dev) - base
    for rid in [r for r in engine.requests if r.startswith("__plan_check_")]:
        engine.cancel(rid)
    plan_ = getattr(engine, "memory_plan", None)
    predicted = plan_.peak_step_bytes if plan_ is not None else None
    logger.info("warm max-batch step (%d requests at %dx%d): measured peak %s beyond the live set, predicted %s",
                n, w, h, gib(measured), gib(predicted) if predicted is not None else "n/a")
    return {"predicted_bytes": predicted, "measured_bytes": measured, "requests": n}


def plan_preset(preset: str, gpu_memory_bytes: int, dtype: str = "bfloat16", size=None, **kw) -> MemoryPlan:
    """A text-to-image preset (``checkpoints.PRESETS``) or a class-conditional one (``imagenet-b-4x``, ...)."""
    if preset in CLASS_PRESETS and preset not in PRESETS:
        if kw.get("build") is not None:
            refuse_quantize("int8")
        return plan(CLASS_PRESETS[preset].config(), None, resolve("cpu", dtype).dtype, gpu_memory_bytes, size=size,
                    **kw)
    try:
        p = get_preset(preset)
    except ValueError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted([*PRESETS, *CLASS_PRESETS])}") from None
    with tempfile.TemporaryDirectory(prefix="bitdance-plan-") as tmp:
        n_tok = write_tokenizer(p, tmp)
        tokenizer = load_tokenizer(tmp)
    config = model_config(p, n_tok, name=p.name)
    return plan(config, tokenizer, resolve("cpu", dtype).dtype, gpu_memory_bytes, size=size, **kw)


def plan_dir(model_dir: str | Path, gpu_memory_bytes: int, dtype: str = "bfloat16", size=None, **kw) -> MemoryPlan:
    config = ModelConfig.from_dir(model_dir)
    return plan(config, load_tokenizer(model_dir), resolve("cpu", dtype).dtype, gpu_memory_bytes, size=size, **kw)
