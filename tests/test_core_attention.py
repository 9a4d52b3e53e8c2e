"""Attention backends agree with each other and with a plain softmax reference; forcing works and is undone."""

from __future__ import annotations

import math

import pytest
import torch

from bitdance_core import attention as attn
from bitdance_core.models.diffusion_head import DiffusionHead

AVAILABLE = ["sdpa"] + (["xformers"] if attn.xformers_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    attn.set_backend(None)


def _qkv(b=2, lq=5, lk=9, h=4, hkv=2, d=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, hkv, d, generator=g)
    v = torch.randn(b, lk, hkv, d, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _reference(q, k, v, mask=None, causal=False):
    h, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2).float()
    v = v.repeat_interleave(h // hkv, dim=2).float()
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) / math.sqrt(q.shape[-1])
    lq, lk = q.shape[1], k.shape[1]
    if causal:
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_backend_matches_reference(backend, hkv):
    attn.set_backend(backend)
    q, k, v = _qkv(hkv=hkv, device=DEVICE)
    torch.testing.assert_close(attn.attention(q, k, v), _reference(q, k, v), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        attn.attention(q, k, v, causal=True), _reference(q, k, v, causal=True), atol=1e-5, rtol=1e-4
    )
    mask = torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    mask = mask.to(DEVICE)
    torch.testing.assert_close(attn.attention(q, k, v, mask=mask), _reference(q, k, v, mask=mask), atol=1e-5, rtol=1e-4)


def test_all_available_backends_agree_on_a_head():
    cfg = dict(ch_target=16, ch_cond=64, ch_latent=256, depth_latent=2, depth_adanln=1, use_swiglu=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = DiffusionHead(**cfg).to(DEVICE).eval()
    g = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(3, 4, 16, generator=g), torch.rand(3, generator=g), torch.randn(3, 4, 64, generator=g)
    x, t, c = x.to(DEVICE), t.to(DEVICE), c.to(DEVICE)
    outs = {}
    for backend in AVAILABLE:
        attn.set_backend(backend)
        with torch.no_grad():
            outs[backend] = head(x, t, c)
    for backend, out in outs.items():
        torch.testing.assert_close(out, outs["sdpa"], atol=1e-5, rtol=1e-4, msg=f"{backend} vs sdpa")


def test_set_backend_validates_and_resets():
    with pytest.raises(ValueError, match="sdpa"):
        attn.set_backend("flash")
    attn.set_backend("sdpa")
    assert attn.resolve_backend(torch.device("cpu")) == "sdpa"
    attn.set_backend(None)
    assert attn.resolve_backend(torch.device("cpu")) == "sdpa"  # auto: SDPA off CUDA
    if not attn.xformers_available():
        with pytest.raises(RuntimeError, match="not installed"):
            attn.set_backend("xformers")


@pytest.mark.skipif(not torch.cuda.is_available() or not attn.xformers_available(), reason="needs CUDA + xformers")
def test_auto_uses_xformers_on_cuda_without_mask():
    assert attn.resolve_backend(torch.device("cuda")) == "xformers"
    assert attn.resolve_backend(torch.device("cuda"), has_mask=True) == "sdpa"


@pytest.mark.parametrize("mask_kind", ["none", "causal", "dense", "per_row_keys"])
def test_gqa_is_bit_exact_and_never_repeats_kv(mask_kind, monkeypatch):
    """GQA goes through the kernel: identical bits to explicit repeat_interleave, and no K/V copy."""
    q, k, v = _qkv(b=3, lq=6, lk=11, h=8, hkv=2)
    g = torch.Generator().manual_seed(5)
    mask = {"none": None, "causal": None, "dense": torch.rand(3, 1, 6, 11, generator=g) > 0.3,
            "per_row_keys": torch.arange(11)[None, None, None, :] < torch.tensor([4, 11, 7])[:, None, None, None]}
    m = mask[mask_kind]
    if m is not None:
        m[..., 0] = True
    causal = mask_kind == "causal"
    want = attn.attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), causal=causal, mask=m)

    def no_repeat(*a, **kw):
        raise AssertionError("K/V were repeated")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    got = attn.attention(q, k, v, causal=causal, mask=m)
    assert torch.equal(got, want)


def test_folded_gqa_with_per_row_key_mask_matches_reference():
    """The CUDA path for a per-row key mask (query heads folded into the query length), run on CPU."""
    q, k, v = _qkv(b=3, lq=4, lk=10, h=8, hkv=2)
    mask = torch.arange(10)[None, None, None, :] < torch.tensor([3, 10, 6])[:, None, None, None]
    got = attn._sdpa_folded(q, k, v, mask, None)
    torch.testing.assert_close(got, _reference(q, k, v, mask=mask.expand(3, 1, 4, 10)), atol=1e-5, rtol=1e-4)
