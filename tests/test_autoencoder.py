from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bitdance_core.models.autoencoder import BinaryAutoencoder, Upsampler, depth_to_space

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"


@pytest.fixture(scope="module")
def ae_config() -> dict:
    return json.loads((FIXTURE / "ae_config.json").read_text())


@pytest.fixture(scope="module")
def ae_state() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "ae.safetensors")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "golden.safetensors")


@pytest.fixture(scope="module")
def ae(ae_config, ae_state) -> BinaryAutoencoder:
    model = BinaryAutoencoder(**ae_config)
    model.load_state_dict(ae_state, strict=True)
    return model.float().eval()


def test_config_attributes(ae):
    assert ae.downsample_factor == 16
    assert ae.z_channels == 16
    assert not ae.gan_decoder


def test_unknown_ddconfig_key_rejected(ae_config):
    bad = dict(ae_config["ddconfig"], attn_resolutions=[16])
    with pytest.raises(ValueError, match="attn_resolutions"):
        BinaryAutoencoder(bad)


def test_decode_matches_golden(ae, golden):
    with torch.no_grad():
        out = ae.decode(golden["ae.decode.in"])
    assert out.shape == (2, 3, 64, 96) and out.dtype == torch.float32
    assert (out - golden["ae.decode.out"]).abs().max().item() < 1e-4


def test_encode_matches_golden_exactly(ae, golden):
    with torch.no_grad():
        z = ae.encode(golden["ae.encode.in"])
    assert z.shape == (1, 16, 4, 6)
    assert torch.equal(z, golden["ae.encode.out"])


def test_strict_load_rejects_missing_and_unexpected_keys(ae_config, ae_state):
    missing = dict(ae_state)
    del missing["decoder.adaptive.2.gamma.weight"]
    with pytest.raises(RuntimeError, match="adaptive.2.gamma.weight"):
        BinaryAutoencoder(**ae_config).load_state_dict(missing, strict=True)
    extra = dict(ae_state)
    extra["decoder.up.0.upsample.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    with pytest.raises(RuntimeError, match="up.0.upsample"):
        BinaryAutoencoder(**ae_config).load_state_dict(extra, strict=True)


def test_without_encoder_loads_decoder_keys_only(ae_config, ae_state, golden):
    model = BinaryAutoencoder(**ae_config, with_encoder=False)
    model.load_state_dict({k: v for k, v in ae_state.items() if k.startswith("decoder.")}, strict=True)
    with torch.no_grad():
        out = model.decode(golden["ae.decode.in"])
    assert (out - golden["ae.decode.out"]).abs().max().item() < 1e-4
    with pytest.raises(RuntimeError):
        model.encode(golden["ae.encode.in"])


def test_depth_to_space_is_dcr_not_pixel_shuffle():
    c, h, w = 3, 2, 2
    x = torch.arange(4 * c * h * w, dtype=torch.float32).view(1, 4 * c, h, w)
    out = depth_to_space(x, 2)
    assert out.shape == (1, c, 2 * h, 2 * w)
    for k in range(c):
        for y in range(h):
            for xx in range(w):
                for i in range(2):
                    for j in range(2):
                        assert out[0, k, 2 * y + i, 2 * xx + j] == x[0, (2 * i + j) * c + k, y, xx]
    assert not torch.equal(out, F.pixel_shuffle(x, 2))


def test_upsampler_uses_dcr_order():
    up = Upsampler(2)
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        assert torch.equal(up(x), depth_to_space(up.conv1(x), 2))


def test_gan_decoder_variant(ae_config, ae_state):
    model = BinaryAutoencoder(**dict(ae_config, gan_decoder=True), with_encoder=False).eval()
    assert model.decoder.conv_in.in_channels == 2 * model.z_channels
    plain = {k: v.shape for k, v in ae_state.items() if k.startswith("decoder.")}
    gan = {k: v.shape for k, v in model.state_dict().items()}
    assert gan.keys() == plain.keys()
    assert gan["decoder.conv_in.weight"] == (64, 32, 3, 3)
    z = torch.where(torch.randn(1, 16, 2, 2) > 0, 1.0, -1.0)
    with torch.no_grad():
        a = model.decode(z, generator=torch.Generator().manual_seed(3))
        b = model.decode(z, generator=torch.Generator().manual_seed(3))
        c = model.decode(z, generator=torch.Generator().manual_seed(4))
    assert a.shape == (1, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_quantize_ste_forward_and_gradient():
    h = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0], requires_grad=True)
    q = BinaryAutoencoder.quantize_ste(h)
    assert torch.equal(q, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0]))
    (q * torch.arange(5.0)).sum().backward()
    assert torch.equal(h.grad, torch.arange(5.0))


def test_runs_in_parameter_dtype(ae_config, ae_state, golden):
    model = BinaryAutoencoder(**ae_config, with_encoder=False)
    model.load_state_dict({k: v for k, v in ae_state.items() if k.startswith("decoder.")})
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model.decode(golden["ae.decode.in"][:1])  # float32 input is cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    assert (out.float() - golden["ae.decode.out"][:1]).abs().max().item() < 0.25
