"""Weight-only quantisation of the Qwen3 prior's linear layers, applied tensor by tensor while loading.

Modes (``--quantize`` / ``BITDANCE_QUANTIZE``; one owner for the names: ``MODES``):

* ``none`` (default): the weights as stored, converted to the placement dtype (bit-identical to before);
* ``int8``: symmetric per-output-channel int8 weights with float32 scales (torchao ``Int8Tensor``, the tensor
  of ``Int8WeightOnlyConfig``); activations stay in the compute dtype, so it runs wherever a float matmul runs
  (CPU and CUDA). Each row of the output depends only on its own input row, so batching does not change results;
* ``fp8``: float8 e4m3 per-row weights with per-token dynamic float8 activations (torchao ``Float8Tensor``, the
  tensor of ``Float8DynamicActivationFloat8WeightConfig`` with ``PerRow``), for CUDA devices of compute capability
  >= 8.9 (Ada, Hopper and newer) in bfloat16; anywhere else it is an error naming the device's capability.

The 7 projections of every decoder layer are quantised (``q/k/v/o_proj``, ``gate/up/down_proj``: 13.2 of the
14.8 B parameters of Qwen3-14B); with int8 also the prior's token embedding table (``embed_tokens``: 0.78 B
parameters), in the same per-row symmetric format, looked up by ``Int8Embedding`` (gather the rows, then
dequantise only those). Norms, the diffusion head, the projector and the autoencoder keep the placement dtype
(measurements: ``bench/bench_quantize.py`` and the README's quantisation section).
The quantisation reads the file's tensor, upcasts it exactly to float32 (int8) or keeps it bfloat16 (fp8) on the
target device, quantises it and drops the high-precision copy before the next tensor, so the whole bf16 model is
never resident next to its quantised copy. torchao is imported on first use only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import logging
import re
import sys

import torch

from ..device import Placement

logger = logging.getLogger(__name__)

MODES = ("none", "int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)
TORCHAO_PIN = "torchao==0.18.0"
# the linear weights of one decoder layer, as module keys (no "model." prefix)
_TARGET = re.compile(r"^layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
EMBED_KEY = "embed_tokens.weight"  # the prior's token embedding table (module key), int8 only
_CHUNK_ELEMENTS = 1 << 26  # int8 quantises at most this many elements at a time (a 256 MiB float32 temporary)
# the tensors torchao's safetensors format stores for one quantised weight, per mode
DATA_NAMES = {"int8": ("qdata", "scale", "zero_point"), "fp8": ("qdata", "scale")}
QDATA_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


class QuantizeError(ValueError):
    """An impossible quantisation request (unknown mode, unsupported device or dtype, missing library)."""


def check_mode(mode: str | None) -> str:
    """Normalise ``mode`` (None = ``none``); an unknown name is an error listing the allowed ones."""
    m = "none" if mode is None else str(mode).strip().lower()
    if m not in MODES:
        raise QuantizeError(f"quantize must be one of {', '.join(MODES)}, got {mode!r}")
    return m


def device_capability(device: torch.device) -> str:
    """The device in words, with its CUDA compute capability when it has one."""
    if device.type != "cuda":
        return f"{device} (no CUDA compute capability)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"


def check_supported(mode: str, placement: Placement) -> None:
    """Raise ``QuantizeError`` when ``mode`` cannot run on ``placement`` (fp8: CUDA >= 8.9 in bfloat16)."""
    if mode != "fp8":
        return
    dev = placement.device
    ok = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= FP8_MIN_CAPABILITY
    if not ok:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        raise QuantizeError(f"quantize=fp8 needs a CUDA device of compute capability >= {need} (Ada, Hopper or "
                            f"newer); this worker's device is {device_capability(dev)}; use quantize=int8 instead")
    if placement.dtype != torch.bfloat16:
        raise QuantizeError(f"quantize=fp8 computes in bfloat16; dtype {placement.dtype} was requested")


def is_target(key: str) -> bool:
    """Whether a module key (``layers.N.mlp.up_proj.weight``, no ``model.`` prefix) is a quantised linear weight."""
    return bool(_TARGET.match(key))


def is_quantized(key: str, mode: str, embedding: bool = True) -> bool:
    """Whether a prior module key is stored quantised under ``mode``: the linear weights, and with int8 the token
    embedding table (``embedding=False``: a pre-quantised directory of format 1, written before it was)."""
    return is_target(key) or (embedding and mode == "int8" and key == EMBED_KEY)


class Int8Embedding(torch.nn.Module):
    """``nn.Embedding`` over an int8 table (torchao ``Int8Tensor``, one float32 scale per row, symmetric).

    A lookup gathers the int8 rows and their scales first and dequantises only those rows, with torchao's own
    ``dequantize_affine``: the result equals ``weight.dequantize()[ids]`` exactly, and no temporary as large as the
    table is made (torchao's ``aten.embedding`` for ``Int8Tensor`` dequantises the whole table per call).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if weight is None:  # shapes only, filled by load_state_dict(assign=True)
            weight = torch.empty(num_embeddings, embedding_dim, device="meta")
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quant_primitives import dequantize_affine

        w, flat = self.weight, ids.reshape(-1)
        zp = None if w.zero_point is None else w.zero_point.index_select(0, flat)
        rows = dequantize_affine(w.qdata.index_select(0, flat), (1, self.embedding_dim), w.scale.index_select(0, flat),
                                 zp, torch.int8, output_dtype=w.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def prepare_prior_(llm: torch.nn.Module, mode: str, embedding: bool = True) -> None:
    """Give the prior the modules a ``mode`` load fills: with int8 (and ``embedding``), ``embed_tokens`` becomes an
    ``Int8Embedding`` of the same shape and key. On a loaded prior its table is quantised here (row chunks)."""
    old = llm.embed_tokens
    if mode != "int8" or not embedding or isinstance(old, Int8Embedding):
        return
    n, d = old.weight.shape
    w = None
    if old.weight.device.type != "meta":
        w = quantize_weight(old.weight.detach(), mode, old.weight.device, old.weight.dtype)
    llm.embed_tokens = Int8Embedding(n, d, w)
    del old
    release_freed_memory()


_SUBMODULES = ("torchao", "torchao.quantization", "torchao.prototype.safetensors.safetensors_support")


def torchao():
    """Import torchao (soft, once) and the parts used here.

    On a CPU-only torch build the warnings about torchao's CUDA kernel libraries (and torch's deprecation notes on
    torchao's enums) are dropped: they concern kernels a CPU build cannot use.
    """
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")] if torch.version.cuda is None else []
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        mods = [importlib.import_module(n) for n in _SUBMODULES]
    except ImportError as e:
        raise QuantizeError(f"quantisation needs torchao ({TORCHAO_PIN}: `pip install {TORCHAO_PIN}`): {e}") from e
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    return mods[0]


def quantize_weight(weight: torch.Tensor, mode: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """One linear weight (any float dtype, any device) → its quantised tensor on ``device``, computing in ``dtype``.

    The high-precision copy is made on ``device`` and dropped on return; the result holds only the quantised data.
    """
    torchao()
    from torchao.quantization import Float8Tensor, Int8Tensor, PerRow

    if mode == "int8":  # row by row independent: quantised in chunks of rows, the same result as in one go
        out, inp = weight.shape
        step = max(1, _CHUNK_ELEMENTS // max(1, inp))
        if out <= step:
            q = Int8Tensor.from_hp(weight.to(device=device, dtype=torch.float32), granularity=PerRow())
            return Int8Tensor(q.qdata, q.scale, q.block_size, dtype, zero_point=q.zero_point)
        qdata = torch.empty(out, inp, dtype=torch.int8, device=device)
        scale = torch.empty(out, 1, dtype=torch.float32, device=device)
        zero = torch.empty(out, 1, dtype=torch.int8, device=device)
        for a in range(0, out, step):
            q = Int8Tensor.from_hp(weight[a:a + step].to(device=device, dtype=torch.float32), granularity=PerRow())
            qdata[a:a + step], scale[a:a + step], zero[a:a + step] = q.qdata, q.scale, q.zero_point
            del q
        return Int8Tensor(qdata, scale, [1, inp], dtype, zero_point=zero)
    if mode == "fp8":
        cfg = fp8_config()
        return Float8Tensor.from_hp(weight.to(device=device, dtype=torch.bfloat16), float8_dtype=cfg.weight_dtype,
                                    granularity=cfg.granularity[1], mm_config=cfg.mm_config,
                                    kernel_preference=cfg.kernel_preference, act_quant_kwargs=_fp8_act_kwargs(cfg))
    raise QuantizeError(f"quantize_weight: mode {mode!r} is not a quantisation")


def fp8_config():
    """torchao's dynamic-activation fp8 config, per-row: the library's defaults (fast-accumulation scaled mm)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def _fp8_act_kwargs(cfg):
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    return QuantizeTensorToFloat8Kwargs(cfg.activation_dtype, cfg.granularity[0],
                                        kernel_preference=cfg.kernel_preference)


def to_placement(q: torch.Tensor, mode: str, placement: Placement) -> torch.Tensor:
    """A stored quantised tensor (from a pre-quantised checkpoint) moved to the placement's device and dtype."""
    from torchao.quantization import Int8Tensor

    dev = placement.device
    if mode == "int8":
        zp = None if q.zero_point is None else q.zero_point.to(dev)
        return Int8Tensor(q.qdata.to(dev), q.scale.to(dev), list(q.block_size), placement.dtype, zero_point=zp)
    return q.to(dev)


def mode_of(t: torch.Tensor) -> str:
    """``int8`` / ``fp8`` for a quantised tensor, ``none`` for a plain one."""
    name = type(t).__name__
    return {"Int8Tensor": "int8", "Float8Tensor": "fp8"}.get(name, "none")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor keeps: the inner tensors of a torchao subclass (qdata, scale, ...), else numel x itemsize."""
    names = getattr(t, "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    names = list(names) + list(getattr(t, "optional_tensor_data_names", []))
    return sum(tensor_bytes(x) for x in (getattr(t, n, None) for n in names) if isinstance(x, torch.Tensor))


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``modules`` (quantised weights counted as stored)."""
    return sum(tensor_bytes(t) for m in modules for t in (*m.parameters(), *m.buffers()))


def linear_weight_bytes(out_features: int, in_features: int, mode: str, dtype_bytes: int = 2) -> int:
    """Bytes one linear weight keeps under ``mode`` (for memory plans without building the model)."""
    if mode == "int8":
        return out_features * in_features + out_features * 5  # int8 data + float32 scale + int8 zero point
    if mode == "fp8":
        return out_features * in_features + out_features * 4
    return out_features * in_features * dtype_bytes


def converter(mode: str, placement: Placement):
    """The per-tensor conversion the text-to-image ``loader.load_into`` applies to the prior (None for ``none``)."""
    if mode == "none":
        return None
    torchao()

    def convert(key: str, t: torch.Tensor) -> torch.Tensor:
        if is_quantized(key, mode):
            out = quantize_weight(t, mode, placement.device, placement.dtype)
            release_freed_memory()
            return out
        return t.to(device=placement.device, dtype=placement.dtype)

    return convert


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give the heap pages freed by one tensor's quantisation back to the OS (glibc ``malloc_trim``; else no-op).

    Each quantisation frees float32 temporaries of the tensor's size while the small int8 result stays allocated
    between them; without a trim, glibc keeps those freed pages resident and a quantised load's RSS grows to several
    times the bytes it keeps (3.8x measured on ``bench-mem``; 1.0x with the trim, at ~1 ms per tensor).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def empty_quantized(shape: tuple[int, int], mode: str, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised quantised weight of ``shape`` as a quantised load keeps it (memory plans: call it inside a
    ``FakeTensorMode`` and nothing is allocated)."""
    torchao()
    from torchao.quantization import Float8Tensor, Int8Tensor

    out, inp = shape
    qdata = torch.empty(shape, dtype=QDATA_DTYPE[mode])
    scale = torch.empty(out, 1, dtype=torch.float32)
    if mode == "int8":
        return Int8Tensor(qdata, scale, [1, inp], dtype, zero_point=torch.empty(out, 1, dtype=torch.int8))
    cfg = fp8_config()
    return Float8Tensor(qdata, scale, [1, inp], mm_config=cfg.mm_config, act_quant_kwargs=_fp8_act_kwargs(cfg),
                        kernel_preference=cfg.kernel_preference, dtype=dtype)


def fake_build(mode: str):
    """A ``build(modules, dtype)`` for ``memory_plan.plan``: fills the meta-built modules (the prior first) with fake
    tensors as a ``mode`` load keeps them (none: None)."""
    mode = check_mode(mode)
    if mode == "none":
        return None

    def build(modules, dtype: torch.dtype):
        prepare_prior_(modules[0], mode)
        for i, m in enumerate(modules):
            state = {}
            for k, v in m.state_dict(keep_vars=True).items():
                if i == 0 and is_quantized(k, mode):
                    state[k] = empty_quantized(tuple(v.shape), mode, dtype)
                else:
                    state[k] = torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype)
            m.load_state_dict(state, strict=True, assign=True)
        return modules

    return build


def quantize_module_(module: torch.nn.Module, mode: str, placement: Placement, keys=None) -> None:
    """Quantise an already-loaded module's weights in place (``keys``: module keys; default: the prior's
    targets, and its embedding table with int8), one at a time on their device: for models built without a file
    (``build_random_model``) and measurements."""
    mode = check_mode(mode)
    check_supported(mode, placement)
    if mode == "none":
        return
    if keys is None and hasattr(module, "embed_tokens"):
        prepare_prior_(module, mode)
    for name, mod in list(module.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if isinstance(mod, torch.nn.Linear) and (key in keys if keys is not None else is_target(key)):
            w = mod.weight
            mod.weight = torch.nn.Parameter(quantize_weight(w.detach(), mode, w.device, placement.dtype),
                                            requires_grad=False)
            del w
            release_freed_memory()
