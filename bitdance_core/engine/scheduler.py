"""Admission policy of the batching engine (pure Python, never imports torch).

The engine preallocates a static KV cache of ``total_rows`` rows, each able to hold
``max_seq_len`` tokens. A request needs ``rows`` rows (``num_images`` x 2 with classifier-free
guidance, x 1 without) and at most ``seq_len`` tokens in each of them. Rows are *slots*, the
integers ``0 .. total_rows - 1``; a running request owns its slots until it finishes or is
cancelled. A request also counts as one unit against ``max_batch_requests``.

Policy: a bounded waiting queue, admitted in strict FIFO order. :meth:`Scheduler.schedule`
admits from the head while the head fits and stops at the first request that does not
(head-of-line blocking), so a large request is never starved by later small ones. Slots are
handed out lowest index first, which makes allocation deterministic.
"""

from __future__ import annotations

import enum
import heapq
from collections import OrderedDict
from dataclasses import dataclass

from .engine_config import DEFAULTS


class RejectReason(str, enum.Enum):
    QUEUE_FULL = "queue_full"  # the waiting queue holds max_waiting requests already
    TOO_LARGE = "too_large"  # could never fit: rows > total_rows or seq_len > max_seq_len


@dataclass(frozen=True)
class SchedulerConfig:
    """Static limits. Raises ``ValueError`` on a non-positive limit (``max_waiting`` may be 0)."""

    total_rows: int
    max_seq_len: int
    max_batch_requests: int = DEFAULTS.max_batch_requests
    max_waiting: int = DEFAULTS.max_waiting
    max_prefill_rows: int | None = DEFAULTS.max_prefill_rows  # rows admitted (prefilled) per step; None: any

    def __post_init__(self) -> None:
        for name in ("total_rows", "max_seq_len", "max_batch_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


@dataclass
class Ticket:
    """What the scheduler knows of a request. ``arrival`` (monotonic time or a counter) is
    carried for the caller's queue-time bookkeeping; ordering is by submission order."""

    request_id: str
    rows: int
    seq_len: int
    arrival: float


@dataclass(frozen=True)
class Admitted:
    """A request admitted in this step and the KV-cache slots (row indices) it now owns."""

    request_id: str
    slots: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """Result of :meth:`Scheduler.schedule`: the newly admitted requests, and every active
    request after admission (``running``) in admission order, newly admitted ones included."""

    admitted: list[Admitted]
    running: list[str]


class Scheduler:
    """FIFO admission with a row budget, a request budget and a bounded waiting queue.

    Not thread-safe: the engine loop owns it. Invariants: ``used_rows + free_rows ==
    total_rows``; the slot sets of running requests are disjoint; a request id is in at most
    one of waiting / running.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._max_batch = config.max_batch_requests  # lowered by the engine after an out-of-memory
        self._waiting: OrderedDict[str, Ticket] = OrderedDict()
        self._running: dict[str, tuple[int, ...]] = {}  # insertion order = admission order
        self._free: list[int] = list(range(config.total_rows))  # a min-heap of free slots

    # -- requests ------------------------------------------------------------------------------

    def submit(self, ticket: Ticket) -> RejectReason | None:
        """Queue ``ticket``. Returns ``None`` when accepted into the waiting queue,
        ``TOO_LARGE`` when it could never fit (checked first, regardless of load), and
        ``QUEUE_FULL`` when ``max_waiting`` requests are already waiting. Raises
        ``ValueError`` for a request id already waiting or running, or rows / seq_len < 1."""
        rid = ticket.request_id
        if rid in self._waiting or rid in self._running:
            raise ValueError(f"duplicate request_id {rid!r}")
        if ticket.rows < 1 or ticket.seq_len < 1:
            raise ValueError(f"rows and seq_len must be >= 1, got {ticket.rows}, {ticket.seq_len}")
        if ticket.rows > self.config.total_rows or ticket.seq_len > self.config.max_seq_len:
            return RejectReason.TOO_LARGE
        if len(self._waiting) >= self.config.max_waiting:
            return RejectReason.QUEUE_FULL
        self._waiting[rid] = ticket
        return None

    def cancel(self, request_id: str) -> bool:
        """Remove a waiting request, or end a running one and free its slots.
        Returns ``False`` when the id is neither waiting nor running."""
        if self._waiting.pop(request_id, None) is not None:
            return True
        if request_id in self._running:
            self._release(request_id)
            return True
        return False

    def finish(self, request_id: str) -> None:
        """A running request completed: free its slots. ``KeyError`` if it is not running."""
        if request_id not in self._running:
            raise KeyError(f"request {request_id!r} is not running")
        self._release(request_id)

    def schedule(self) -> StepPlan:
        """Admit waiting requests in strict FIFO order while the head fits (enough free rows,
        fewer than ``max_batch_requests`` running, and within ``max_prefill_rows`` rows admitted in
        this step, the first always admitted); stop at the first one that does not."""
        admitted: list[Admitted] = []
        budget = self.config.max_prefill_rows
        while self._waiting and len(self._running) < self._max_batch:
            rid, ticket = next(iter(self._waiting.items()))
            if ticket.rows > len(self._free):
                break
            if admitted and budget is not None and ticket.rows > budget:
                break  # the prefill's row budget: the rest waits for the next step (bounds its memory)
            if budget is not None:
                budget -= ticket.rows
            del self._waiting[rid]
            slots = tuple(sorted(heapq.heappop(self._free) for _ in range(ticket.rows)))
            self._running[rid] = slots
            admitted.append(Admitted(rid, slots))
        return StepPlan(admitted=admitted, running=list(self._running))

    def _release(self, request_id: str) -> None:
        for slot in self._running.pop(request_id):
            heapq.heappush(self._free, slot)

    @property
    def max_batch_requests(self) -> int:
        """The admission limit now (``config.max_batch_requests`` unless lowered)."""
        return self._max_batch

    def set_max_batch_requests(self, n: int) -> None:
        """Change the admission limit (1 .. ``config.max_batch_requests``); running requests are kept."""
        if not 1 <= n <= self.config.max_batch_requests:
            raise ValueError(f"max_batch_requests must be in 1..{self.config.max_batch_requests}, got {n}")
        self._max_batch = n

    # -- inspection ----------------------------------------------------------------------------

    def queue_position(self, request_id: str) -> int | None:
        """0-based position in the waiting queue (0 = next to start); ``None`` if not waiting."""
        if request_id not in self._waiting:
            return None
        for i, rid in enumerate(self._waiting):
            if rid == request_id:
                return i
        return None  # pragma: no cover - unreachable

    def waiting_ids(self) -> list[str]:
        """Waiting request ids, head first."""
        return list(self._waiting)

    def running_ids(self) -> list[str]:
        """Running request ids in admission order."""
        return list(self._running)

    def slots_of(self, request_id: str) -> tuple[int, ...]:
        """The (ascending) slots owned by a running request. ``KeyError`` if it is not running."""
        return self._running[request_id]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def used_rows(self) -> int:
        return self.config.total_rows - len(self._free)

    def kv_usage(self) -> float:
        """Fraction of KV-cache rows in use, ``used_rows / total_rows`` (0..1)."""
        return self.used_rows / self.config.total_rows
