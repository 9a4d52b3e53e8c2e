"""Demo training code: tokenizer builder, the block-causal mask, and a few-step smoke run of the recipe."""

from __future__ import annotations

import json

import torch

from bitdance_core.demo import train
from bitdance_core.families.text_to_image.tokenizer_build import build_tokenizer


def test_tokenizer_builder(tmp_path):
    from transformers import AutoTokenizer

    n = build_tokenizer(tmp_path, ["a red circle in the top left", "a blue square"], 300, max_res=32, num_query=15)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == n
    text = "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added
    assert ids[-1] != tok.convert_tokens_to_ids("<|im_end|>")  # no EOS added
    assert tok.decode(ids) == text
    names = ["<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|res_1|>", "<|res_32|>", "<|query_15|>"]
    got = tok.convert_tokens_to_ids(names)
    assert len(set(got)) == len(names) and tok.unk_token_id not in got
    assert tok.encode("<|res_32|><|query_3|>") == tok.convert_tokens_to_ids(["<|res_32|>", "<|query_3|>"])
    assert (tmp_path / "special_tokens_map.json").exists()


def test_block_mask_pattern():
    # one row, 2 pads, prompt 3, image segment: vision_start, res_h, then 2 blocks of P=2
    seq, image_len, p = 2 + 3 + 6, 6, 2
    m = train.block_mask(torch.tensor([9]), seq, image_len, p)[0, 0]
    start = seq - image_len
    blk0 = [start + 2, start + 3]
    blk1 = [start + 4, start + 5]
    assert m[blk0[0], blk0[1]] and m[blk1[0], blk1[1]]  # bidirectional inside a block
    assert not m[blk0[1], blk1[0]]  # no look-ahead into the next block
    assert not m[start, start + 1]  # vision_start / res_h stay causal
    assert not m[start + 2, 0] and not m[start + 2, 1]  # pads are invisible
    assert m[start + 2, 2]


def test_training_smoke(tmp_path):
    cfg = train.RecipeConfig(num_images=32, threads=1, bpe_vocab_size=300, max_res=16, recon_eval_images=8)
    cfg.ae = train.AEConfig(ch=32, ch_mult=(1, 1, 2, 2), steps=2, batch=4, decoder_rounds=((2, 1e-3),))
    cfg.prior = train.PriorConfig(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128,
                                  steps=2, batch=4, diff_batch_mul=1)
    summary = train.train_demo(tmp_path / "ckpt", seed=0, config=cfg, work_dir=tmp_path / "work",
                               progress=False)
    out = tmp_path / "ckpt"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "ae_config.json", "ae.safetensors", "vision_head_config.json",
                 "vision_head.safetensors", "projector.safetensors"):
        assert (out / name).exists(), name
    assert summary["prior_s"] >= 0
    rows = [json.loads(x) for x in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} >= {"ae", "decoder", "prior", "done"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)

    from bitdance_core.families.text_to_image.pipeline import BitDancePipeline

    pipe = BitDancePipeline.from_pretrained(out, device="cpu")
    res = pipe("a red circle", 64, 64, steps=2, guidance_scale=2.0, seed=0)
    assert res.images[0].size == (64, 64) and res.tokens.shape == (1, 64, 16)
