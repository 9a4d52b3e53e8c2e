"""``bitdance make-checkpoint --preset imagenet-*`` and ``bitdance generate --model FILE.pt --class-label ...``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitdance_core import cli
from bitdance_core.families.class_conditional.pipeline import ClassConditionalPipeline

T2I = Path(__file__).parent / "fixtures" / "reference-tiny-a"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imnet-cli")
    assert cli.main(["make-checkpoint", "--preset", "imagenet-tiny", "--output", str(d)]) == 0
    assert sorted(p.name for p in d.iterdir()) == ["BitDance_tiny_4x.pt", "ae_d16c32.pt"]
    return d / "BitDance_tiny_4x.pt"


def test_several_labels_write_numbered_files(ckpt, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(ckpt), "--class-label", "207", "--class-label", "360", "--seed", "0",
            "--steps", "2", "--guidance", "4.0", "--cfg-schedule", "linear", "--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "seed: 0" in printed and f"saved: {tmp_path / 'out-1.png'}" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png"]
    want = ClassConditionalPipeline.from_checkpoint(ckpt, "cpu")([207, 360], seed=0, steps=2, guidance_scale=4.0)
    for i, label in enumerate((207, 360)):
        img = Image.open(tmp_path / f"out-{i}.png")
        assert img.size == (256, 256)
        assert np.array_equal(np.asarray(img.convert("RGB")), want.pixels[i].numpy())
        params = json.loads(img.text["bitdance"])  # the server's format
        assert params["class_label"] == label and params["cfg_schedule"] == "linear" and params["index"] == i
        assert params["prompt"] == ("golden retriever", "otter")[i] and params["steps"] == 2
        assert "model_dir" not in params and "model_path" not in params
        assert img.text["parameters"].startswith(params["prompt"] + "\nSteps: 2,")


def test_prompt_naming_a_class(ckpt, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "Goldfish", "--seed", "1", "--steps", "1",
                     "--cfg-schedule", "constant", "--output", str(out), "--no-progress"]) == 0
    assert json.loads(Image.open(out).text["bitdance"])["class_label"] == 1


@pytest.mark.parametrize("extra, needle", [
    (["--prompt", "a cat on a mat"], "not an ImageNet class name"),
    (["--class-label", "1000"], "0..999"),
    (["--class-label", "1", "--class-label", "2", "--num-images", "3"], "--num-images 3 differs"),
    (["--class-label", "1", "--height", "512"], "256x256"),
    ([], "--class-label"),
    (["--class-label", "1", "--quantize", "int8"], "unquantised"),
])
def test_errors(ckpt, tmp_path, capsys, extra, needle):
    argv = ["generate", "--model", str(ckpt), "--steps", "1", "--output", str(tmp_path / "x.png"), *extra]
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_class_label_on_a_text_to_image_model(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(T2I), "--class-label", "3", "--output", str(tmp_path / "x.png")]) == 2
    assert "class-conditional model" in capsys.readouterr().err


def test_unknown_preset_lists_the_imagenet_ones(tmp_path, capsys):
    assert cli.main(["make-checkpoint", "--preset", "imagenet-x", "--output", str(tmp_path)]) == 2
    assert "imagenet-b-4x" in capsys.readouterr().err


def test_generate_from_a_diffusers_folder_gives_the_pt_image(ckpt, tmp_path):
    """``bitdance generate --model <ImageNet diffusers folder>`` is the class-conditional path, and its image
    equals the one of the official ``.pt`` with the same weights."""
    folder = tmp_path / "diffusers"
    assert cli.main(["make-checkpoint", "--preset", "imagenet-tiny", "--layout", "diffusers",
                     "--output", str(folder)]) == 0
    outs = []
    for model, name in ((folder, "d.png"), (ckpt, "o.png")):
        argv = ["generate", "--model", str(model), "--class-label", "5", "--seed", "3", "--steps", "2",
                "--output", str(tmp_path / name), "--no-progress"]
        assert cli.main(argv) == 0
        outs.append(np.asarray(Image.open(tmp_path / name).convert("RGB")))
    assert np.array_equal(outs[0], outs[1])
