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
    from bitdance_core.families.text_to_image.pipeline import BitDancePipeline

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
    assert cli.output_paths("a/b.jpg", 2) == [Path("a/b-0.jpg"), Path("a/b-1.jpg")]
    with pytest.raises(cli.CLIError, match=r"\.gif.*\.png, \.jpg, \.jpeg, \.webp"):
        cli.output_paths("b.gif", 1)


def test_output_suffix_picks_the_format(tmp_path, capsys):
    for name, fmt in (("x.jpg", "JPEG"), ("y.webp", "WEBP"), ("z.JPEG", "JPEG")):
        assert cli.main([*GEN, "--seed", "1", "--output", str(tmp_path / name), "--no-progress"]) == 0
        assert Image.open(tmp_path / name).format == fmt, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jpg", "y.webp", "z.JPEG"]  # not x.jpg.png
    assert cli.main([*GEN, "--output", str(tmp_path / "w.gif")]) == 2  # refused before the model loads
    assert "not an image format" in capsys.readouterr().err and not (tmp_path / "w.gif").exists()


@pytest.mark.slow  # two generations in a fresh interpreter: the CI gate runs it
def test_generate_applies_the_servers_cpu_thread_policy(tmp_path):
    """The CLI's threads, OpenMP wait policy and inter-op threads are the server's (one shared function), set
    before torch loads; --threads overrides the count."""
    code = f"""
import json, os, sys
from bitdance_core import cli
from bitdance_core.cpu_threads import usable_cpus
base = {GEN!r} + ["--no-progress", "--seed", "1"]
assert "torch" not in sys.modules
assert cli.main([*base, "--output", {str(tmp_path / "a.png")!r}]) == 0
import torch
first = (torch.get_num_threads(), torch.get_num_interop_threads(), os.environ.get("OMP_WAIT_POLICY"), usable_cpus())
assert cli.main([*base, "--threads", "1", "--output", {str(tmp_path / "b.png")!r}]) == 0
print(json.dumps([*first, torch.get_num_threads()]))
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OMP_", "MKL_"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    threads, interop, wait, usable, forced = json.loads(r.stdout.strip().splitlines()[-1])
    assert (threads, interop, wait, forced) == (usable, 1, "PASSIVE", 1)
    assert "no longer applies" not in r.stderr  # the wait policy was in place before torch loaded
    assert cli.main(["generate", "--prompt", "x", "--threads", "0", "--output", str(tmp_path / "c.png")]) == 2


def test_help_names_choices_and_describes_every_option():
    r = subprocess.run([sys.executable, "-m", "bitdance_core.cli", "generate", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert "Generate images in this process" in r.stdout and "{float32,bfloat16,float16}" in r.stdout
    assert "--threads N" in r.stdout and "OUT.jpg" in r.stdout
    parser = cli._build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            if action.option_strings and sub.add_help:
                assert action.help, (sub.prog, action.option_strings)
    from server.cli import build_parser

    serve = build_parser()
    assert "text-to-image only" not in serve.description and "class-conditional" in serve.description
    choices = {a.dest: a.choices for a in serve._actions}
    assert list(choices["quantize"]) == ["none", "int8", "fp8"] and "bfloat16" in choices["dtype"]
    assert list(choices["attention_backend"]) == ["auto", "sdpa", "xformers"]
    assert all(a.help for a in serve._actions)


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
