"""The binary tokenizer: tokens equal the official autoencoders' (golden fixture made with the official code,
tests/fixtures/tokenizer-official), the packing and size policy, strict loading of a lone autoencoder file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bitdance_core.image_tokenizer import ImageTokenizer, load_autoencoder
from bitdance_core.models.autoencoder import to_uint8
from bitdance_core.tokenize import (
    TokenizeError,
    TokenizerSpec,
    load_rgb,
    pack_bits,
    plan_resize,
    probe_image,
    unpack_bits,
)

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "tokenizer-official"
T2I = FIXTURES / "reference-tiny-a"
IMAGENET = FIXTURES / "reference-imagenet-tiny-a"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "golden.safetensors")


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def t2i_tok() -> ImageTokenizer:
    return ImageTokenizer.from_file(T2I / "ae.safetensors", device="cpu", dtype="float32")


@pytest.mark.parametrize("ps", [1, 2])
def test_t2i_tokens_equal_official(t2i_tok, golden, ps):
    tokens = t2i_tok.tokenize(_png(GOLDEN / "t2i.png"), patch_size=ps)
    assert tokens.shape == (24, 16) and tokens.dtype == np.int8
    assert np.array_equal(tokens, golden[f"t2i.tokens.ps{ps}"].numpy())


def test_t2i_detokenize_equals_official_decoder(t2i_tok, golden):
    tokens = golden["t2i.tokens.ps2"].numpy()
    image = t2i_tok.detokenize(tokens, 64, 96, patch_size=2)
    expected = to_uint8(golden["t2i.decoded"])[0]
    assert image.shape == (64, 96, 3)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1  # float rounding at a level boundary


def test_imagenet_ae_pt_tokens_equal_official_qae(golden):
    tok = ImageTokenizer.from_file(IMAGENET / "ae_tiny_a.pt", device="cpu", dtype="float32")
    tokens = tok.tokenize(_png(GOLDEN / "imagenet.png"), patch_size=1)
    latent = golden["imagenet.latent"][0]  # (C, h, w)
    assert np.array_equal(tokens, latent.permute(1, 2, 0).reshape(-1, latent.shape[0]).numpy())


def test_class_model_encoder_attached_from_vae_file(golden):
    from bitdance_core.families.class_conditional.loader import load_class_model

    model = load_class_model(IMAGENET / "BitDance_tiny_a_4x.pt", "cpu", "float32",
                             model_args=IMAGENET / "model_args_4x.json")
    assert model.ae.encoder is None
    tok = ImageTokenizer.for_model(model, ((256, 256),))
    assert tok.spec.patch_size == 2 and tok.spec.sizes == ((256, 256),)
    tokens = tok.tokenize(_png(GOLDEN / "imagenet.png"))
    latent = golden["imagenet.latent"].float()
    assert np.array_equal(tokens, tok_order(latent, 2))


def tok_order(latent: torch.Tensor, ps: int) -> np.ndarray:
    """The official ``(h p1)(w p2) -> (h w p1 p2)`` order, written out with plain indexing."""
    _, c, h, w = latent.shape
    rows = []
    for bi in range(h // ps):
        for bj in range(w // ps):
            for i in range(ps):
                for j in range(ps):
                    rows.append(latent[0, :, bi * ps + i, bj * ps + j])
    return torch.stack(rows).to(torch.int8).numpy()


def test_pack_unpack_round_trip_and_checks():
    rng = np.random.default_rng(0)
    tokens = rng.choice(np.array([-1, 1], np.int8), size=(3, 13))  # 39 bits: one padding bit
    data = pack_bits(tokens)
    assert len(data) == 5
    assert np.array_equal(unpack_bits(data, 3, 13), tokens)
    spec = TokenizerSpec(16, 13)
    assert spec.check_tokens(data, [3, 13], 16, 48) == (3, 13)
    for bad in ([3, 12], [3], "3x13", [3.0, 13], [True, 13]):
        with pytest.raises(TokenizeError) as e:
            spec.check_tokens(data, bad, 16, 48)
        assert e.value.field == "token_shape" and e.value.allowed == [3, 13]
    with pytest.raises(TokenizeError) as e:
        spec.check_tokens(data[:-1], [3, 13], 16, 48)
    assert e.value.field == "tokens"
    with pytest.raises(TokenizeError, match="padding"):
        spec.check_tokens(data[:-1] + bytes([data[-1] | 1]), [3, 13], 16, 48)


def test_size_policy():
    served = TokenizerSpec(16, 16, 2, ((64, 64), (64, 96)))
    with pytest.raises(TokenizeError) as e:
        plan_resize(served, 100, 60, "refuse", 2)
    assert e.value.field == "image" and e.value.allowed == ["64x64", "96x64"]
    assert plan_resize(served, 96, 64, "refuse", 2) == (64, 96)
    assert plan_resize(served, 300, 200, "fit", 2) == (64, 96)  # nearest aspect ratio
    with pytest.raises(TokenizeError) as e:
        plan_resize(served, 96, 64, "stretch", 2)
    assert e.value.field == "resize"
    alone = TokenizerSpec(16, 16, 1, None, max_side=256)
    assert plan_resize(alone, 100, 60, "fit", 1) == (64, 96)
    assert plan_resize(alone, 1000, 500, "crop", 1) == (128, 256)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_probe_and_load_images():
    img = np.zeros((30, 50, 4), np.uint8)
    img[..., 3] = 0  # fully transparent: composited over white
    data = _encoded(img, "PNG")
    assert probe_image(data) == ("png", 50, 30)
    rgb = load_rgb(data, 32, 48, "fit")
    assert rgb.shape == (32, 48, 3) and (rgb == 255).all()
    assert probe_image(_encoded(img[..., :3], "WEBP"))[0] == "webp"
    with pytest.raises(TokenizeError) as e:
        probe_image(b"not an image")
    assert e.value.field == "image"
    with pytest.raises(TokenizeError, match="GIF"):
        probe_image(_encoded(img[..., 0], "GIF"))


def test_lone_autoencoder_file_is_strict(tmp_path):
    from safetensors.torch import save_file

    state = load_file(T2I / "ae.safetensors")
    del state["encoder.conv_in.weight"]
    save_file(state, tmp_path / "ae.safetensors")
    (tmp_path / "ae_config.json").write_text((T2I / "ae_config.json").read_text())
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        load_autoencoder(tmp_path / "ae.safetensors", device="cpu")
    (tmp_path / "ae_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="ae-config"):
        load_autoencoder(tmp_path / "ae.safetensors", device="cpu")
    cfg = json.loads((T2I / "ae_config.json").read_text())
    (tmp_path / "x.json").write_text(json.dumps({**cfg, "_class_name": "VQModel", "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        load_autoencoder(tmp_path / "ae.safetensors", tmp_path / "x.json", device="cpu")


def test_encoder_size_of_the_released_autoencoder_and_the_plan_counts_it():
    from bitdance_core.models.autoencoder import BinaryAutoencoder
    from bitdance_core.planning.memory_plan import encoder_bytes, plan_dir

    released = {"ch": 256, "out_ch": 3, "in_channels": 3, "num_res_blocks": 4, "z_channels": 32,
                "ch_mult": [1, 1, 2, 2, 4]}
    assert round(BinaryAutoencoder.encoder_parameters(released) / 1e6, 2) == 198.94  # spec: encoder 198.94 M
    tok = ImageTokenizer.from_file(T2I / "ae.safetensors", device="cpu", dtype="float32")
    base = plan_dir(T2I, 2**30, "float32")
    with_enc = plan_dir(T2I, 2**30, "float32", tokenizer_routes=True)
    by_module = dict(with_enc.weights_by_module)
    assert by_module["ae_encoder"] == tok.encoder_bytes
    assert with_enc.weights_bytes - base.weights_bytes == tok.encoder_bytes
    assert "no lm_head / AE encoder" in base.table() and "ae_encoder 0.00 GB" in with_enc.table()
    from bitdance_core.families.text_to_image.config import ModelConfig

    assert encoder_bytes(ModelConfig.from_dir(T2I), torch.bfloat16) * 2 == tok.encoder_bytes


def test_cli_tokenize_detokenize_round_trip(tmp_path, golden):
    from bitdance_core.cli import main

    ae = str(T2I / "ae.safetensors")
    npz, png = tmp_path / "t.npz", tmp_path / "x.png"
    assert main(["tokenize", str(GOLDEN / "t2i.png"), "--output", str(npz), "--model", ae, "--patch-size", "2"]) == 0
    with np.load(npz) as z:
        assert list(z["token_shape"]) == [24, 16] and int(z["patch_size"]) == 2
        assert np.array_equal(unpack_bits(z["tokens"].tobytes(), 24, 16), golden["t2i.tokens.ps2"].numpy())
    assert main(["detokenize", str(npz), "--output", str(png), "--model", ae]) == 0
    expected = to_uint8(golden["t2i.decoded"])[0]
    assert np.abs(_png(png).astype(int) - expected.astype(int)).max() <= 1
    # the demo model takes 64x64 only: refused unless asked to resize
    assert main(["tokenize", str(GOLDEN / "t2i.png"), "--output", str(npz)]) == 2
    assert main(["tokenize", str(GOLDEN / "t2i.png"), "--output", str(npz), "--resize", "crop"]) == 0


def test_demo_round_trip_psnr():
    """detokenize(tokenize(x)) on demo scenes (bench/bench_tokenizer.py measures 25.4 dB mean on 32): a wrong
    normalisation, token order or encoder/decoder pairing falls far below."""
    import argparse

    from bitdance_core.demo.data import make_dataset
    from bitdance_core.tokenize_cli import load_tokenizer

    tok = load_tokenizer(argparse.Namespace(model=None, ae_config=None, vae=None, model_args=None, device="cpu",
                                            dtype="float32"))
    images, _, _ = make_dataset(8, 7)
    scores = []
    for img in images:
        out = tok.detokenize(tok.tokenize(img), 64, 64)
        mse = np.mean((img.astype(np.float64) - out.astype(np.float64)) ** 2)
        scores.append(10 * np.log10(255.0**2 / mse))
    assert np.mean(scores) > 22.0, scores


def test_worker_runs_one_tokenizer_message_per_engine_step_while_busy():
    from bitdance_core.engine.protocol import Detokenize, Tokenize, TokenizerResult
    from bitdance_core.worker.tokenizer_worker import TokenizerHandler

    tok = ImageTokenizer.from_file(T2I / "ae.safetensors", device="cpu", dtype="float32")
    sent, busy = [], [True]
    handler = TokenizerHandler(tok, lambda make: sent.append(make()), lambda: busy[0])
    image = (GOLDEN / "t2i.png").read_bytes()
    assert handler(Tokenize("a", image, 64, 96)) and handler(Tokenize("b", image, 64, 96, patch_size=2))
    assert handler(Detokenize("c", b"\x00", (24, 16), 64, 96))  # wrong byte count
    assert not handler(object())
    assert sent == []  # queued, not run inside the inbox drain
    handler.tick()
    assert [m.request_id for m in sent] == ["a"]
    busy[0] = False
    handler.tick()
    assert [m.request_id for m in sent] == ["a", "b", "c"] and all(isinstance(m, TokenizerResult) for m in sent)
    assert sent[1].data["token_shape"] == [24, 16] and sent[1].data["patch_size"] == 2
    assert sent[2].error["field"] == "tokens" and sent[2].error["code"] == "invalid_request"
