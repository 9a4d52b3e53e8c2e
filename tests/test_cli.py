"""The ``bitdance`` command: generate (files, seed, PNG parameters, naming), make-checkpoint, delegation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitdance_core import cli

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"
GEN = ["generate", "--model", str(FIXTURE), "--prompt", "a red circle", "--height", "64", "--width", "128",
       "--steps", "2", "--guidance", "3.0"]


def _seed(stdout: str) -> int:
    m = re.search(r"^seed: (\d+)$", stdout, re.M)
    assert m, stdout
    return int(m.group(1))


def test_generate_one_image(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert cli.main([*GEN, "--seed", "42", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert _seed(captured.out) == 42
    assert f"saved: {out}" in captured.out
    assert "generating" in captured.err  # the progress bar, on stderr
    img = Image.open(out)
    assert img.size == (128, 64) and img.mode == "RGB"
    params = json.loads(img.text["bitdance"])  # the server's format (bitdance_core/png_metadata.py)
    assert params["prompt"] == "a red circle" and params["seed"] == 42 and params["steps"] == 2
    assert params["guidance_scale"] == 3.0 and params["model"] == FIXTURE.name
    assert "Seed: 42" in img.text["parameters"] and "Size: 128x64" in img.text["parameters"]
    assert not any(str(tmp_path) in v or "/" in str(v) for v in params.values() if isinstance(v, str))
    assert (params["width"], params["height"]) == (128, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_generate_matches_pipeline(tmp_path, capsys):
    from bitdance_core.pipeline import BitDancePipeline

    out = tmp_path / "x.png"
    assert cli.main([*GEN, "--seed", "7", "--output", str(out), "--no-progress"]) == 0
    assert "generating" not in capsys.readouterr().err
    ref = BitDancePipeline.from_pretrained(FIXTURE, device="cpu")("a red circle", 64, 128, steps=2,
                                                                   guidance_scale=3.0, seed=7)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref.images[0]))


def test_num_images_naming_and_random_seed(tmp_path, capsys):
    out = tmp_path / "sub" / "many.png"
    assert cli.main([*GEN, "--num-images", "2", "--output", str(out)]) == 0
    seed = _seed(capsys.readouterr().out)
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["many-0.png", "many-1.png"]
    a, b = (Image.open(out.parent / n) for n in names)
    assert json.loads(a.text["bitdance"])["index"] == 0 and json.loads(b.text["bitdance"])["index"] == 1
    assert json.loads(a.text["bitdance"])["seed"] == seed
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    # the printed seed reproduces the run
    again = tmp_path / "again.png"
    assert cli.main([*GEN, "--num-images", "2", "--seed", str(seed), "--output", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again-1.png")), np.asarray(b))


def test_output_paths():
    assert cli.output_paths("a/b.png", 1) == [Path("a/b.png")]
    assert cli.output_paths("a/b.png", 3) == [Path("a/b-0.png"), Path("a/b-1.png"), Path("a/b-2.png")]
    assert cli.output_paths("out", 1) == [Path("out.png")]


def test_bad_size_is_a_clear_error(tmp_path, capsys):
    assert cli.main([*GEN[:3], "--prompt", "x", "--height", "48", "--width", "64", "--output",
                     str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "height=48" in err and "multiple of 32" in err
    assert not (tmp_path / "x.png").exists()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--output",
                     str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_model(tmp_path, capsys, monkeypatch):
    import bitdance_core

    monkeypatch.setattr(bitdance_core, "default_model_dir", lambda: str(tmp_path / "assets" / "demo"))
    assert cli.main(["generate", "--prompt", "x", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no embedded demo model" in err and "--model" in err


def test_make_checkpoint_then_generate(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert cli.main(["make-checkpoint", "--preset", "tiny", "--output", str(ck), "--seed", "1"]) == 0
    assert str(ck) in capsys.readouterr().out
    assert (ck / "model.safetensors").is_file() and (ck / "tokenizer.json").is_file()
    out = tmp_path / "t.png"
    # no size, steps or guidance given: the checkpoint's serving defaults (serving_config.json here)
    (ck / "serving_config.json").write_text(json.dumps({"default_size": [64, 32], "default_steps": 3,
                                                        "default_guidance": 2.5}))
    assert cli.main(["generate", "--model", str(ck), "--prompt", "a blue square", "--seed", "3",
                     "--output", str(out), "--no-progress"]) == 0
    assert Image.open(out).size == (32, 64)
    params = json.loads(Image.open(out).text["bitdance"])
    assert params["model"] == "ck" and params["steps"] == 3 and params["guidance_scale"] == 2.5


def test_make_checkpoint_unknown_preset(tmp_path, capsys):
    assert cli.main(["make-checkpoint", "--preset", "huge", "--output", str(tmp_path / "x")]) == 2
    assert "tiny" in capsys.readouterr().err


@pytest.mark.parametrize("command,module,func", [("serve", "server.cli", "serve_main"),
                                                 ("train-demo", "bitdance_core.demo.train", "main"),
                                                 ("eval-demo", "bitdance_core.demo.evaluate", "main")])
def test_delegation(monkeypatch, command, module, func):
    seen = []
    fake = types.ModuleType(module)
    setattr(fake, func, lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command, "--port", "1", "--help"]) == 0
    assert seen == [["--port", "1", "--help"]]


def test_console_script_help_is_torch_free():
    code = "import sys; from bitdance_core import cli; sys.argv = ['bitdance', '--help']\n" \
           "try:\n    cli.main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for word in ("generate", "make-checkpoint", "serve", "train-demo", "eval-demo"):
        assert word in r.stdout
