"""Peak live bytes of real code run on fake tensors (no memory allocated, no kernels run).

``FakeTensorMode`` gives every tensor a shape, dtype and device but no data, so the engine's own
prefill and AR step can run at 14B shapes on a laptop. :class:`LiveBytes` is a dispatch mode on
top of it that sees every operator's outputs: a *new* storage (not a view or an in-place result of
an input) is counted from the moment it is created until its last reference dies (a weakref
finalizer on the storage), which is what a caching allocator holds for it. ``peak`` is the
largest sum seen since the last :meth:`LiveBytes.reset_peak`.

Not counted: storages created before the mode was entered (weights, the KV cache), and a kernel's
private workspace (cuBLAS, attention scratch), which the plan's ``reserved_bytes`` covers.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)


def _storages(values) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside it that are still referenced.

    ``with live.pool():`` marks a region whose new storages belong to a CUDA-graph memory pool instead (what a
    captured function allocates lives in the graph's private pool, not in the caching allocator's general
    memory): they count in ``pool_current`` / ``pool_peak``, not in ``current`` / ``peak``.

    ``with live.scaled(num, den):`` counts the new storages of a region as ``nbytes * num // den``: the memory
    plan measures a model of fewer layers and scales what holds every layer (an exported KV prefix) to the
    depth it plans for."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, bool]] = {}  # id(storage) -> (nbytes, in the pool)
        self.current = self.peak = 0
        self.pool_current = self.pool_peak = 0
        self._pool_depth = 0
        self._scale = (1, 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for s in _storages((args, kwargs))}
        pooled = self._pool_depth > 0
        for st in _storages(out):
            key = id(st)
            if key in inputs or key in self._live:
                continue  # a view or an in-place result: no new memory
            n = st.nbytes() * self._scale[0] // self._scale[1]
            self._live[key] = (n, pooled)
            if pooled:
                self.pool_current += n
                self.pool_peak = max(self.pool_peak, self.pool_current)
            else:
                self.current += n
                self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out

    def _free(self, key: int) -> None:
        n, pooled = self._live.pop(key, (0, False))
        if pooled:
            self.pool_current -= n
        else:
            self.current -= n

    def reset_peak(self) -> int:
        """Start a new window; returns the bytes live now (the window's baseline)."""
        self.peak = self.current
        return self.current

    @contextlib.contextmanager
    def scaled(self, num: int, den: int):
        saved, self._scale = self._scale, (num, den)
        try:
            yield
        finally:
            self._scale = saved

    @contextlib.contextmanager
    def pool(self):
        self._pool_depth += 1
        try:
            yield
        finally:
            self._pool_depth -= 1


# ---- fake CUDA tensors on a build without CUDA -----------------------------------------------------


class FakeMode(FakeTensorMode):
    """``FakeTensorMode`` for running the engine: host inputs allowed, and no host constants. (A plain fake mode
    keeps one-element host tensors as real constants and folds ops on them for real, which runs a real kernel on
    the op's device: on a machine without that device, or under ``inference_mode``'s ``aten.to`` overloads, it
    fails.) Every op is shape-only; nothing of the engine's steps reads a device value on the host."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return False



def fake_cuda_ready() -> bool:
    """Make ``FakeTensorMode`` tensors on device ``cuda`` usable on this build; False when it cannot.

    A CUDA build needs nothing (``FakeTensorMode`` installs a no-op CUDA device guard itself when no device is
    visible). A CPU-only build registers no CUDA device guard at all, so every op that switches devices
    (``copy_``, ``index_copy_``, ``x[i] = y``, ``out=``) fails with "PyTorch is not linked with support for cuda
    devices". c10 installs its own no-op ``FakeGuardImpl<CUDA>`` when the registered CUDA guard reports zero
    devices (``ensureCUDADeviceGuardSet``): we register, for that one call, a stand-in object whose every
    virtual method returns 0, so c10 replaces it with its fake guard. Nothing of ours is called afterwards.
    """
    global _FAKE_CUDA
    if torch.cuda.is_available() or torch.backends.cuda.is_built():
        return True
    if _FAKE_CUDA is not None:
        return _FAKE_CUDA
    try:
        import ctypes
        from pathlib import Path

        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
        registry = ctypes.c_void_p.in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE")
        slot = ctypes.c_void_p.from_address(ctypes.addressof(registry) + ctypes.sizeof(ctypes.c_void_p) * 1)  # CUDA
        if slot.value is None:
            _KEEP.append(zero := ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(lambda _self: 0))
            _KEEP.append(vtable := (ctypes.c_void_p * 64)(*[ctypes.cast(zero, ctypes.c_void_p).value] * 64))
            _KEEP.append(stub := (ctypes.c_void_p * 4)(ctypes.addressof(vtable)))
            slot.value = ctypes.addressof(stub)
            torch._C._ensureCUDADeviceGuardSet()
            if slot.value == ctypes.addressof(stub):  # c10 did not take over: undo
                slot.value = None
        with FakeMode():
            torch.zeros(1, device="cuda:0").copy_(torch.zeros(1))
        _FAKE_CUDA = True
    except Exception as e:  # noqa: BLE001 - another torch build: the caller falls back to fake CPU tensors
        logger.warning("fake CUDA tensors are not available on this torch build (%s)", e)
        _FAKE_CUDA = False
    return _FAKE_CUDA


_FAKE_CUDA: bool | None = None
_KEEP: list = []  # the stand-in's ctypes objects live as long as the process
