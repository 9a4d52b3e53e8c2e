from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bitdance_core.models.diffusion_head import DiffusionHead

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"
SMALL = dict(ch_target=32, ch_cond=64, ch_latent=256, depth_latent=6, depth_adanln=2, use_swiglu=True)


@pytest.fixture(scope="module")
def head_config() -> dict:
    return json.loads((FIXTURE / "vision_head_config.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "golden.safetensors")


@pytest.fixture(scope="module")
def head(head_config) -> DiffusionHead:
    model = DiffusionHead(**head_config)
    model.load_state_dict(load_file(FIXTURE / "vision_head.safetensors"), strict=True)
    return model.float().eval()  # .float(): a no-op for this fixture (stored f32), needed for bf16 weights


def _small_head(seed: int = 0, **overrides) -> DiffusionHead:
    torch.manual_seed(seed)
    model = DiffusionHead(**dict(SMALL, **overrides)).eval()
    with torch.no_grad():  # perturb every tensor so no term is trivially zero or symmetric
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_config_attributes(head, head_config):
    assert head.parallel_num == 4
    assert head.time_shift == 1.0
    assert head.ch_target == 16
    assert "net.time_embed.freqs" not in head.state_dict()


def test_matches_golden(head, golden):
    with torch.no_grad():
        out = head(golden["head.in.x"], golden["head.in.t"], golden["head.in.c"])
    assert out.dtype == torch.float32 and out.shape == (3, 4, 16)
    torch.testing.assert_close(out, golden["head.out"], atol=1e-5, rtol=0)


def test_condition_then_predict_equals_forward(head, golden):
    x, t, c = golden["head.in.x"], golden["head.in.t"], golden["head.in.c"]
    with torch.no_grad():
        cond = head.condition(c)
        assert cond.shape == (3, 4, 128)
        assert torch.equal(head.predict(x, t, cond), head(x, t, c))


def test_unknown_keys_rejected_training_keys_accepted(head_config):
    DiffusionHead(**head_config)  # has time_schedule, P_mean, P_std, diff_batch_mul, grad_checkpointing
    with pytest.raises(ValueError, match="bogus"):
        DiffusionHead(**dict(head_config, bogus=1))


def test_adaln_sharing_that_would_index_past_the_end_is_rejected():
    with pytest.raises(ValueError):
        DiffusionHead(**dict(SMALL, depth_adanln=4))


def test_swiglu_state_dict_matches_appendix_b_pattern():
    d, hidden, c, cond = 256, 384, 32, 64
    expected = {
        "net.time_embed.mlp.0.weight": (d, 256), "net.time_embed.mlp.0.bias": (d,),
        "net.time_embed.mlp.2.weight": (d, d), "net.time_embed.mlp.2.bias": (d,),
        "net.cond_embed.weight": (d, cond), "net.cond_embed.bias": (d,),
        "net.input_proj.weight": (d, c), "net.input_proj.bias": (d,),
        "net.final_layer.ada_ln_modulation.weight": (2 * d, d),
        "net.final_layer.ada_ln_modulation.bias": (2 * d,),
        "net.final_layer.linear.weight": (c, d), "net.final_layer.linear.bias": (c,),
    }  # fmt: skip
    for m in range(2):
        expected[f"net.ada_ln_blocks.{m}.weight"] = (6 * d, d)
        expected[f"net.ada_ln_blocks.{m}.bias"] = (6 * d,)
    for k in range(6):
        p = f"net.res_blocks.{k}."
        expected.update({
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.wqkv.weight": (3 * d, d), p + "attn.wqkv.bias": (3 * d,),
            p + "attn.wo.weight": (d, d), p + "attn.wo.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "w1.weight": (2 * hidden, d), p + "w1.bias": (2 * hidden,),
            p + "w2.weight": (d, hidden), p + "w2.bias": (d,),
        })  # fmt: skip
    with torch.device("meta"):
        model = DiffusionHead(**SMALL)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(expected) == 88
    assert got == expected


def _naive_forward(sd: dict[str, torch.Tensor], x, t, c, depth: int, n_adaln: int) -> torch.Tensor:
    """Independent, literal restatement of spec §5.1-5.2 (explicit softmax attention, SwiGLU)."""

    def lin(name, v):
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    d = sd["net.input_proj.weight"].shape[0]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    a = (1000 * t)[:, None] * freqs[None]
    temb = torch.cat([torch.cos(a), torch.sin(a)], -1)
    te = lin("net.time_embed.mlp.2", F.silu(lin("net.time_embed.mlp.0", temb)))
    y = F.silu(te[:, None] + lin("net.cond_embed", c))
    h = lin("net.input_proj", x)
    k_sw = depth // n_adaln
    for i in range(depth):
        p = f"net.res_blocks.{i}."
        s1, b1, g1, s2, b2, g2 = lin(f"net.ada_ln_blocks.{i // k_sw}", y).chunk(6, -1)
        n1 = F.layer_norm(h, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = lin(p + "attn.wqkv", n1 * (1 + s1) + b1)
        r, n, _ = qkv.shape
        q, k, v = (z.reshape(r, n, d // 128, 128).transpose(1, 2) for z in qkv.split(d, -1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), -1) @ v
        h = h + g1 * lin(p + "attn.wo", att.transpose(1, 2).reshape(r, n, d))
        n2 = F.layer_norm(h, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        u, gv = lin(p + "w1", n2 * (1 + s2) + b2).chunk(2, -1)
        h = h + g2 * lin(p + "w2", F.silu(u) * gv)
    sc, sh = lin("net.final_layer.ada_ln_modulation", y).chunk(2, -1)
    o = lin("net.final_layer.linear", F.layer_norm(h, (d,), eps=1e-6) * (1 + sc) + sh)
    return 2 * torch.sigmoid(o) - 1


def test_swiglu_multihead_matches_naive_restatement():
    model = _small_head()
    g = torch.Generator().manual_seed(1)
    x, t, c = (
        torch.randn(2, 16, 32, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 16, 64, generator=g),
    )
    with torch.no_grad():
        ref = _naive_forward(model.state_dict(), x, t, c, depth=6, n_adaln=2)
        out = model(x, t, c)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_shared_adaln_called_once_per_group():
    model = _small_head()
    calls = [0, 0]
    for m, lin in enumerate(model.net.ada_ln_blocks):
        lin.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    with torch.no_grad():
        model(torch.randn(1, 4, 32), torch.rand(1), torch.randn(1, 4, 64))
    assert calls == [1, 1]


def test_frequency_buffer_survives_dtype_cast_and_meta_build(head, golden):
    x, t, c = golden["head.in.x"], golden["head.in.t"], golden["head.in.c"]
    bf16 = DiffusionHead(**json.loads((FIXTURE / "vision_head_config.json").read_text()))
    bf16.load_state_dict(head.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    with torch.no_grad():
        out = bf16(x, t, c)
    assert out.dtype == torch.float32
    assert bf16.net.time_embed.freqs.dtype == torch.float32
    assert (out - golden["head.out"]).abs().max().item() < 0.05

    with torch.device("meta"):
        meta = DiffusionHead(**json.loads((FIXTURE / "vision_head_config.json").read_text()))
    meta.load_state_dict(head.state_dict(), strict=True, assign=True)
    with torch.no_grad():
        assert torch.equal(meta(x, t, c), head(x, t, c))
