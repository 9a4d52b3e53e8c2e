"""Stand-ins for what a CPU build of torch lacks, so the engine's real CUDA code runs on fake ``cuda`` tensors.

``fake_cuda(devices=2)`` is a context: inside it every tensor is a ``FakeTensorMode`` tensor (shape, dtype and
device, no data, no kernel), tensors on ``cuda:N`` work (``bitdance_core.planning.fake_memory.fake_cuda_ready``), and
``torch.cuda`` answers as a machine with ``devices`` GPUs would. Only these are stood in for, each as thin as it
can be and each recording what it was asked, so the tier can check the device every call was meant for:

* device state: ``is_available``, ``device_count``, ``current_device``, ``set_device``, ``device(d)``,
  ``synchronize``, ``empty_cache``, ``mem_get_info`` (``free``/``total``), the allocator statistics (0: fake
  tensors allocate nothing), ``get_device_capability`` / ``get_device_name``;
* streams and events: ``Stream`` (on the current device when none is named, as CUDA's), ``current_stream``,
  ``stream(s)``, ``Event``;
* graphs: ``CUDAGraph`` and ``torch.cuda.graph(g, pool=None, stream=None)``: the capture runs on ``stream`` or,
  as CUDA's, on a new stream of the *current* device; it records (graph, the capture stream's device); replay
  does nothing (fake tensors hold no data, so there is nothing to recompute);
* ``torch.Generator(device="cuda:N")``: a CPU generator that reports ``cuda:N`` (fake random ops draw nothing);
* ``Tensor.pin_memory``: records the current device (pinned host memory belongs to it) and returns the tensor;
* ``Tensor.numpy`` of a fake tensor: zeros of its shape and dtype (encoders need bytes; fake tensors have none);
* reading a checkpoint file (``torch.load``, safetensors' ``safe_open``) runs outside the fake mode: real host
  tensors, as on a GPU machine, which the loader then moves to the device (where they become fake).

``DeviceCheck(device, dtype)`` is a dispatch mode that fails the op (naming it) when an output is on another
CUDA device than ``device``, is float64, or is a floating tensor in neither ``dtype`` nor float32 (the sampler
and the diffusion arithmetic are float32 by design); and an ``out=`` of a copying op (``index_select``, ``gather``,
``cat``) in another dtype than its input, which a real kernel refuses and a fake kernel lets through.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bitdance_core.families.text_to_image import loader as weights
from bitdance_core.planning.fake_memory import FakeMode, fake_cuda_ready

GiB = 1 << 30


@dataclass
class CudaState:
    devices: int
    free: int
    total: int
    current: int = 0
    set_device_calls: list[int] = field(default_factory=list)
    streams: list[int] = field(default_factory=list)  # device of every stream made
    captures: list[int] = field(default_factory=list)  # device of the stream of every graph capture
    replays: int = 0
    pinned_for: list[int] = field(default_factory=list)  # current device at every pin_memory
    generators: list[int] = field(default_factory=list)

    def index(self, device=None) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            i = device
        else:
            d = torch.device(device)
            if d.type != "cuda":
                raise ValueError(f"expected a CUDA device, got {d}")
            i = self.current if d.index is None else d.index
        if not 0 <= i < self.devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal {i} (this machine has {self.devices})")
        return i


def _standins(state: CudaState) -> dict:
    class Stream:
        def __init__(self, device=None, priority: int = 0):
            self.device = torch.device("cuda", state.index(device))
            state.streams.append(self.device.index)

        def wait_stream(self, other) -> None:
            pass

        def wait_event(self, event) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def query(self) -> bool:
            return True

        def record_event(self, event=None):
            return event or Event()

    defaults: dict[int, Stream] = {}
    active: list[Stream] = []

    def current_stream(device=None):
        i = state.index(device)
        for s in reversed(active):
            if s.device.index == i:
                return s
        if i not in defaults:
            defaults[i] = Stream(i)
        return defaults[i]

    @contextlib.contextmanager
    def stream(s):
        if s is None:
            yield
            return
        active.append(s)
        try:
            yield
        finally:
            active.pop()

    class Event:
        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
            pass

        def record(self, stream=None) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def query(self) -> bool:
            return True

        def wait(self, stream=None) -> None:
            pass

        def elapsed_time(self, other) -> float:
            return 0.0

    class CUDAGraph:
        def __init__(self, *a, **kw):
            self.device: int | None = None

        def capture_begin(self, pool=None, capture_error_mode="global") -> None:
            # CUDA captures on the current stream (of the current device, unless a stream context says otherwise)
            dev = active[-1].device.index if active else state.current
            state.captures.append(dev)
            self.device = dev

        def capture_end(self) -> None:
            pass

        def replay(self) -> None:
            state.replays += 1

        def pool(self):
            return ("pool", id(self))

        def reset(self) -> None:
            pass

    class graph:  # noqa: N801 - torch.cuda.graph's name
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode: str = "global"):
            self.cuda_graph, self.stream = cuda_graph, stream or Stream()  # CUDA's: a new stream, current device

        def __enter__(self):
            active.append(self.stream)
            self.cuda_graph.capture_begin()  # records the capture stream's device

        def __exit__(self, *exc):
            active.pop()
            return False

    @contextlib.contextmanager
    def device(d):
        prev = state.current
        if d is not None and not (isinstance(d, int) and d < 0):
            state.current = state.index(d)
        try:
            yield
        finally:
            state.current = prev

    def set_device(d) -> None:
        state.current = state.index(d)
        state.set_device_calls.append(state.current)

    def mem_get_info(device=None):
        state.index(device)
        return state.free, state.total

    def zero(device=None) -> int:
        return 0

    def nothing(*a, **kw) -> None:
        return None

    return {
        "is_available": lambda: True, "device_count": lambda: state.devices, "current_device": lambda: state.current,
        "set_device": set_device, "device": device, "synchronize": nothing, "empty_cache": nothing,
        "mem_get_info": mem_get_info, "memory_allocated": zero, "max_memory_allocated": zero,
        "memory_reserved": zero, "max_memory_reserved": zero, "reset_peak_memory_stats": nothing,
        "get_device_capability": lambda device=None: (9, 0),
        "get_device_name": lambda device=None: "stand-in GPU (fake tensors)",
        "Stream": Stream, "current_stream": current_stream, "stream": stream, "Event": Event,
        "CUDAGraph": CUDAGraph, "graph": graph, "graph_pool_handle": lambda: ("pool", "handle"),
    }


def _generator_class(state: CudaState):
    base = torch.Generator

    class Generator(base):
        """``torch.Generator(device="cuda:N")`` on a CPU build: a CPU generator that reports its CUDA device."""

        def __new__(cls, device=None):
            g = super().__new__(cls, device="cpu")
            d = torch.device(device) if device is not None else torch.device("cpu")
            if d.type == "cuda":
                d = torch.device("cuda", state.index(d))
                state.generators.append(d.index)
            g._standin_device = d
            return g

        def __init__(self, device=None):
            pass

        @property
        def device(self):
            return self._standin_device

    return Generator


_NP = {torch.uint8: np.uint8, torch.int8: np.int8, torch.bool: np.bool_, torch.float32: np.float32,
       torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32, torch.float64: np.float64}


@contextlib.contextmanager
def fake_cuda(devices: int = 2, free: int = 20 * GiB, total: int = 24 * GiB):
    """See the module docstring. Yields the :class:`CudaState` the stand-ins record into."""
    assert fake_cuda_ready(), "this torch build cannot make fake CUDA tensors"
    state = CudaState(devices, free, total)
    real_numpy, real_pin = torch.Tensor.numpy, torch.Tensor.pin_memory

    def numpy(self, *a, **kw):
        if isinstance(self, FakeTensor):
            return np.zeros(tuple(self.shape), dtype=_NP.get(self.dtype, np.float32))
        return real_numpy(self, *a, **kw)

    def pin_memory(self, *a, **kw):
        state.pinned_for.append(state.current)
        return self

    with contextlib.ExitStack() as stack:
        for name, value in _standins(state).items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        stack.enter_context(mock.patch.object(torch, "Generator", _generator_class(state)))
        stack.enter_context(mock.patch.object(torch.Tensor, "numpy", numpy))
        stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", pin_memory))
        real_load, real_open = torch.load, weights.safe_open

        def load(*a, **kw):
            with unset_fake_temporarily():
                return real_load(*a, **kw)

        class safe_open:  # noqa: N801 - safetensors' name
            def __init__(self, *a, **kw):
                with unset_fake_temporarily():
                    self.f = real_open(*a, **kw)

            def __enter__(self):
                with unset_fake_temporarily():
                    self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def __getattr__(self, name):
                attr = getattr(self.f, name)

                def call(*a, **kw):
                    with unset_fake_temporarily():
                        return attr(*a, **kw)
                return call

        stack.enter_context(mock.patch.object(torch, "load", load))
        stack.enter_context(mock.patch.object(weights, "safe_open", safe_open))
        # torch.cuda.is_available() now says True, but this build has no CUDA kernels: fake tensors must never
        # run a real op on a CUDA device (their constant propagation of host tensors would)
        stack.enter_context(mock.patch.object(FakeTensorMode, "avoid_device_init", property(lambda self: True)))
        stack.enter_context(FakeMode())
        yield state
    del real_pin


_SAME_DTYPE_OUT = {torch.ops.aten.index_select, torch.ops.aten.gather, torch.ops.aten.cat, torch.ops.aten.take}


class DeviceCheck(TorchDispatchMode):
    """Every op's tensor outputs: on ``device`` (or the host), never float64, floating ones in ``dtype`` or
    float32. Counts the ops it saw on the device (``ops``)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.device, self.dtype, self.ops = torch.device(device), dtype, 0
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _SAME_DTYPE_OUT and isinstance(kwargs.get("out"), torch.Tensor):
            src = next(t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor))
            if kwargs["out"].dtype != src.dtype:  # CUDA's kernel refuses it; the fake kernel does not check
                raise AssertionError(f"{func}: self and result must have the same scalar type ({src.dtype} into "
                                     f"{kwargs['out'].dtype})")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.device.type == "cuda":
                self.ops += 1
                if t.device != self.device:
                    raise AssertionError(f"{func} made a tensor on {t.device}; this worker's device is {self.device}")
                if t.is_floating_point():
                    self.dtypes.add(t.dtype)
            if t.dtype == torch.float64 or (t.is_floating_point() and t.dtype not in (self.dtype, torch.float32)):
                raise AssertionError(f"{func} made a {t.dtype} tensor on {t.device}; the plan's dtype is "
                                     f"{self.dtype} (float32 for the sampler)")
        return out
