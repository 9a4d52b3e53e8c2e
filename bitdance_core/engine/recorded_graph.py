"""A CPU stand-in for ``torch.cuda.CUDAGraph`` that behaves like one: for tests and ``gpu_check --smoke``.

Capture records the aten ops of one run of a function (a ``TorchDispatchMode``): each op with its
tensor arguments and its Python scalars *as values*. Replay re-executes the recorded ops on the same
storages: the tensors made during the capture are the graph's own (its "pool") and each replay writes
into them; no Python of the captured function runs again, so a host value read at capture is baked
in, exactly as on a GPU. A tensor that existed before the capture (an *input*: a weight, a runner
buffer, a schedule) is held only weakly, by its storage, as a GPU graph holds only its address:
replay raises :class:`GraphInputError`, naming the tensor, when that storage was freed or moved.
An op that reads a device value on the host (``.item()``, data-dependent shapes) fails the capture,
as CUDA's stream capture does.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_HOST_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.masked_select,
               aten._unique2, aten.unique_consecutive, aten.equal}


class GraphInputError(RuntimeError):
    """A recorded graph's input was freed or moved after the capture (a GPU graph would read garbage)."""


class GraphCaptureError(RuntimeError):
    """The captured function did something a CUDA graph cannot capture."""


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclasses.dataclass
class _Input:
    ref: StorageWeakRef
    ptr: int
    meta: tuple  # (dtype, device, size, stride, storage_offset)
    name: str


class _In(int):
    """An argument that is input ``i`` of the graph."""


class _Val(int):
    """An argument that is output slot ``i`` of an earlier op of the graph."""


@dataclasses.dataclass
class _Op:
    func: object
    args: tuple  # as the op got them, tensors replaced by _In / _Val (also inside lists); the rest are values
    kwargs: dict
    outs: list  # output slots in order (None: not a tensor)


def _resolve(a, inputs, vals):
    if type(a) is _In:
        return inputs[a]
    if type(a) is _Val:
        return vals[a]
    if isinstance(a, (list, tuple)) and any(type(x) in (_In, _Val) for x in a):
        return type(a)(_resolve(x, inputs, vals) for x in a)
    return a


def _outputs(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


class RecordedGraph:
    def __init__(self, names: dict[str, object] | None = None):
        self._names = _storage_names(names or {})
        self._ops: list[_Op] = []
        self._inputs: list[_Input] = []
        self._pool: list[torch.Tensor | None] = []  # per output slot: the graph's own tensor, None for a view
        self.replays = 0

    # ---- capture ------------------------------------------------------------------------------

    def record(self, fn):
        """Run ``fn`` once, recording its ops; returns its output (the graph's static output)."""
        rec = _Recorder(self)
        with rec:
            out = fn()
        self._pool = [t if own else None for t, own in rec.slots]  # views of inputs are re-made at replay
        return out

    # ---- replay -------------------------------------------------------------------------------

    def replay(self) -> None:
        inputs = [self._input(i) for i in self._inputs]
        vals = list(self._pool)
        pool = self._pool
        for op in self._ops:
            args = [_resolve(a, inputs, vals) for a in op.args]
            kwargs = {k: _resolve(a, inputs, vals) for k, a in op.kwargs.items()} if op.kwargs else {}
            res = op.func(*args, **kwargs)
            for slot, r in zip(op.outs, _outputs(res)):
                if slot is None:
                    continue
                own = pool[slot]
                if own is None:
                    vals[slot] = r  # a view (or an in-place result) of this replay's storages
                else:
                    own.copy_(r)  # into the graph's own memory, as a kernel of a graph writes its recorded output
        self.replays += 1

    def _input(self, i: _Input) -> torch.Tensor:
        if i.ref.expired():
            raise GraphInputError(f"graph input {i.name} was freed after the capture; a CUDA graph would read "
                                  "memory the allocator has given to something else")
        storage = torch.UntypedStorage._new_with_weak_ptr(i.ref.cdata)
        if storage.data_ptr() != i.ptr:
            raise GraphInputError(f"graph input {i.name} moved after the capture (address {i.ptr:#x} -> "
                                  f"{storage.data_ptr():#x}); a CUDA graph would read the old address")
        dtype, device, size, stride, offset = i.meta
        return torch.empty(0, dtype=dtype, device=device).set_(storage, offset, size, stride)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: RecordedGraph):
        super().__init__()
        self.graph = graph
        self.slots: list[tuple[torch.Tensor, bool]] = []  # every output of the capture: (tensor, graph-owned)
        self.made: dict[int, int] = {}  # id(tensor) -> slot (the tensors stay alive in ``slots`` meanwhile)
        self.inputs: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> input index (alive meanwhile)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _HOST_READS:
            raise GraphCaptureError(f"{func} reads a device value on the host: it cannot be captured")
        out = func(*args, **kwargs)
        ptrs: set[int] = set()

        def ref(a, pos):
            if isinstance(a, torch.Tensor):
                ptrs.add(_ptr(a))
                return _Val(self.made[id(a)]) if id(a) in self.made else _In(self._input(a, func, pos))
            if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
                return type(a)(ref(x, pos) for x in a)
            return a  # a Python value: baked in

        refs = tuple(ref(a, i) for i, a in enumerate(args))
        krefs = {k: ref(a, k) for k, a in kwargs.items()}
        outs = []
        for o in _outputs(out):
            if not isinstance(o, torch.Tensor):
                outs.append(None)
                continue
            slot = len(self.slots)
            self.slots.append((o, _ptr(o) not in ptrs or _ptr(o) == 0))
            self.made[id(o)] = slot
            outs.append(slot)
        self.graph._ops.append(_Op(func, refs, krefs, outs))
        return out

    def _input(self, t: torch.Tensor, func, pos: int) -> int:
        if id(t) in self.inputs:
            return self.inputs[id(t)][0]
        g = self.graph
        what = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
        name = g._names.get(_ptr(t))
        name = f"{name!r} ({what})" if name else f"{what} (argument {pos} of {func}, op {len(g._ops)})"
        meta = (t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset())
        g._inputs.append(_Input(StorageWeakRef(t.untyped_storage()), _ptr(t), meta, name))
        self.inputs[id(t)] = (len(g._inputs) - 1, t)
        return len(g._inputs) - 1


def _storage_names(named: dict[str, object]) -> dict[int, str]:
    """Storage address -> a readable name, for the tensors in ``named`` (tensors, sequences, dataclasses)."""
    out: dict[int, str] = {}

    def walk(name, obj):
        if isinstance(obj, torch.Tensor):
            out.setdefault(_ptr(obj), name)
        elif isinstance(obj, (list, tuple)):
            for i, x in enumerate(obj):
                walk(f"{name}[{i}]", x)
        elif isinstance(obj, dict):
            for k, x in obj.items():
                walk(f"{name}.{k}", x)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(f"{name}.{f.name}", getattr(obj, f.name))

    for k, v in named.items():
        walk(k, v)
    return out


class RecordingBackend:
    """The :class:`~bitdance_core.engine.cuda_graphs.GraphSet` backend of CPU tests: a warm run, then a
    recorded run (unlike a CUDA capture it executes; the runner's ``restore`` undoes its side effects)."""

    def __init__(self):
        self.captures = 0

    def capture(self, fn, restore, names):
        fn()
        restore()
        g = RecordedGraph(names)
        out = g.record(fn)
        self.captures += 1
        return g, out
