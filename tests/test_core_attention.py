"""Attention backends agree with each other and with a plain softmax reference; forcing works and is undone."""

from __future__ import annotations

import math

import pytest
import torch

from bitdance_core.models import attention as attn
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


def _reference(q, k, v, mask=None, causal=False, scale=None):
    """Plain attention, independent of every backend: a loop over query heads (GQA: head h reads kv head
    h // (H / Hkv)), float64 matmuls, masked scores at -inf, an explicit softmax."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if mask is not None:
        allowed = allowed & (mask[:, None] if mask.dim() == 3 else mask)
    out = torch.empty(b, lq, h, d, dtype=torch.float64, device=q.device)
    for head in range(h):
        kv = head // (h // hkv)
        s = (q[:, :, head].double() @ k[:, :, kv].double().transpose(1, 2)) * scale  # (b, lq, lk)
        s = s.masked_fill(~allowed[:, 0].expand(b, lq, lk), float("-inf"))
        p = (s - s.amax(-1, keepdim=True)).exp()
        out[:, :, head] = (p / p.sum(-1, keepdim=True)) @ v[:, :, kv].double()
    return out.to(q.dtype)


def _masks(kind: str, b: int, lq: int, lk: int):
    g = torch.Generator().manual_seed(3)
    if kind == "dense":
        m = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    elif kind == "dense_3d":
        m = torch.rand(b, lq, lk, generator=g) > 0.3
    elif kind == "per_row_keys":  # the engine's block step: one key length per row, (R, 1, 1, Lk)
        m = torch.arange(lk)[None, None, None, :] < torch.randint(1, lk + 1, (b,), generator=g)[:, None, None, None]
    else:
        return None
    m[..., 0] = True  # every query sees at least one key
    return m.to(DEVICE)


def test_the_reference_is_not_vacuous():
    """The reference sees a change of any input, of the mask and of the GQA head grouping."""
    q, k, v = _qkv(hkv=2)
    ref = _reference(q, k, v)
    assert not torch.allclose(ref, _reference(q, k, v, mask=_masks("per_row_keys", 2, 5, 9).cpu()), atol=1e-3)
    k2 = torch.cat([k[:, :, 1:], k[:, :, :1]], dim=2)  # swap the kv heads: another grouping
    assert not torch.allclose(ref, _reference(q, k2, v), atol=1e-3)
    plain = torch.einsum("bhqk,bkhd->bqhd", torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2))
                         .div(4.0).softmax(-1), v.repeat_interleave(2, 2))
    torch.testing.assert_close(ref, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "dense", "dense_3d", "per_row_keys", "per_row_keys_causal"])
def test_backend_matches_reference(backend, hkv, mask_kind):
    attn.set_backend(backend)
    q, k, v = _qkv(b=3, hkv=hkv, device=DEVICE)
    mask, causal = _masks(mask_kind.removesuffix("_causal"), 3, 5, 9), mask_kind.endswith("causal")
    for scale in (None, 0.3):
        torch.testing.assert_close(attn.attention(q, k, v, mask=mask, causal=causal, scale=scale),
                                   _reference(q, k, v, mask=mask, causal=causal, scale=scale), atol=1e-5, rtol=1e-4)


def test_all_available_backends_match_the_reference_in_a_head(monkeypatch):
    from bitdance_core.models import diffusion_head

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
    monkeypatch.setattr(diffusion_head, "attention", lambda q, k, v: _reference(q, k, v))
    with torch.no_grad():
        want = head(x, t, c)
    for backend, out in outs.items():
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4, msg=f"{backend} vs the reference")


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
    monkeypatch.undo()
    torch.testing.assert_close(got, _reference(q, k, v, causal=causal, mask=m), atol=1e-5, rtol=1e-4)


def test_folded_gqa_with_per_row_key_mask_matches_reference():
    """The CUDA path for a per-row key mask (query heads folded into the query length), run on CPU."""
    q, k, v = _qkv(b=3, lq=4, lk=10, h=8, hkv=2)
    mask = torch.arange(10)[None, None, None, :] < torch.tensor([3, 10, 6])[:, None, None, None]
    got = attn._sdpa_folded(q, k, v, mask, None)
    torch.testing.assert_close(got, _reference(q, k, v, mask=mask.expand(3, 1, 4, 10)), atol=1e-5, rtol=1e-4)
