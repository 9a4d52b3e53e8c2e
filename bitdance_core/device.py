"""Device and dtype policy, resolved once and logged with its reason.

Policy: float32 on CPU (exact reproduction of the reference), bfloat16 on CUDA (the released
weights' dtype); an explicit override wins. The sampler state and the diffusion arithmetic stay
float32 regardless (see ``sampling.py``). No autocast anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    reason: str


def resolve(device: str | None = None, dtype: str | None = None) -> Placement:
    if device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:  # always an explicit index: "cuda" is the current device
        dev = torch.device("cuda", torch.cuda.current_device())
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        placement = Placement(dev, _DTYPES[dtype], f"explicit dtype={dtype}")
    elif dev.type == "cuda":
        placement = Placement(dev, torch.bfloat16, "CUDA device: bfloat16 (released weights' dtype)")
    else:
        placement = Placement(dev, torch.float32, f"{dev.type} device: float32 (exact reference reproduction)")
    logger.info("device %s, dtype %s (%s)", placement.device, placement.dtype, placement.reason)
    return placement


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bind(device: str | torch.device | None) -> None:
    """Make ``device`` the process's current CUDA device (a worker's first act): the streams, graph captures,
    pinned host buffers and ``"cuda"`` without an index of this process then belong to it, not to cuda:0."""
    dev = torch.device(device) if device not in (None, "auto") else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)
        logger.info("current CUDA device: %s", dev)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A request's generator on ``device``. A CUDA device on a build without CUDA exists only as fake tensors
    (the memory plan), which draw nothing: a CPU generator stands in for it there."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.Generator().manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def is_fake(t: torch.Tensor) -> bool:
    """A tensor of the memory plan (``FakeTensorMode``): shape, dtype and device, no data."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host list/tensor → device tensor without a stream sync (pinned, non-blocking on CUDA; the pinned buffer
    belongs to the current device, see :func:`bind`)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    if is_fake(t):  # planning: nothing to pin (no fake implementation), and no constant folded on the host
        return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t)
    return t.pin_memory().to(device, non_blocking=True)
