"""Random checkpoints in the official layout: presets, determinism, dtypes, sharding, the 14B shapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bitdance_core.families.text_to_image.config import ModelConfig
from bitdance_core.families.text_to_image.loader import build_modules, load_model
from bitdance_core.families.text_to_image.pipeline import BitDancePipeline
from bitdance_core.families.text_to_image.random_checkpoint import (
    PRESETS,
    build_random_model,
    get_preset,
    model_config,
    write_checkpoint,
)

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "ae_config.json", "ae.safetensors", "vision_head_config.json",
         "vision_head.safetensors", "projector.safetensors"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny", seed=3)


def _digest(d: Path) -> dict[str, str]:
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}


def _dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def test_tiny_layout_and_dtypes(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == sorted(FILES)
    assert _dtypes(tiny / "model.safetensors") == {"BF16"}
    for f in ("ae.safetensors", "vision_head.safetensors", "projector.safetensors"):
        assert _dtypes(tiny / f) == {"F32"}
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()  # noqa: SIM118
    with safe_open(str(tiny / "ae.safetensors"), "pt") as f:
        assert any(k.startswith("encoder.") for k in f.keys())  # noqa: SIM118
    cfg = ModelConfig.from_dir(tiny)
    fixture = ModelConfig.from_dir(Path(__file__).parent / "fixtures" / "reference-tiny-a")
    assert cfg.llm.hidden_size == fixture.llm.hidden_size and cfg.llm.num_layers == fixture.llm.num_layers
    assert cfg.ae_ddconfig["ch_mult"] == fixture.ae_ddconfig["ch_mult"] and cfg.z_channels == fixture.z_channels
    assert cfg.parallel_num == 4 and cfg.head["use_swiglu"] is False
    assert json.loads((tiny / "config.json").read_text())["model_type"] == "qwen3"


def test_tiny_loads_strictly_and_generates(tiny):
    pipe = BitDancePipeline.from_pretrained(tiny, device="cpu")
    assert pipe.model.llm.cfg.vocab_size == len(pipe.model.tokenizer)
    out = pipe("a red circle", 64, 64, steps=2, guidance_scale=3.0, seed=0)
    assert out.tokens.shape == (1, 16, 16)
    assert set(out.tokens.unique().tolist()) <= {-1, 1}
    img = np.asarray(out.images[0])
    assert img.shape == (64, 64, 3) and img.std() > 0


def test_same_seed_same_bytes_and_seeded_generator_only(tiny, tmp_path):
    state = torch.get_rng_state()
    again = write_checkpoint("tiny", tmp_path / "again", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert _digest(again) == _digest(tiny)
    other = write_checkpoint("tiny", tmp_path / "other", seed=4)
    d1, d2 = _digest(tiny), _digest(other)
    assert d1["model.safetensors"] != d2["model.safetensors"] and d1["ae.safetensors"] != d2["ae.safetensors"]
    assert d1["tokenizer.json"] == d2["tokenizer.json"]


def test_sharded_write_loads(tmp_path):
    d = write_checkpoint("tiny", tmp_path / "sharded", seed=3, max_shard_bytes=100_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((d / s).is_file() for s in shards) and not (d / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    m = load_model(d, device="cpu")
    ref = load_model(write_checkpoint("tiny", tmp_path / "single", seed=3), device="cpu")
    for (k, a), (_, b) in zip(m.llm.state_dict().items(), ref.llm.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("preset", ["tiny-16x", "tiny-64x"])
def test_variants(tmp_path, preset):
    d = write_checkpoint(preset, tmp_path / preset, seed=0)
    cfg = ModelConfig.from_dir(d)
    assert cfg.parallel_num == PRESETS[preset].parallel_num and cfg.z_channels == 32 and cfg.head["use_swiglu"]
    tok = json.loads((d / "tokenizer.json").read_text())
    names = {t["content"] for t in tok["added_tokens"]}
    assert f"<|query_{cfg.parallel_num - 1}|>" in names and f"<|query_{cfg.parallel_num}|>" not in names
    assert "<|res_256|>" in names
    load_model(d, device="cpu")


def test_build_random_model_runs_the_pipeline():
    state = torch.get_rng_state()
    m = build_random_model("tiny", device="cpu", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert m.ae.encoder is None and m.placement.dtype == torch.float32
    pipe = BitDancePipeline(m)
    out = pipe("x", 64, 64, steps=2, guidance_scale=2.0, seed=0)
    assert np.asarray(out.images[0]).std() > 0
    with torch.no_grad():
        ids = torch.arange(10)[None]
        assert torch.isfinite(m.llm(m.llm.embed_tokens(ids), m.llm.plan_full(1, 10))).all()
        assert torch.isfinite(m.ae.decode(out.tokens.float().reshape(1, 4, 4, 16).permute(0, 3, 1, 2))).all()
    bf16 = build_random_model("tiny", device="cpu", dtype="bfloat16", seed=0)
    assert all(p.dtype == torch.bfloat16 for p in bf16.llm.parameters())


# spec §1 / §2: parameter counts of the released shapes (built on the meta device: no memory)
@pytest.mark.parametrize("preset,vocab,llm", [("14b-64x", 151_988, 13_990_661_120), ("14b-16x", 151_940,
                                                                                    13_990_415_360)])
def test_14b_shapes(preset, vocab, llm):
    p = get_preset(preset)
    cfg = model_config(p, tokenizer_len=900)
    assert cfg.llm.vocab_size == vocab and cfg.is_released_shape and cfg.parallel_num == int(preset[4:6])
    assert (cfg.llm.num_layers, cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim) == (40, 40, 8, 128)
    assert cfg.llm.intermediate_size == 17408
    l, h, pr, ae = build_modules(cfg, with_encoder=True)

    def count(m):
        return sum(t.numel() for t in m.parameters())

    assert count(l) == llm  # without lm_head
    assert count(h) == 1_758_464_032 and len(h.state_dict()) == 88
    assert count(ae) == 460_294_179 and len(ae.state_dict()) == 339
    assert count(ae.decoder) == 261_358_851
    assert count(pr) == 26_388_480


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")
