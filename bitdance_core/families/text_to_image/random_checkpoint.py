"""Random BitDance checkpoints in the official directory layout (spec §2), for tests, benchmarks and sizing.

Presets (``PRESETS``):

* ``tiny``: the golden fixture's shapes (2-layer Qwen3, hidden 64; AE ch 32, 16x, 16 bits; MLP head, P = 4);
* ``tiny-16x`` / ``tiny-64x``: the same prior and AE with the released head layout (SwiGLU, 2 adaLN) and
  P = 16 / 64, 32-bit tokens;
* ``bench``: mid-size shapes for the CPU speed benchmark (a 512x512 image in about 10 s per pipeline);
* ``bench-mem``: ~120M parameters, mostly LLM, for the loading-memory benchmark;
* ``14b-64x`` / ``14b-16x``: the released BitDance-14B shapes (Qwen3-14B with vocab 151,988 / 151,940; AE ch 256,
  ch_mult [1,1,2,2,4], 4 res blocks, 32 bits; head Dh 5120, 6 SwiGLU blocks, 2 adaLN).

``write_checkpoint(preset, out_dir, seed)`` writes every file the official loader reads: ``config.json`` and
``generation_config.json``, the LLM weights in bfloat16 (one ``model.safetensors``, or shards with
``model.safetensors.index.json`` above ``max_shard_bytes``; ``lm_head.weight`` included), the tokenizer (a small
byte-level BPE built offline, with the chat, vision, ``<|res_n|>`` and ``<|query_i|>`` tokens),
``ae_config.json`` + ``ae.safetensors`` (encoder and decoder), ``vision_head_config.json`` +
``vision_head.safetensors`` and ``projector.safetensors`` in float32. The 14B presets work too but write about
37 GB (hours on a slow disk); to measure speed and memory on a GPU use ``build_random_model``, which builds the
modules directly on the device (no file, no CPU copy) in the requested dtype.

Weights come from one seeded ``torch.Generator`` in state-dict order (the global RNG is never touched): matrices
and convolutions ~ N(0, std) with std = 0.02 in the LLM (HF's ``initializer_range``) and 1/sqrt(fan_in) elsewhere,
norm scales 1, biases ~ N(0, 0.02), so activations stay finite at every size. The same seed writes the same
bytes on CPU; ``build_random_model`` on another device draws different (equally distributed) numbers.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...device import Placement, resolve
from ...models.random_init import random_tensor
from .config import LLMConfig, ModelConfig
from .loader import LoadedModel, build_modules, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 2**30
MAX_RES = 256  # <|res_1|> .. <|res_256|>: every latent side the position table covers

# A small English corpus for the offline BPE (the tokenizer only has to cover text; ids are looked up by string).
CORPUS = [
    "a photo of a red circle on a white background",
    "two blue squares and a green triangle at the top left",
    "a yellow cat sitting next to a brown dog in the garden",
    "an orange car parked in front of a purple house at night",
    "a black and white photograph of a city street with people walking",
    "three pink flowers in a glass vase on a wooden table",
    "a bowl of fruit with apples, bananas and grapes",
    "the bottom right corner shows a small bird flying over the sea",
    "a painting of mountains and a lake under a cloudy sky at sunset",
    "a person riding a bicycle, a bus, a train, an airplane, a boat",
    "a laptop, a keyboard, a mouse, a cell phone and a clock on a desk",
    "a giraffe, an elephant, a zebra, a horse, a sheep and a cow in a field",
    "a pizza, a sandwich, a hot dog, a donut and a cake on plates",
    "a teddy bear, a toothbrush, a hair drier, scissors and a book",
    "a close-up of a broccoli and a carrot; 4k, highly detailed, 3D render",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?\"'()[]{}<>|/\\-_+=*&^%$#@~`",
]


@dataclass(frozen=True)
class Preset:
    name: str
    llm: dict[str, Any]  # HF Qwen3 config.json fields (vocab_size: None = the tokenizer's length)
    ae: dict[str, Any]  # ae_config.json
    head: dict[str, Any]  # vision_head_config.json
    description: str = ""
    bpe_vocab_size: int = 512
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def parallel_num(self) -> int:
        return int(self.head["parallel_num"])


def qwen3_config(hidden, inter, layers, heads, kv_heads, head_dim, vocab=None, max_pos=40960) -> dict[str, Any]:
    """An HF Qwen3 ``config.json`` of these shapes (the released models' other settings)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": max_pos,
        "max_window_layers": layers,
        "model_type": "qwen3",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def _ae(ch, ch_mult, num_res_blocks, z) -> dict[str, Any]:
    return {
        "gan_decoder": False,
        "ddconfig": {"double_z": False, "z_channels": z, "in_channels": 3, "out_ch": 3, "ch": ch,
                     "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks},
    }


def head_config(c, cond, dh, depth, adaln, p, swiglu, p_mean=-0.8, p_std=0.8, diff_batch_mul=1) -> dict[str, Any]:
    """A ``vision_head_config.json`` (the training-only keys included, as the released files have them)."""
    return {
        "ch_target": c, "ch_cond": cond, "ch_latent": dh, "depth_latent": depth, "depth_adanln": adaln,
        "grad_checkpointing": False, "time_shift": 1.0, "time_schedule": "logit_normal", "P_mean": p_mean,
        "P_std": p_std, "parallel_num": p, "diff_batch_mul": diff_batch_mul, "use_swiglu": swiglu,
    }


_TINY_LLM = qwen3_config(64, 128, 2, 4, 2, 16, max_pos=4096)
_14B_LLM = dict(hidden=5120, inter=17408, layers=40, heads=40, kv_heads=8, head_dim=128)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", _TINY_LLM, _ae(32, [1, 1, 2, 2, 2], 1, 16), head_config(16, 64, 128, 2, 1, 4, False),
               "the golden fixture's shapes: 2-layer Qwen3 (hidden 64), AE ch 32 16x 16 bits, MLP head, P=4"),
        Preset("tiny-16x", _TINY_LLM, _ae(32, [1, 1, 2, 2, 2], 1, 32), head_config(32, 64, 128, 2, 2, 16, True),
               "tiny prior and AE, 32-bit tokens, SwiGLU head with 2 adaLN, P=16 (the 16x layout)"),
        Preset("tiny-64x", _TINY_LLM, _ae(32, [1, 1, 2, 2, 2], 1, 32), head_config(32, 64, 128, 2, 2, 64, True),
               "tiny prior and AE, 32-bit tokens, SwiGLU head with 2 adaLN, P=64 (the 64x layout)"),
        Preset("bench", qwen3_config(256, 768, 4, 4, 2, 64, max_pos=8192), _ae(32, [1, 1, 2, 2, 4], 1, 32),
               head_config(32, 256, 256, 2, 1, 16, True),
               "mid-size shapes for the CPU benchmark: 4-layer Qwen3 (hidden 256), AE ch 32, SwiGLU head Dh 256, "
               "P=16"),
        Preset("bench-mem", qwen3_config(1024, 3072, 8, 16, 8, 64, max_pos=8192), _ae(64, [1, 1, 2, 2, 4], 2, 32),
               head_config(32, 1024, 512, 2, 1, 16, True),
               "for the loading-memory benchmark: ~120M parameters, most in the LLM (290 MB on disk, 460 MB kept "
               "in float32)"),
        Preset("14b-64x", qwen3_config(**_14B_LLM, vocab=151988), _ae(256, [1, 1, 2, 2, 4], 4, 32),
               head_config(32, 5120, 5120, 6, 2, 64, True),
               "BitDance-14B-64x shapes (Qwen3-14B, vocab 151,988; about 17 B parameters: ~37 GB on disk)"),
        Preset("14b-16x", qwen3_config(**_14B_LLM, vocab=151940), _ae(256, [1, 1, 2, 2, 4], 4, 32),
               head_config(32, 5120, 5120, 6, 2, 16, True),
               "BitDance-14B-16x shapes (Qwen3-14B, vocab 151,940; about 17 B parameters: ~37 GB on disk)"),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


# ---- tokenizer ------------------------------------------------------------------------------------------------


def write_tokenizer(preset: Preset, out_dir: str | Path) -> int:
    """Build the preset's tokenizer offline into ``out_dir``; returns its length."""
    from .tokenizer_build import build_tokenizer

    return build_tokenizer(out_dir, CORPUS, bpe_vocab_size=preset.bpe_vocab_size, max_res=MAX_RES,
                           num_query=preset.parallel_num - 1)


def _hf_config(preset: Preset, tokenizer_len: int) -> dict[str, Any]:
    cfg = dict(preset.llm)
    vocab = cfg.get("vocab_size")
    if vocab is None:
        cfg["vocab_size"] = tokenizer_len
    elif vocab < tokenizer_len:
        raise ValueError(f"preset {preset.name}: vocab_size {vocab} < tokenizer length {tokenizer_len}")
    return cfg


def model_config(preset: Preset, tokenizer_len: int, name: str | None = None) -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig.from_hf_dict(_hf_config(preset, tokenizer_len)),
        ae_ddconfig=dict(preset.ae["ddconfig"]),
        gan_decoder=bool(preset.ae.get("gan_decoder", False)),
        head=dict(preset.head),
        name=name or f"random-{preset.name}",
    )


