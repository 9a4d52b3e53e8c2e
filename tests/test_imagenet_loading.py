"""Loading class-conditional checkpoints: weights-only with the Namespace allow-list, "ema" first, autoencoder
discovery, strict keys naming the tensor, architecture resolution order, and the official presets' sizes."""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from bitdance_core.families.class_conditional.config import PRESETS, RELEASED_DDCONFIG
from bitdance_core.families.class_conditional.heads import ClassHead
from bitdance_core.families.class_conditional.loader import find_vae, load_class_model
from bitdance_core.families.class_conditional.random_checkpoint import CLASS_PRESETS, write_class_checkpoint
from bitdance_core.families.class_conditional.resolve import from_file_name, resolve_config
from bitdance_core.families.class_conditional.transformer import ClassTransformer
from bitdance_core.loading.io import CheckpointError
from bitdance_core.models.autoencoder import BinaryAutoencoder

FIXTURE = Path(__file__).parent / "fixtures" / "reference-imagenet-tiny-a"
CKPT, ARGS, AE = FIXTURE / "BitDance_tiny_a_4x.pt", FIXTURE / "model_args_4x.json", FIXTURE / "ae_tiny_a.pt"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imnet")
    write_class_checkpoint("imagenet-tiny", d, seed=0)
    return d


def _copy(tmp_path: Path, obj) -> Path:
    p = tmp_path / "BitDance_tiny_a_4x.pt"
    torch.save(obj, p)
    shutil.copy(AE, tmp_path / "ae_tiny_a.pt")
    return p


def test_prefers_ema_over_model():
    m = load_class_model(CKPT, "cpu", model_args=ARGS)
    ck = torch.load(CKPT, weights_only=True)
    assert m.weights == "ema"
    assert torch.equal(m.transformer.layers[0].attention.wqkv.weight, ck["ema"]["layers.0.attention.wqkv.weight"])
    assert not torch.equal(ck["ema"]["layers.0.attention.wqkv.weight"], ck["model"]["layers.0.attention.wqkv.weight"])


def test_model_only_checkpoint_with_namespace_args(tiny_dir):
    m = load_class_model(tiny_dir / "BitDance_tiny_4x.pt", "cpu")  # args (a Namespace) describe the tiny sizes
    assert m.weights == "model" and m.config.n_head == 4 and m.config.parallel_num == 4
    assert m.config.sources["n_head"] == "checkpoint args"
    assert m.vae_path.endswith("ae_d16c32.pt")


def test_refuses_other_pickled_objects(tmp_path):
    ck = torch.load(CKPT, weights_only=True)
    p = _copy(tmp_path, {"ema": ck["ema"], "note": pathlib.PurePosixPath("/x")})
    with pytest.raises(CheckpointError, match="weights-only|argparse.Namespace"):
        load_class_model(p, "cpu", model_args=ARGS)


def test_unknown_heads_names_the_argument():
    with pytest.raises(CheckpointError, match="n_head.*--model-args"):
        load_class_model(CKPT, "cpu")


@pytest.mark.parametrize("edit, needle", [
    ("drop", "missing tensors: layers.1.ffn_norm.weight"),
    ("extra", "unexpected tensors: layers.9.bogus"),
    ("shape", "tensor pos_for_diff.weight has shape (255, 64), expected (256, 64)"),
    ("head", "missing tensors: head.net.final_layer.linear.bias"),
])
def test_strict_keys_name_the_tensor(tmp_path, edit, needle):
    sd = dict(torch.load(CKPT, weights_only=True)["ema"])
    if edit == "drop":
        del sd["layers.1.ffn_norm.weight"]
    elif edit == "extra":
        sd["layers.9.bogus"] = torch.zeros(1)
    elif edit == "shape":
        sd["pos_for_diff.weight"] = sd["pos_for_diff.weight"][:255]
    else:
        del sd["head.net.final_layer.linear.bias"]
    p = _copy(tmp_path, {"ema": sd})
    with pytest.raises(CheckpointError) as e:
        load_class_model(p, "cpu", model_args=ARGS)
    assert needle in str(e.value)


def test_vae_discovery(tmp_path):
    ck = torch.load(CKPT, weights_only=True)
    p = tmp_path / "BitDance_tiny_a_4x.pt"
    torch.save({"ema": ck["ema"]}, p)
    assert find_vae(p, None) is None  # none beside: the checkpoint's own vae.* tensors
    m = load_class_model(p, "cpu", model_args=ARGS)
    assert m.vae_path is None
    shutil.copy(AE, tmp_path / "ae_one.pt")
    assert find_vae(p, None).name == "ae_one.pt"
    shutil.copy(AE, tmp_path / "ae_two.pt")
    with pytest.raises(CheckpointError, match="several autoencoder files.*--vae"):
        find_vae(p, None)
    shutil.copy(AE, tmp_path / "ae_d16c32.pt")
    assert find_vae(p, None).name == "ae_d16c32.pt"
    assert find_vae(p, tmp_path / "ae_two.pt").name == "ae_two.pt"
    with pytest.raises(CheckpointError, match="--vae"):
        find_vae(p, tmp_path / "nope.pt")


