"""Our Qwen3 against transformers' Qwen3 (the oracle) on a tiny random config, float32, SDPA.

The reference drives HF's ``Qwen3Model`` with a ``DynamicCache``: a causal prefill of the prompt, then blocks of
P tokens with an all-true 4-D boolean mask (spec §6.2-6.3). Ours uses a static per-row cache, fuses the two
prefill calls into one, batches rows of different lengths and skips the mask for uniform block steps.
"""

from __future__ import annotations

import pytest
import torch

from bitdance_core.families.text_to_image.config import LLMConfig
from bitdance_core.models.kv_cache import KVCache
from bitdance_core.models.qwen3 import Qwen3Model

P = 4
ATOL = 2e-5


@pytest.fixture(scope="module")
def models() -> tuple:
    # imported here, not at the top: transformers' modeling costs every collecting test process ~6 CPU-s
    pytest.importorskip("transformers")
    from transformers import Qwen3Config
    from transformers import Qwen3Model as HFQwen3Model

    cfg = Qwen3Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():  # HF initialises from the global RNG: keep the test suite's state untouched
        torch.manual_seed(0)
        hf = HFQwen3Model(cfg).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb everything, norms included, so no weight is a trivial 1 or 0
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ours = Qwen3Model(LLMConfig.from_hf_dict(cfg.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.float().eval()


def _embeds(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, length, 64, generator=torch.Generator().manual_seed(seed))


def _hf_reference(hf, prompt: torch.Tensor, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference's call pattern: causal prefill of all but the last P tokens, then the first block and every
    later block with an all-true (rows, 1, P, P + cache_len) boolean mask. Returns each block call's output."""
    from transformers import DynamicCache

    cache = DynamicCache()
    hf(inputs_embeds=prompt[:, :-P], past_key_values=cache, use_cache=True)
    outs = []
    for x in [prompt[:, -P:], *blocks]:
        mask = torch.ones(x.shape[0], 1, P, P + cache.get_seq_length(), dtype=torch.bool)
        outs.append(hf(inputs_embeds=x, past_key_values=cache, attention_mask=mask, use_cache=True).last_hidden_state)
    return outs


@torch.no_grad()
def test_prefill_matches_hf_causal(models):
    hf, ours = models
    x = _embeds(2, 13, seed=2)
    want = hf(inputs_embeds=x).last_hidden_state
    got = ours(x, ours.plan_full(2, 13))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_incremental_block_steps_match_hf(models):
    """Separate causal prefill (a block of 1 is causal), then the P-block and block steps, as the reference."""
    hf, ours = models
    prompt = _embeds(1, 11, seed=3)
    blocks = [_embeds(1, P, seed=10 + s) for s in range(4)]
    want = _hf_reference(hf, prompt, blocks)

    cache = KVCache(2, 1, 64, 2, 16, torch.float32, "cpu")
    n0 = prompt.shape[1] - P
    ours(prompt[:, :n0], ours.plan_cached(cache, [0], [n0], n0, block=1))
    got = [ours(x, ours.plan_cached(cache, [0], [P], P, block=P)) for x in [prompt[:, -P:], *blocks]]
    assert cache.lengths == [prompt.shape[1] + P * len(blocks)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-4)
    # the oracle is meaningful: without the 4-D mask HF's block would be causal and differ
    causal = hf(inputs_embeds=prompt).last_hidden_state[:, -P:]
    assert (causal - want[0]).abs().max() > 1e-3


@torch.no_grad()
def test_fused_prefill_matches_hf_two_calls(models):
    hf, ours = models
    prompt = _embeds(1, 9, seed=4)
    blocks = [_embeds(1, P, seed=20 + s) for s in range(3)]
    want = _hf_reference(hf, prompt, blocks)

    cache = KVCache(2, 1, 64, 2, 16, torch.float32, "cpu")
    L = prompt.shape[1]
    first = ours(prompt, ours.plan_cached(cache, [0], [L], L, block=P))[:, -P:]
    got = [first] + [ours(x, ours.plan_cached(cache, [0], [P], P, block=P)) for x in blocks]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("slots", [[0, 1, 2], [4, 1, 3]], ids=["contiguous", "scattered"])
@torch.no_grad()
def test_batched_rows_of_different_lengths_match_single_rows(models, slots):
    _, ours = models
    lengths = [10, 7, 13]
    prompts = [_embeds(1, n, seed=30 + i) for i, n in enumerate(lengths)]
    blocks = [[_embeds(1, P, seed=40 + 10 * i + s) for s in range(3)] for i in range(3)]

    singles = []
    for i in range(3):
        cache = KVCache(2, 1, 64, 2, 16, torch.float32, "cpu")
        n = lengths[i]
        outs = [ours(prompts[i], ours.plan_cached(cache, [0], [n], n, block=P))[:, -P:]]
        outs += [ours(x, ours.plan_cached(cache, [0], [P], P, block=P)) for x in blocks[i]]
        singles.append(outs)

    longest = max(lengths)
    padded = torch.zeros(3, longest, 64)
    for i, p in enumerate(prompts):
        padded[i, : lengths[i]] = p[0]
    cache = KVCache(2, 5, 64, 2, 16, torch.float32, "cpu")
    hidden = ours(padded, ours.plan_cached(cache, slots, lengths, longest, block=P))
    got = [torch.stack([hidden[i, lengths[i] - P : lengths[i]] for i in range(3)])]
    for s in range(3):
        x = torch.cat([blocks[i][s] for i in range(3)])
        got.append(ours(x, ours.plan_cached(cache, slots, [P] * 3, P, block=P)))
    assert [cache.lengths[s] for s in slots] == [n + 3 * P for n in lengths]
    for step, g in enumerate(got):
        for i in range(3):
            torch.testing.assert_close(g[i : i + 1], singles[i][step], atol=ATOL, rtol=1e-4)


def _block_causal_mask(prompt_len: int, n_blocks: int) -> torch.Tensor:
    """Causal over the prompt's first L-P tokens; then blocks of P (the prompt's last P, then each image block)
    that see everything before them and each other."""
    total = prompt_len + n_blocks * P
    block_id = torch.full((total,), -1)
    first = prompt_len - P
    block_id[first:] = torch.arange(total - first) // P
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    same = (block_id[:, None] == block_id[None, :]) & (block_id[:, None] >= 0)
    return ((j <= i) | same)[None, None]


@torch.no_grad()
def test_cached_decode_equals_full_forward_with_block_mask(models):
    _, ours = models
    prompt = _embeds(2, 10, seed=5)
    blocks = [_embeds(2, P, seed=50 + s) for s in range(3)]
    cache = KVCache(2, 2, 64, 2, 16, torch.float32, "cpu")
    got = [ours(prompt, ours.plan_cached(cache, [0, 1], [10, 10], 10, block=P))]
    got += [ours(x, ours.plan_cached(cache, [0, 1], [P, P], P, block=P)) for x in blocks]
    got = torch.cat(got, dim=1)

    seq = torch.cat([prompt, *blocks], dim=1)
    mask = _block_causal_mask(10, len(blocks)).expand(2, 1, -1, -1)
    want = ours(seq, ours.plan_full(2, seq.shape[1], mask=mask))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    # and the mask matters: plain causal attention gives different block outputs
    causal = ours(seq, ours.plan_full(2, seq.shape[1]))
    assert (causal[:, -P:] - want[:, -P:]).abs().max() > 1e-3
