"""The size policy: the official 18 sizes for released shapes, the grid for other checkpoints, explicit lists,
and error messages that say what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitdance_core.families.text_to_image.config import ModelConfig
from bitdance_core.families.text_to_image.random_checkpoint import PRESETS, model_config
from bitdance_core.resolutions import OFFICIAL_SIZES, SizeError, policy_for

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"

# spec §4.1: (H, W) -> (AR steps at P=16, at P=64)
SPEC_TABLE = {
    (2048, 512): (256, 64),
    (1920, 512): (240, 60),
    (1536, 640): (240, 60),
    (1280, 768): (240, 60),
    (1152, 896): (252, 63),
    (1024, 1024): (256, 64),
    (896, 1152): (252, 63),
    (768, 1280): (240, 60),
    (640, 1536): (240, 60),
    (512, 1920): (240, 60),
    (512, 2048): (256, 64),
    (1024, 256): (64, 16),
    (896, 256): (56, 14),
    (640, 384): (60, 15),
    (512, 512): (64, 16),
    (384, 640): (60, 15),
    (256, 896): (56, 14),
    (256, 1024): (64, 16),
}


def _policy(cfg: ModelConfig, sizes=None):
    return policy_for(cfg.downsample, cfg.patch_side, cfg.is_released_shape, sizes)


@pytest.mark.parametrize("preset,col", [("14b-16x", 0), ("14b-64x", 1)])
def test_released_shapes_use_the_official_list(preset, col):
    cfg = model_config(PRESETS[preset], tokenizer_len=1000)
    assert cfg.is_released_shape and cfg.downsample == 16 and cfg.z_channels == 32
    pol = _policy(cfg)
    assert sorted(pol.allowed()) == sorted(SPEC_TABLE) and len(OFFICIAL_SIZES) == 18
    for (h, w), steps in SPEC_TABLE.items():
        assert pol.ar_steps(h, w) == steps[col]
        assert pol.grid(h, w) == (h // 16, w // 16)


def test_released_shapes_reject_others_listing_the_allowed():
    pol = _policy(model_config(PRESETS["14b-64x"], tokenizer_len=1000))
    for h, w in [(1024, 512), (768, 768), (1024, 1040), (2048, 2048)]:
        with pytest.raises(SizeError) as e:
            pol.check(h, w)
        msg = str(e.value)
        assert f"{w}x{h}" in msg and "allowed" in msg
        assert all(f"{ww}x{hh}" in msg for hh, ww in OFFICIAL_SIZES)


def test_other_checkpoints_use_the_grid():
    cfg = ModelConfig.from_dir(FIXTURE)
    assert not cfg.is_released_shape
    pol = _policy(cfg)
    assert pol.unit == 32  # 16x down-sampling x patch side 2
    for h, w in [(32, 32), (64, 128), (128, 64), (96, 4096), (4096, 4096)]:
        pol.check(h, w)
    assert pol.grid(64, 128) == (4, 8) and pol.ar_steps(64, 128) == 8
    allowed = pol.allowed()
    assert allowed[0] == (32, 32) and (4096, 4096) in allowed and len(allowed) == 128 * 128
    for h, w, bad in [(48, 64, "height=48"), (64, 80, "width=80"), (0, 64, "height=0"), (4128, 64, "height=4128")]:
        with pytest.raises(SizeError, match=bad) as e:
            pol.check(h, w)
        assert "multiple of 32" in str(e.value) and "between 32 and 4096" in str(e.value)


def test_grid_unit_follows_patch_side():
    cfg = model_config(PRESETS["tiny-64x"], tokenizer_len=1000)
    pol = _policy(cfg)
    assert pol.unit == 16 * 8
    pol.check(128, 256)
    with pytest.raises(SizeError, match="multiple of 128"):
        pol.check(64, 128)


def test_explicit_list_overrides_both():
    tiny = ModelConfig.from_dir(FIXTURE)
    pol = _policy(tiny, sizes=[(64, 64), (64, 128)])
    pol.check(64, 128)
    with pytest.raises(SizeError, match="128x64, 64x64|64x64, 128x64"):
        pol.check(128, 128)
    released = model_config(PRESETS["14b-16x"], tokenizer_len=1000)
    pol = _policy(released, sizes=[(1024, 1024)])
    assert pol.allowed() == [(1024, 1024)]
    with pytest.raises(SizeError):
        pol.check(512, 512)


def test_max_side_caps_the_grid():
    cfg = ModelConfig.from_dir(FIXTURE)
    pol = policy_for(cfg.downsample, cfg.patch_side, False, max_side_px=128)
    assert pol.allowed()[-1] == (128, 128) and len(pol.allowed()) == 16
    with pytest.raises(SizeError, match="between 32 and 128"):
        pol.check(160, 64)


def test_pipeline_rejects_bad_size_before_work():
    from bitdance_core.families.text_to_image.pipeline import BitDancePipeline

    pipe = BitDancePipeline.from_pretrained(FIXTURE, device="cpu")
    with pytest.raises(SizeError, match="multiple of 32"):
        pipe("x", 48, 64, steps=1)
    assert BitDancePipeline(pipe.model, sizes=[(64, 64)]).sizes.allowed() == [(64, 64)]