# ---- random tensors -------------------------------------------------------------------------------------------


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def _fill(module: nn.Module, llm: bool, gen: torch.Generator, placement: Placement) -> None:
    """Replace every (meta) parameter with a random tensor on the placement, one tensor at a time."""
    state = {k: random_tensor(k, s, llm, gen, placement.dtype, placement.device)
             for k, s in _shapes(module).items()}
    module.load_state_dict(state, strict=True, assign=True)
    module.eval().requires_grad_(False)


def build_random_model(preset: str | Preset, device: str | None = None, dtype: str | None = None,
                       seed: int = 0) -> Any:
    """A ``LoadedModel`` with random weights built directly on ``device`` (no files, no CPU copy).

    The tokenizer is built offline in a temporary directory (loaded into memory, then deleted). Only what
    text-to-image uses is built (no ``lm_head``, no AE encoder), as ``load_model`` does.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    placement = resolve(device, dtype)
    with tempfile.TemporaryDirectory(prefix="bitdance-tok-") as tmp:
        n_tok = write_tokenizer(p, tmp)
        tokenizer = load_tokenizer(tmp)
    config = model_config(p, n_tok)
    llm, head, projector, ae = build_modules(config, with_encoder=False)
    gen = torch.Generator(device=placement.device).manual_seed(seed)
    _fill(llm, True, gen, placement)
    for m in (head, projector, ae):
        _fill(m, False, gen, placement)
    n_params = sum(t.numel() for m in (llm, head, projector, ae) for t in m.parameters())
    logger.info("random %s: %.1fM parameters on %s (%s)", p.name, n_params / 1e6, placement.device, placement.dtype)
    return LoadedModel(config, placement, llm, head, projector, ae, tokenizer)


# ---- writing --------------------------------------------------------------------------------------------------


def _shard_plan(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        n = math.prod(s) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _tensors(shapes: dict[str, tuple[int, ...]], keys: list[str], llm: bool, gen: torch.Generator,
             dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for k in keys:
        yield k, random_tensor(k, shapes[k], llm, gen, dtype, torch.device("cpu"))


def write_checkpoint(preset: str | Preset, out_dir: str | Path, seed: int = 0, dtype: str | None = None, *,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a random checkpoint in the official layout to ``out_dir`` and return its path.

    LLM weights are stored in bfloat16 (as released), the other files in float32; ``dtype`` overrides both.
    The LLM is sharded (``model-0000i-of-0000n.safetensors`` + index) when larger than ``max_shard_bytes``.
    """
    from safetensors.torch import save_file

    p = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm_dtype = resolve("cpu", dtype or "bfloat16").dtype
    other_dtype = resolve("cpu", dtype or "float32").dtype
    n_tok = write_tokenizer(p, out)
    hf = _hf_config(p, n_tok)
    config = model_config(p, n_tok, name=out.resolve().name)
    llm, head, projector, ae = build_modules(config, with_encoder=True)
    gen = torch.Generator().manual_seed(seed)
    meta = {"format": "pt"}

    # LLM: model.* plus the (unused by T2I) lm_head, as a Qwen3ForCausalLM checkpoint holds them
    shapes = {f"model.{k}": s for k, s in _shapes(llm).items()}
    shapes["lm_head.weight"] = (config.llm.vocab_size, config.llm.hidden_size)
    shapes = dict(sorted(shapes.items()))
    itemsize = torch.empty((), dtype=llm_dtype).element_size()
    plan = _shard_plan(shapes, itemsize, max_shard_bytes)
    if len(plan) == 1:
        save_file(dict(_tensors(shapes, plan[0], True, gen, llm_dtype)), str(out / "model.safetensors"), meta)
    else:
        weight_map = {}
        for i, keys in enumerate(plan):
            name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            save_file(dict(_tensors(shapes, keys, True, gen, llm_dtype)), str(out / name), meta)
            weight_map.update({k: name for k in keys})
            logger.info("wrote %s (%d tensors)", name, len(keys))
        total = sum(math.prod(s) for s in shapes.values()) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf["torch_dtype"] = str(llm_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2) + "\n")

    for module, fname in ((ae, "ae.safetensors"), (head, "vision_head.safetensors"),
                          (projector, "projector.safetensors")):
        s = _shapes(module)
        save_file(dict(_tensors(s, list(s), False, gen, other_dtype)), str(out / fname), meta)
    (out / "ae_config.json").write_text(json.dumps(p.ae, indent=2) + "\n")
    (out / "vision_head_config.json").write_text(json.dumps(p.head, indent=2) + "\n")
    logger.info("random checkpoint %s (preset %s, seed %d) written to %s", config.name, p.name, seed, out)
    return out
