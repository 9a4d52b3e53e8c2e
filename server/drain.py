"""The measured queue drain: how fast requests finish, hence ``Retry-After`` on a full queue.

A 429 ``queue_full`` carries ``Retry-After`` = the seconds the queue ahead of a new request takes
to drain at the rate requests finished over the last ``WINDOW_S`` seconds: ``ceil((waiting + 1) /
rate)``, between 1 and ``MAX_RETRY_AFTER_S``. Before anything has finished there is no
measurement and the constant of :mod:`server.errors` applies. In memory mode the pool records
completions here; with a shared queue (:mod:`server.shared_queue`) the rate is every replica's,
read from Redis.
"""

from __future__ import annotations

import math
import time
from collections import deque

WINDOW_S = 60.0  # completions counted over this window
MIN_SPAN_S = 1.0  # a burst of completions (one batch) is not a rate of thousands per second
MAX_RETRY_AFTER_S = 600
KEEP = 1024  # completion times remembered


def retry_after_s(waiting: int, rate: float | None) -> int | None:
    """Seconds until ``waiting`` requests ahead (plus this one) drain at ``rate`` per second."""
    if rate is None or rate <= 0:
        return None
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil((waiting + 1) / rate)))


def rate_of(times: list[float], now: float) -> float | None:
    """Completions per second from the completion times within the window (None: not measured)."""
    recent = [t for t in times if now - t <= WINDOW_S]
    if not recent:
        return None
    return len(recent) / max(MIN_SPAN_S, now - min(recent))


class DrainMeter:
    """Completion times of this process (event-loop owned)."""

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=KEEP)

    def record(self) -> None:
        self.times.append(time.monotonic())

    def rate(self) -> float | None:
        return rate_of(list(self.times), time.monotonic())
