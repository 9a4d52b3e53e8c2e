"""The shipped demo checkpoint: official layout, strict loading, and generations the scorer accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitdance_core import default_model_dir
from bitdance_core.demo import data
from bitdance_core.demo.score import score
from bitdance_core.engine.serving_config import ServingConfig

DEMO = Path(default_model_dir())
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "ae_config.json", "ae.safetensors", "vision_head_config.json", "vision_head.safetensors",
         "projector.safetensors")

# (caption, seed): fixed requests that the shipped model draws correctly at the default settings. Two hard ones
# cover everything the scorer checks (colour, shape, position, two objects at once): an easy case such as
# "a red circle" is implied by either, and each case costs a full 20-step generation.
CASES = [
    ("a blue triangle in the top left", 1),
    ("a purple square and a yellow triangle", 0),
]


def test_layout_and_size():
    for name in FILES:
        assert (DEMO / name).is_file(), name
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total <= 20 * 2**20
    ae = json.loads((DEMO / "ae_config.json").read_text())
    assert ae["gan_decoder"] is False and ae["ddconfig"]["z_channels"] >= 16


@pytest.fixture(scope="module")
def pipe():
    from bitdance_core.families.text_to_image.pipeline import BitDancePipeline

    return BitDancePipeline.from_pretrained(DEMO, device="cpu")


def test_loads_with_the_project_loader(pipe):
    cfg = pipe.config
    assert cfg.parallel_num in (1, 4) and cfg.downsample == 8
    assert pipe.sizes.grid(64, 64) == (8, 8)


@pytest.mark.parametrize(("caption", "seed"), CASES)
def test_generation_is_recognised(pipe, caption, seed):
    scene = next(s for s in data.caption_split()[0] + data.caption_split()[1] if s.caption == caption)
    serving = ServingConfig.for_model(pipe.config)
    assert (serving.default_steps, serving.default_guidance) == (20, 6.0)
    out = pipe(caption, 64, 64, steps=serving.default_steps, guidance_scale=serving.default_guidance, seed=seed)
    assert out.images[0].size == (64, 64)
    result = score(out.images[0], scene)
    assert result.all, (caption, seed, result)
