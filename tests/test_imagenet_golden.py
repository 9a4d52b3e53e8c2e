"""Golden parity of the class-conditional pipeline with the official ``imagenet_gen`` sampler.

* the shared fixture ``reference-imagenet-tiny-a`` (next-patch 4x): every case's tokens (conditional and all rows
  carried, so the step-0 oddity of the linear schedule is checked), values, latent and image, and its module
  checks (autoencoder, teacher-forced transformer, head, RoPE table, block-causal mask);
* ``imagenet-official-tiny``: the official sampler's outputs on our make-checkpoint 1x (next-token) and 16x files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitdance_core.families.class_conditional.pipeline import ClassConditionalPipeline, guidance_at
from bitdance_core.families.class_conditional.random_checkpoint import write_class_checkpoint
from bitdance_core.families.class_conditional.transformer import block_causal_mask, rope_table
from bitdance_core.models.autoencoder import BinaryAutoencoder

FIXTURE = Path(__file__).parent / "fixtures" / "reference-imagenet-tiny-a"
OFFICIAL = Path(__file__).parent / "fixtures" / "imagenet-official-tiny"
CASES = json.loads((FIXTURE / "golden.json").read_text())["cases"]


@pytest.fixture(scope="module")
def pipe() -> ClassConditionalPipeline:
    return ClassConditionalPipeline.from_checkpoint(FIXTURE / "BitDance_tiny_a_4x.pt", device="cpu",
                                                    model_args=FIXTURE / "model_args_4x.json")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "golden.safetensors")


def run_case(pipe, c):
    return pipe(c["labels"], seed=c["seed"], steps=c["sample_steps"], guidance_scale=c["cfg_scale"],
                cfg_schedule=c["cfg_schedule"])


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"case{i}" for i in range(len(CASES))])
def test_golden_case(pipe, golden, i):
    out = run_case(pipe, CASES[i])
    assert torch.equal(out.tokens, golden[f"case{i}.tokens"]), "tokens differ from the official sampler's"
    assert torch.equal(out.tokens_all, golden[f"case{i}.tokens_all"]), "rows carried differ (null rows included)"
    torch.testing.assert_close(out.values, golden[f"case{i}.values"], atol=1e-3, rtol=0)
    assert torch.equal(out.latent.to(torch.int8), golden[f"case{i}.latent"])
    diff = (out.pixels.int() - golden[f"case{i}.image"].int()).abs()
    assert diff.max().item() <= 1, f"image differs by up to {diff.max().item()} levels"
    assert out.seed == CASES[i]["seed"]


def test_one_request_of_three_labels_is_the_official_batch(pipe, golden):
    """Case 2: labels [0, 0, 999], seed 11: the two label-0 images differ (one generator for the request, drawn
    in batch order), and at step 0 the null rows sampled tokens of their own (linear schedule, guidance 1)."""
    c = CASES[2]
    assert c["labels"] == [0, 0, 999] and c["seed"] == 11
    out = run_case(pipe, c)
    assert torch.equal(out.tokens, golden["case2.tokens"])
    assert (out.tokens[0] != out.tokens[1]).float().mean() > 0.3
    first = out.tokens_all[:, :4]  # AR step 0 (4 tokens) of all 6 rows
    assert not torch.equal(first[:3], first[3:]), "step 0 must sample the null rows separately"
    assert torch.equal(out.tokens_all[:3, 4:], out.tokens_all[3:, 4:]), "guided steps feed one block to both halves"


def test_guidance_schedules():
    assert guidance_at(0, 64, 4.0, "linear") == 1.0
    assert guidance_at(32, 64, 4.0, "linear") == 2.5
    assert guidance_at(0, 64, 4.0, "constant") == 4.0
    assert guidance_at(10, 64, 1.0, "constant") == 1.0
    with pytest.raises(ValueError):
        guidance_at(1, 64, 4.0, "cosine")


def test_constant_schedule_guides_step_zero(pipe):
    """Constant guidance > 1 at step 0: B draws, the same block to both halves (no separate null sampling)."""
    out = pipe([1], seed=0, steps=2, guidance_scale=3.0, cfg_schedule="constant")
    assert torch.equal(out.tokens_all[0], out.tokens_all[1])
    lin = pipe([1], seed=0, steps=2, guidance_scale=3.0, cfg_schedule="linear")
    assert not torch.equal(lin.tokens, out.tokens)


# ---- module checks ------------------------------------------------------------------------------------------


def test_autoencoder_module_checks(golden):
    ae_sd = torch.load(FIXTURE / "ae_tiny_a.pt", weights_only=True)["state_dict"]
    ddconfig = json.loads((FIXTURE / "model_args_4x.json").read_text())["vae"]["ddconfig"]
    ae = BinaryAutoencoder(ddconfig, with_encoder=True)
    ae.load_state_dict({k: v.contiguous() for k, v in ae_sd.items()}, strict=True)
    ae.eval()
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(golden["ae.decode.in"]), golden["ae.decode.out"], rtol=1e-4, atol=1e-4)
        assert torch.equal(ae.encode(golden["ae.encode.in"]), golden["ae.encode.out"])


def _patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = latent.shape
    return latent.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, c)


def test_transformer_module_check(pipe, golden):
    net, cfg = pipe.model.transformer, pipe.config
    labels, latent = golden["4x.ar.in.labels"], golden["4x.ar.in.latent"]
    tokens = _patchify(latent, cfg.patch_side)[:, : -cfg.parallel_num]
    with torch.no_grad():
        x = torch.cat([net.prefix_embeds(labels), net.token_embeds(tokens)], dim=1)
        out = net(x, net.plan_full(x.shape[0], x.shape[1]))[:, -cfg.num_tokens :]
    torch.testing.assert_close(out, golden["4x.ar.out"], rtol=1e-4, atol=1e-4)


def test_head_module_check(pipe, golden):
    with torch.no_grad():
        out = pipe.model.head(golden["4x.head.in.x"], golden["4x.head.in.t"], golden["4x.head.in.c"])
    torch.testing.assert_close(out, golden["4x.head.out"], rtol=1e-4, atol=1e-5)


def test_rope_and_mask(pipe, golden):
    cos, sin = rope_table(pipe.config)
    want = golden["4x.rope"]
    n = want.shape[0]
    torch.testing.assert_close(torch.stack([cos[:n], sin[:n]], dim=-1), want, rtol=1e-6, atol=1e-6)
    allowed = golden["4x.attn_allowed"].bool()
    assert torch.equal(block_causal_mask(n, pipe.config.cls_token_num - 1, pipe.config.parallel_num), allowed)


# ---- the next-token (1x) and 16x code paths -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["1x", "16x"])
def test_official_sampler_on_make_checkpoint(tmp_path, kind):
    path = write_class_checkpoint(f"imagenet-tiny-{kind}", tmp_path, seed=0)
    want = load_file(OFFICIAL / "official.safetensors")
    out = ClassConditionalPipeline.from_checkpoint(path, device="cpu")([5, 5, 998], seed=7, steps=3,
                                                                       guidance_scale=3.0, cfg_schedule="linear")
    assert torch.equal(out.tokens, want[f"{kind}.tokens"])
    assert (out.pixels.int() - want[f"{kind}.image"].int()).abs().max().item() <= 1
