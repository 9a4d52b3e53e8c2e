"""The engine's knobs and their defaults, in one torch-free module (the API process imports it).

``EngineConfig`` is the only owner of these defaults: the worker's ``WorkerConfig``, the scheduler,
the server's settings (``bitdance serve`` flags and ``BITDANCE_*`` variables) and the benchmarks all
take them from here. ``DEFAULT_STEPS`` / ``DEFAULT_GUIDANCE`` are the request defaults of a checkpoint
without a ``serving_config.json`` (the released models' 50 steps and guidance 7.5); the served values
come from :class:`bitdance_core.engine.serving_config.ServingConfig`, which starts from these.
Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STEPS = 50  # diffusion sampling steps per AR step
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance (<= 1 disables it)
CUDA_GRAPHS = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_requests: int = 16  # most requests in one engine step (lowered for a while after an OOM)
    max_waiting: int = 64  # bounded waiting queue per engine (beyond it: queue_full, HTTP 429)
    max_prefill_rows: int | None = 32  # KV rows admitted (prefilled) per step: bounds the prefill's memory
    kv_budget_bytes: int | None = None  # None: the memory plan on CUDA (bitdance plan), 1 GiB on CPU
    preview_every: int | None = None  # AR steps between previews; None: about 8 previews per image
    preview_method: str = "auto"  # auto | full | linear
    prefix_cache_entries: int = 32  # unconditional prefixes kept (per size and negative prompt)
    profile: bool = False  # synchronise CUDA around phases so phase timings are exact
    cuda_graphs: str = "auto"  # auto | on | off: capture the head's sampler loop and the prior step (CUDA)
    max_cuda_graphs: int = 16  # graphs captured beyond the declared ones (warm-up), LRU; 0: those run eagerly
    decode_batch: int = 1  # requests decoded together: bounds the decoder's full-size activations (memory plan)


DEFAULTS = EngineConfig()