def test_vae_file_overrides_and_is_strict(tmp_path):
    ck = torch.load(CKPT, weights_only=True)
    p = tmp_path / "BitDance_tiny_a_4x.pt"
    torch.save({"ema": ck["ema"]}, p)
    vae = dict(torch.load(AE, weights_only=True)["state_dict"])
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 1.0
    torch.save({"state_dict": vae}, tmp_path / "ae_d16c32.pt")
    m = load_class_model(p, "cpu", model_args=ARGS)
    assert torch.equal(m.ae.decoder.conv_out.bias, vae["decoder.conv_out.bias"])  # the file, not vae.*
    del vae["decoder.norm_out.weight"]
    torch.save({"state_dict": vae}, tmp_path / "ae_d16c32.pt")
    with pytest.raises(CheckpointError, match="ae_d16c32.pt: missing tensors: decoder.norm_out.weight"):
        load_class_model(p, "cpu", model_args=ARGS)


def _meta_state(preset: str):
    cfg = CLASS_PRESETS[preset].config()
    with torch.device("meta"):
        t = ClassTransformer(cfg)
        h = ClassHead(cfg.latent_dim, cfg.dim, cfg.diff_dim, cfg.diff_layers, cfg.diff_adanln_layers,
                      parallel=cfg.parallel_num > 1)
        ae = BinaryAutoencoder(dict(cfg.vae_ddconfig), with_encoder=True)
    state = {**t.state_dict(), **{f"head.{k}": v for k, v in h.state_dict().items()}}
    return state, ae.state_dict()


# Non-VAE parameters of the released models (spec §7.1, counted on the official classes) and the VAE's.
SIZES_M = {"imagenet-b-1x": 242.37, "imagenet-b-4x": 260.10, "imagenet-b-16x": 260.11, "imagenet-l-1x": 527.27,
           "imagenet-h-1x": 1007.96}


@pytest.mark.parametrize("preset", sorted(SIZES_M))
def test_official_presets_resolve_from_shapes_alone(preset):
    """An args-less file with an unrelated name: every field from the tensor shapes (n_head from the preset
    the dim and layer count identify), with the parameter counts of the released models."""
    state, vae = _meta_state(preset)
    assert sum(v.numel() for v in state.values()) / 1e6 == pytest.approx(SIZES_M[preset], abs=0.006)
    assert sum(v.numel() for v in vae.values()) / 1e6 == pytest.approx(460.29, abs=0.006)
    cfg = resolve_config(Path("weights.pt"), state, None, vae, "ae")
    want = CLASS_PRESETS[preset].config()
    assert cfg.as_dict() | {"name": ""} == want.as_dict() | {"name": "", "default_guidance": cfg.default_guidance}
    assert cfg.vae_ddconfig == RELEASED_DDCONFIG
    assert cfg.default_guidance == {"imagenet-b-1x": 3.2, "imagenet-b-4x": 3.9, "imagenet-b-16x": 6.1,
                                    "imagenet-l-1x": 4.0, "imagenet-h-1x": 4.55}[preset]


def test_resolution_order():
    assert from_file_name(Path("/x/BitDance_L_1x.pt")) == {**PRESETS["L"], "parallel_num": 1}
    assert from_file_name(Path("BitDance_B_16x.pt"))["parallel_num"] == 16
    assert from_file_name(Path("model.pt")) == {}
    state, vae = _meta_state("imagenet-b-4x")
    args = vars(argparse.Namespace(model="BitDance-B", parallel_num=4, cls_token_num=64, latent_dim=32))
    cfg = resolve_config(Path("BitDance_H_1x.pt"), state, args, vae, "ae")  # args beat the (wrong) file name
    assert cfg.dim == 768 and cfg.parallel_num == 4 and cfg.sources["dim"] == "checkpoint args"
    cfg = resolve_config(Path("BitDance_B_4x.pt"), state, None, vae, "ae")
    assert cfg.sources["n_head"] == "file name" and cfg.sources["cls_token_num"] == "tensor shapes"
    cfg = resolve_config(Path("BitDance_B_4x.pt"), state, {"model": "BitDance-B", "n_head": 6}, vae, "ae",
                         model_args=ARGS)  # the JSON beats args and the file name
    assert cfg.n_head == 4 and cfg.sources["n_head"].startswith("--model-args")


def test_parallel_mode_null_is_fine_for_1x_and_refused_where_it_matters(tmp_path):
    """A 1x model's arguments hold "parallel_mode": null (the 1x scripts have no such argument)."""
    doc = tmp_path / "args.json"
    doc.write_text(json.dumps({"args": {"parallel_mode": None}}))
    state, vae = _meta_state("imagenet-b-1x")
    cfg = resolve_config(Path("BitDance_B_1x.pt"), state, None, vae, "ae", model_args=doc)
    assert cfg.parallel_num == 1 and cfg.parallel_mode == "patch"
    state, vae = _meta_state("imagenet-b-4x")
    with pytest.raises(CheckpointError, match=r"parallel_mode null.*parallel_num=4.*'patch', 'standard'"):
        resolve_config(Path("BitDance_B_4x.pt"), state, None, vae, "ae", model_args=doc)
    doc.write_text(json.dumps({"args": {"parallel_mode": "standard"}}))  # given: taken as said
    assert resolve_config(Path("BitDance_B_4x.pt"), state, None, vae, "ae", model_args=doc).parallel_mode == "standard"
