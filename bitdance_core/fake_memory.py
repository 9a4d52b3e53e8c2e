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

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(values) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside it that are still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # id(storage) -> nbytes
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for s in _storages((args, kwargs))}
        for st in _storages(out):
            key = id(st)
            if key in inputs or key in self._live:
                continue  # a view or an in-place result: no new memory
            n = st.nbytes()
            self._live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> int:
        """Start a new window; returns the bytes live now (the window's baseline)."""
        self.peak = self.current
        return self.current
