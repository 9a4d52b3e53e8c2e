"""Diffusers-format checkpoints (issue 18 item 1): ``make-checkpoint --layout diffusers`` of both families loads
with the official layout's strictness and gives the official-layout twin's images bit for bit."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_core.cli import main as cli_main
from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.families.class_conditional.loader import load_class_model
from bitdance_core.families.text_to_image.config import ModelConfig
from bitdance_core.families.text_to_image.loader import load_model
from bitdance_core.loading import diffusers_layout as dl
from bitdance_core.loading.io import CheckpointError
from bitdance_core.planning.memory_plan import plan_dir

SEED = 3
W = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Path, Path]:
    """(official, diffusers) text-to-image directories of preset tiny with the same seed, through the CLI."""
    root = tmp_path_factory.mktemp("t2i")
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--output", str(root / "off"), "--seed", str(SEED)]) == 0
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--output", str(root / "dif"), "--seed", str(SEED),
                     "--layout", "diffusers"]) == 0
    return root / "off", root / "dif"


@pytest.fixture(scope="module")
def class_twins(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cls")
    assert cli_main(["make-checkpoint", "--preset", "imagenet-tiny", "--output", str(root / "off"),
                     "--seed", str(SEED)]) == 0
    assert cli_main(["make-checkpoint", "--preset", "imagenet-tiny", "--output", str(root / "dif"),
                     "--seed", str(SEED), "--layout", "diffusers"]) == 0
    return root / "off" / "BitDance_tiny_4x.pt", root / "dif"


def run(engine: Engine, req: GenerationRequest):
    engine.add_request(req)
    for _ in range(10_000):
        for ev in engine.step():
            if ev.kind in (EventKind.COMPLETED, EventKind.FAILED):
                assert ev.kind is EventKind.COMPLETED, ev.data
                return ev.data
    raise AssertionError("request did not finish")


T2I_SIDE = 64  # bit-for-bit does not depend on the size: the smallest square keeps it quick


def t2i_images(model, seed: int = 11) -> tuple[np.ndarray, torch.Tensor]:
    """Two images of one request through the engine (``model``: a directory or a loaded model)."""
    req = GenerationRequest("r", "a red fox in the snow", T2I_SIDE, T2I_SIDE, seed=seed, steps=3, guidance_scale=3.0,
                            num_images=2)
    model = load_model(model) if isinstance(model, Path) else model
    data = run(Engine(model, EngineConfig(max_batch_requests=2)), req)
    return data["images"], data["tokens"]


def test_layout_detection(twins, class_twins, tmp_path):
    off, dif = twins
    assert dl.checkpoint_layout(off) == dl.OFFICIAL
    assert dl.checkpoint_layout(dif) == dl.DIFFUSERS
    assert dl.checkpoint_layout(class_twins[0]) == dl.CLASS_PT
    assert dl.checkpoint_layout(class_twins[1]) == dl.CLASS_DIFFUSERS
    repo = tmp_path / "BitDance-ImageNet-diffusers"  # the repository root holds one folder per model
    shutil.copytree(class_twins[1], repo / "BitDance_B_4x")
    with pytest.raises(CheckpointError, match="several diffusers model folders .*BitDance_B_4x"):
        dl.checkpoint_layout(repo)


def test_t2i_same_images_bit_for_bit(twins):
    off, dif = twins
    a, b = load_model(off), load_model(dif)
    assert a.config.llm == b.config.llm and a.config.head == b.config.head
    assert a.config.ae_ddconfig == b.config.ae_ddconfig
    for x, y in ((a.llm, b.llm), (a.head, b.head), (a.projector, b.projector), (a.ae, b.ae)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    assert not any(k.startswith("lm_head") for k in b.llm.state_dict())  # the file holds it; it is not loaded
    assert "lm_head.weight" in load_file(dif / "text_encoder" / "model.safetensors")
    img_a, tok_a = t2i_images(a)
    img_b, tok_b = t2i_images(b)
    assert img_a.shape == (2, T2I_SIDE, T2I_SIDE, 3) and np.array_equal(img_a, img_b) and torch.equal(tok_a, tok_b)


def test_t2i_plan_and_config_read_the_diffusers_directory(twins):
    off, dif = twins
    assert ModelConfig.from_dir(dif).llm == ModelConfig.from_dir(off).llm
    a, b = plan_dir(off, 64 * 2**20), plan_dir(dif, 64 * 2**20)  # a small device: a short solve
    for key in ("weights_bytes", "kv_bytes_per_token_row", "kv_tokens_per_row", "max_concurrent_requests"):
        assert getattr(a, key) == getattr(b, key), key


def test_underscore_keys_are_dropped(twins, tmp_path):
    d = _copy(twins[1], tmp_path)
    for cfg in ("autoencoder", "diffusion_head", "projector"):
        _edit(d / cfg / "config.json", lambda c: c.update(_name_or_path="x", _anything={"a": 1}))
    _edit(d / "model_index.json", lambda c: c.update(_name_or_path="somewhere"))
    load_model(d)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _edit_weights(path: Path, fn) -> None:
    state = load_file(path)
    fn(state)
    save_file(state, path)


def _pop(key):
    return lambda d: d.pop(key)


T2I_ERRORS = [
    ("no model_index component", lambda d: _edit(d / "model_index.json", _pop("projector")),
     r"model_index.json: missing keys \['projector'\]"),
    ("unexpected model_index key", lambda d: _edit(d / "model_index.json", lambda c: c.update(scheduler=["a", "b"])),
     r"model_index.json: unexpected keys \['scheduler'\]"),
    ("another pipeline", lambda d: _edit(d / "model_index.json", lambda c: c.update(_class_name="FluxPipeline")),
     "_class_name 'FluxPipeline' is not 'BitDanceDiffusionPipeline'"),
    ("another text encoder", lambda d: _edit(d / "model_index.json",
                                             lambda c: c.update(text_encoder=["transformers", "LlamaForCausalLM"])),
     "component text_encoder is a LlamaForCausalLM, expected Qwen3ForCausalLM"),
    ("component not a pair", lambda d: _edit(d / "model_index.json", lambda c: c.update(autoencoder="x")),
     r"component autoencoder must be \[library, class\]"),
    ("ddconfig not an object", lambda d: _edit(d / "autoencoder" / "config.json", lambda c: c.update(ddconfig=[])),
     "autoencoder/config.json: ddconfig must be an object"),
    ("bad sizes", lambda d: _edit(d / "model_index.json", lambda c: c.update(supported_image_sizes=[[512]])),
     "supported_image_sizes must be a list of"),
    ("missing folder", lambda d: shutil.rmtree(d / "diffusion_head"), "missing component folder diffusion_head/"),
    ("missing config", lambda d: (d / "projector" / "config.json").unlink(), "missing file projector/config.json"),
    ("missing weights", lambda d: (d / "autoencoder" / W).unlink(), f"neither {W}"),
    ("missing LLM weights", lambda d: (d / "text_encoder" / "model.safetensors").unlink(),
     "neither model.safetensors"),
    ("missing tokenizer", lambda d: (d / "tokenizer" / "tokenizer.json").unlink(), "tokenizer.json"),
    ("missing head key", lambda d: _edit(d / "diffusion_head" / "config.json", _pop("ch_latent")),
     r"diffusion_head/config.json: missing keys \['ch_latent'\]"),
    ("unexpected head key", lambda d: _edit(d / "diffusion_head" / "config.json", lambda c: c.update(depth=3)),
     r"diffusion_head/config.json: unexpected keys \['depth'\]"),
    ("missing ddconfig", lambda d: _edit(d / "autoencoder" / "config.json", _pop("ddconfig")),
     r"autoencoder/config.json: missing keys \['ddconfig'\]"),
    ("unexpected ae key", lambda d: _edit(d / "autoencoder" / "config.json", lambda c: c.update(scale=0.18)),
     r"autoencoder/config.json: unexpected keys \['scale'\]"),
    ("unexpected ddconfig key", lambda d: _edit(d / "autoencoder" / "config.json",
                                                lambda c: c["ddconfig"].update(attn_resolutions=[])),
     r"autoencoder/config.json ddconfig: unexpected keys \['attn_resolutions'\]"),
    ("gan_decoder not bool", lambda d: _edit(d / "autoencoder" / "config.json", lambda c: c.update(gan_decoder="no")),
     "gan_decoder must be true or false"),
    ("missing projector key", lambda d: _edit(d / "projector" / "config.json", _pop("out_dim")),
     r"projector/config.json: missing keys \['out_dim'\]"),
    ("unexpected projector key", lambda d: _edit(d / "projector" / "config.json", lambda c: c.update(bias=False)),
     r"projector/config.json: unexpected keys \['bias'\]"),
    ("projector in_dim", lambda d: _edit(d / "projector" / "config.json", lambda c: c.update(in_dim=7)),
     "projector/config.json: in_dim=7 != autoencoder z_channels"),
    ("projector out_dim", lambda d: _edit(d / "projector" / "config.json", lambda c: c.update(out_dim=7)),
     "projector/config.json: out_dim=7 != text_encoder/config.json hidden_size"),
    ("projector act", lambda d: _edit(d / "projector" / "config.json", lambda c: c.update(hidden_act="relu")),
     "hidden_act 'relu' is not 'gelu_pytorch_tanh'"),
    ("head ch_cond", lambda d: _edit(d / "diffusion_head" / "config.json", lambda c: c.update(ch_cond=8)),
     "diffusion_head/config.json: ch_cond=8 != text_encoder/config.json hidden_size"),
    ("text encoder architecture", lambda d: _edit(d / "text_encoder" / "config.json",
                                                  lambda c: c.update(architectures=["LlamaForCausalLM"])),
     "text_encoder/config.json: architectures"),
    ("text encoder key", lambda d: _edit(d / "text_encoder" / "config.json", _pop("hidden_size")),
     "text_encoder/config.json: missing key 'hidden_size'"),
    ("missing tensor", lambda d: _edit_weights(d / "diffusion_head" / W, _pop("net.input_proj.weight")),
     "diffusion_head/: missing keys: net.input_proj.weight"),
    ("unexpected tensor", lambda d: _edit_weights(d / "projector" / W, lambda s: s.update(extra=torch.zeros(1))),
     "projector/: unexpected keys: extra"),
    ("wrong shape", lambda d: _edit_weights(d / "projector" / W, lambda s: s.update({"fc1.bias": torch.zeros(3)})),
     r"projector/diffusion_pytorch_model.safetensors: key fc1.bias has shape \(3,\)"),
    ("missing LLM tensor", lambda d: _edit_weights(d / "text_encoder" / "model.safetensors", _pop("model.norm.weight")),
     r"LLM weights \(text_encoder/model\*.safetensors\): missing keys: model.norm.weight"),
    ("wrong LLM shape", lambda d: _edit_weights(d / "text_encoder" / "model.safetensors",
                                                lambda s: s.update({"model.norm.weight": torch.zeros(3)})),
     r"text_encoder/model.safetensors: key model.norm.weight has shape \(3,\)"),
]


@pytest.mark.parametrize("name,edit,needle", T2I_ERRORS, ids=[e[0] for e in T2I_ERRORS])
def test_t2i_strictness_errors_name_the_culprit(twins, tmp_path, name, edit, needle):
    d = _copy(twins[1], tmp_path)
    edit(d)
    with pytest.raises(CheckpointError, match=needle):
        load_model(d)


# ---- class-conditional ---------------------------------------------------------------------------------------


def class_images(model, seed: int = 5) -> np.ndarray:
    req = GenerationRequest("c", "", 256, 256, seed=seed, steps=4, guidance_scale=3.0, num_images=2,
                            class_label=(1, 207), cfg_schedule="linear")
    return run(Engine(model, EngineConfig(max_batch_requests=2)), req)["images"]


@pytest.mark.slow  # two 256x256 class-conditional models (the only size): the CI gate runs it
def test_class_same_images_bit_for_bit(class_twins):
    off, dif = class_twins
    a, b = load_class_model(off, "cpu"), load_class_model(dif, "cpu")
    assert replace(a.config, name="x") == replace(b.config, name="x") and b.config.name == dif.name
    assert b.weights == "model" and b.vae_path.endswith("autoencoder")
    for x, y in ((a.transformer, b.transformer), (a.head, b.head), (a.ae, b.ae)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    img_a, img_b = class_images(a), class_images(b)
    assert img_a.shape == (2, 256, 256, 3) and np.array_equal(img_a, img_b)


def _tcfg(fn):
    return lambda d: _edit(d / "transformer" / "config.json", fn)


CLASS_ERRORS = [
    ("missing model_index", lambda d: (d / "model_index.json").unlink(),
     r"missing file model_index.json in diffusers directory .*/dif$"),
    ("another pipeline", lambda d: _edit(d / "model_index.json", lambda c: c.update(_class_name=["a", "DiTPipeline"])),
     "is not 'BitDanceImageNetPipeline'"),
    ("unexpected key", _tcfg(lambda c: c.update(hidden_size=3)), r"transformer/config.json: unexpected keys"),
    ("missing key", _tcfg(_pop("latent_dim")), r"transformer/config.json: missing keys \['latent_dim'\]"),
    ("bad parallel_num", _tcfg(lambda c: c.update(parallel_num="4")), "parallel_num must be a positive integer"),
    ("runtime_impl", _tcfg(lambda c: c.update(runtime_impl="model.py")), "runtime_impl 'model.py' does not fit"),
    ("source_key", _tcfg(lambda c: c.update(source_key="ema_model")), "source_key 'ema_model' is neither"),
    ("time_schedule", _tcfg(lambda c: c.update(time_schedule="cosine")), "time_schedule 'cosine'"),
    ("custom architecture sizes", _tcfg(_pop("n_head")), r"a custom one needs \['n_head'\]"),
    ("official architecture plus sizes", _tcfg(lambda c: c.update(architecture="BitDance-B")),
     "are set by the architecture BitDance-B"),
    ("wrong parallel_num", _tcfg(lambda c: c.update(parallel_num=16)), "query_token"),
    ("no transformer component", lambda d: _edit(d / "model_index.json", _pop("transformer")),
     r"model_index.json: missing keys \['transformer'\]"),
    ("bad resolution", _tcfg(lambda c: c.update(resolution=0)), "resolution must be a positive integer"),
    ("bad p_std", _tcfg(lambda c: c.update(p_std="1")), "p_std must be a number"),
    ("bad source_checkpoint", _tcfg(lambda c: c.update(source_checkpoint=3)), "source_checkpoint must be a string"),
    ("no ae ddconfig", lambda d: _edit(d / "autoencoder" / "config.json", _pop("ddconfig")),
     r"autoencoder/config.json: missing keys \['ddconfig'\]"),
    ("unexpected ddconfig key", lambda d: _edit(d / "autoencoder" / "config.json",
                                                lambda c: c["ddconfig"].update(dropout=0.0)),
     r"autoencoder/config.json ddconfig: unexpected keys \['dropout'\]"),
    ("bad num_codebooks", lambda d: _edit(d / "autoencoder" / "config.json", lambda c: c.update(num_codebooks=0)),
     "num_codebooks must be a positive integer"),
    ("no autoencoder at all", lambda d: shutil.rmtree(d / "autoencoder"), "no autoencoder: .* no autoencoder/ folder"),
    ("unexpected ae key", lambda d: _edit(d / "autoencoder" / "config.json", lambda c: c.update(scale=1)),
     r"autoencoder/config.json: unexpected keys \['scale'\]"),
    ("ddconfig mismatch", lambda d: _edit(d / "autoencoder" / "config.json", lambda c: c["ddconfig"].update(ch=64)),
     "autoencoder/config.json: ddconfig ch=64 does not match the weights"),
    ("missing transformer weights", lambda d: (d / "transformer" / W).unlink(), f"neither {W}"),
    ("missing tensor", lambda d: _edit_weights(d / "transformer" / W, _pop("emb_norm.weight")),
     r"transformer \[model\]: missing tensors: emb_norm.weight"),
    ("unexpected tensor", lambda d: _edit_weights(d / "transformer" / W, lambda s: s.update(extra=torch.zeros(1))),
     r"transformer \[model\]: unexpected tensors: extra"),
    ("wrong shape", lambda d: _edit_weights(d / "transformer" / W,
                                            lambda s: s.update({"head.net.final_layer.linear.bias": torch.zeros(3)})),
     r"tensor head.net.final_layer.linear.bias has shape \(3,\)"),
    ("missing ae tensor", lambda d: _edit_weights(d / "autoencoder" / W, _pop("decoder.conv_out.bias")),
     r"autoencoder: missing tensors: decoder.conv_out.bias"),
]


@pytest.mark.parametrize("name,edit,needle", CLASS_ERRORS, ids=[e[0] for e in CLASS_ERRORS])
def test_class_strictness_errors_name_the_culprit(class_twins, tmp_path, name, edit, needle):
    d = _copy(class_twins[1], tmp_path)
    edit(d)
    with pytest.raises(CheckpointError, match=needle):
        load_class_model(d, "cpu")


def test_class_folder_is_not_a_text_to_image_checkpoint(class_twins):
    with pytest.raises(CheckpointError, match="holds a class-conditional model"):
        load_model(class_twins[1])


def test_class_diffusers_refuses_vae_flag(class_twins):
    with pytest.raises(CheckpointError, match="brings its own autoencoder"):
        load_class_model(class_twins[1], "cpu", vae=class_twins[0].parent / "ae_d16c32.pt")


def test_class_autoencoder_from_vae_tensors_of_the_transformer(class_twins, tmp_path):
    """Without autoencoder/, the transformer file's vae.* tensors are the autoencoder (as a .pt's are)."""
    off, dif = class_twins
    d = _copy(dif, tmp_path)
    vae = load_file(d / "autoencoder" / W)
    _edit_weights(d / "transformer" / W, lambda s: s.update({f"vae.{k}": v for k, v in vae.items()}))
    shutil.rmtree(d / "autoencoder")
    a, b = load_class_model(off, "cpu"), load_class_model(d, "cpu")
    assert b.vae_path is None
    sa, sb = a.ae.state_dict(), b.ae.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
