"""Prometheus metrics (prefix ``bitdance_``) on a per-app ``CollectorRegistry``.

A per-app registry (never prometheus_client's global one) lets tests build several apps in one
process. Request-level series are observed in the API process from worker events; engine-level
series (batch size, step phases, KV usage) come from the worker's ``StepStats``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bitdance_core.engine.protocol import StepStats
from server.errors import OUTCOMES

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 240, 480, 960)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """Every series the server exports; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bitdance_requests",
            "Generation-route requests by final status (exactly one per request): " + ", ".join(OUTCOMES),
            ["status"],
            registry=r,
        )
        for status in OUTCOMES:  # every series exists from the start (rate() needs a zero)
            self.requests.labels(status)
        self.rejected = Counter(
            "bitdance_requests_rejected",
            "Why requests ended invalid / rejected / too_large (a breakdown, not extra requests)",
            ["reason"],
            registry=r,
        )
        self.queue_time = Histogram(
            "bitdance_request_queue_time_seconds",
            "Time a request waited in the worker queue before its first step",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "bitdance_e2e_request_latency_seconds",
            "Time from admission to the final image (completed requests)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_preview = Histogram(
            "bitdance_time_to_first_preview_seconds",
            "Time from admission to the first preview image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bitdance_batch_size", "Requests per engine step", buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("bitdance_images_generated", "Final images produced", registry=r)
        self.running = Gauge("bitdance_num_requests_running", "Requests being generated", registry=r)
        self.waiting = Gauge("bitdance_num_requests_waiting", "Requests admitted but not started", registry=r)
        self.restarts = Counter("bitdance_worker_restarts", "Model-worker processes restarted after dying", registry=r)
        self.hangs = Counter(
            "bitdance_worker_hangs", "Model workers killed for not responding (worker_hang_s)", registry=r
        )
        self.workers_ready = Gauge("bitdance_workers_ready", "Model workers ready to serve", registry=r)
        self.kv_usage = Gauge(
            "bitdance_kv_cache_usage_ratio", "KV-cache rows in use (0..1), per worker", ["worker"], registry=r
        )
        self.step_duration = Histogram(
            "bitdance_step_duration_seconds",
            "Engine step duration by phase ('step' = the whole step)",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )

    def bind_gauges(
        self, running: Callable[[], float], waiting: Callable[[], float], ready: Callable[[], float]
    ) -> None:
        """Gauges computed at scrape time from the pool's live state (never stale)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.workers_ready.set_function(ready)

    def observe_step(self, worker_index: int, stats: StepStats) -> None:
        if stats.requests > 0:
            self.batch_size.observe(stats.requests)
        self.step_duration.labels("step").observe(stats.step_s)
        for phase, seconds in stats.phase_s.items():
            self.step_duration.labels(phase).observe(seconds)
        self.kv_usage.labels(str(worker_index)).set(stats.kv_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
