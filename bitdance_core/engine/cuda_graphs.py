"""The runner's CUDA graphs: which keys are captured, what each graph reads, one shared memory pool.

A :class:`GraphSet` maps a key (``("head", steps, rows, samples)``, ``("prior", rows, key_len)``) to a
captured graph and its static output. It owns, for the life of each graph, everything the graph reads
that nobody else keeps alive (``keep``: the sampler's schedule, the time table, the noise buffer), so
no graph can read memory the allocator has handed to someone else.

Bounded. Keys are *declared* (the warm-up captures them: the default step count and every row
bucket, see ``Runner.declared_keys``) and never evicted; any other key is captured on first use into
an LRU of at most ``max_graphs`` graphs (``EngineConfig.max_cuda_graphs``; 0: such keys run eagerly).
A capture that fails falls back to eager for *that key* only, logged with its reason; an out-of-memory
or a device error is raised to the engine's fault ladder (``faults.py``) like any other.

Backends: :class:`CudaGraphBackend` (``torch.cuda.CUDAGraph``, every graph in one memory pool) on CUDA,
and for CPU tests and ``gpu_check --smoke`` the recording stand-in (``recorded_graph.py``), which
replays the recorded kernels on the recorded storages as a GPU does.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .faults import Fault, classify

logger = logging.getLogger(__name__)


class Backend(Protocol):
    def capture(self, fn: Callable, restore: Callable[[], None], names: dict[str, object]) -> tuple[object, object]:
        """Warm ``fn`` up, capture one run of it; returns ``(graph, out)`` (``graph.replay()`` re-runs it
        into ``out``). ``restore()`` undoes the side effects of a run that is not the real one."""


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` on a side stream, every graph in one shared memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def capture(self, fn, restore, names):
        # Not ``torch.cuda.graph(...)``: its __enter__ synchronises, runs gc.collect() and empty_cache() at every
        # capture; stream ordering is all a capture needs here.
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        try:
            with torch.cuda.stream(self.stream):
                fn()  # warm the kernels (cuBLAS workspaces, lazily built tables) outside the capture
                restore()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=self.pool)
                try:
                    out = fn()
                except BaseException:
                    with contextlib.suppress(Exception):  # end the failed capture; its error would hide the cause
                        graph.capture_end()
                    raise
                graph.capture_end()
        finally:
            cur.wait_stream(self.stream)
        return graph, out


@dataclass
class _Graph:
    graph: object
    out: object
    keep: dict = field(default_factory=dict)  # what the graph reads that only it keeps alive
    declared: bool = False


class GraphSet:
    """The captured graphs of one runner (see the module docstring)."""

    def __init__(self, device: torch.device, enabled: bool, max_graphs: int, backend: Backend | None = None):
        if max_graphs < 0:
            raise ValueError(f"max_cuda_graphs must be >= 0, got {max_graphs}")
        self.device, self.max_graphs = device, max_graphs
        self.backend = backend if backend is not None else (CudaGraphBackend(device) if enabled else None)
        self.enabled = enabled and self.backend is not None
        self.names: dict[str, object] = {}  # the runner's buffers, named in a stand-in's replay errors
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._declared: set[tuple] = set()
        self.failed: dict[tuple, str] = {}  # key -> why its capture failed (it runs eagerly)
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key) -> bool:
        return key in self._graphs

    def __iter__(self) -> Iterator[tuple]:
        return iter(list(self._graphs))

    def keys(self) -> list[tuple]:
        return list(self._graphs)

    def declare(self, keys) -> None:
        self._declared.update(keys)
        for k, g in self._graphs.items():
            g.declared = k in self._declared

    def run(self, key: tuple, fn: Callable, keep: dict | None = None, save: Callable | None = None):
        """``fn()`` through the graph of ``key``: replayed if captured, captured now if the key is declared or
        the LRU has room, else run eagerly. ``keep``: what the graph reads that the caller does not keep
        alive (named, for the stand-in's errors). ``save()`` returns a function that undoes the side effects
        of the runs of a capture that are not the real one."""
        if not self.enabled:
            return fn()
        g = self._graphs.get(key)
        if g is None:
            if key in self.failed or (key not in self._declared and self.max_graphs == 0):
                return fn()
            g = self._capture(key, fn, keep or {}, save)
            if g is None:
                return fn()
        else:
            self._graphs.move_to_end(key)
        g.graph.replay()
        return g.out

    def capture(self, key: tuple, fn: Callable, keep: dict | None = None, save: Callable | None = None) -> bool:
        """Capture ``key`` now (the warm-up); False when its capture failed (it will run eagerly)."""
        if not self.enabled or key in self._graphs or key in self.failed:
            return key in self._graphs
        return self._capture(key, fn, keep or {}, save) is not None

    def drop(self, pred: Callable[[tuple, _Graph], bool]) -> None:
        """Forget the graphs for which ``pred(key, graph)`` holds (e.g. they read a buffer being replaced)."""
        for k in [k for k, g in self._graphs.items() if pred(k, g)]:
            del self._graphs[k]

    def _capture(self, key, fn, keep, save) -> _Graph | None:
        t0 = time.perf_counter()
        restore = save() if save is not None else (lambda: None)
        try:
            graph, out = self.backend.capture(fn, restore, {**self.names, **keep})
        except Exception as e:  # noqa: BLE001 - classified: OOM and device errors go to the fault ladder
            restore()
            if classify(e) is not Fault.REQUEST:
                raise
            self.failed[key] = f"{type(e).__name__}: {e}"
            logger.warning("CUDA graph capture of %s failed, this key runs eagerly: %s", key, self.failed[key])
            return None
        restore()
        self.captures += 1
        g = self._graphs[key] = _Graph(graph, out, dict(keep), key in self._declared)
        extra = [k for k, x in self._graphs.items() if not x.declared]
        for k in extra[: max(0, len(extra) - self.max_graphs)]:  # least recently used first
            del self._graphs[k]
        logger.info("captured the graph of %s in %.0f ms (%d graphs)", key, (time.perf_counter() - t0) * 1e3,
                    len(self._graphs))
        return g
