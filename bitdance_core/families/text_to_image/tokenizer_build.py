"""Build a small byte-level BPE tokenizer in the layout of the BitDance checkpoints, offline.

The result (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) loads with
``transformers.AutoTokenizer.from_pretrained(out_dir)``. It carries the chat tokens, ``<|vision_start|>``,
``<|vision_end|>``, ``<|res_1|>``..``<|res_{max_res}|>`` and ``<|query_1|>``..``<|query_{num_query}|>`` as
special tokens (never split), adds no BOS/EOS on ``encode``, and is used for random checkpoints and for the
demo model. Token ids must still be looked up by string (spec §2.4).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def special_tokens(max_res: int = 256, num_query: int = 63) -> list[str]:
    """All special tokens in id order: chat/vision tokens, then ``<|res_n|>``, then ``<|query_i|>``."""
    return (
        list(CHAT_TOKENS)
        + [f"<|res_{n}|>" for n in range(1, max_res + 1)]
        + [f"<|query_{i}|>" for i in range(1, num_query + 1)]
    )


def build_tokenizer(
    out_dir: str | Path,
    corpus: list[str],
    bpe_vocab_size: int = 512,
    max_res: int = 256,
    num_query: int = 63,
) -> int:
    """Train a byte-level BPE on ``corpus`` (plus the chat template words) and save it to ``out_dir``.

    ``bpe_vocab_size`` is the size of the BPE part (256 byte symbols plus merges; at most that many, fewer
    when the corpus has no more merges to learn); the special tokens come on top. Returns
    ``len(tokenizer)`` (the vocabulary size the LLM needs).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = special_tokens(max_res, num_query)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    vocab_size = max(int(bpe_vocab_size), 256) + len(specials)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) + ["user\n", "assistant\n", "user", "assistant"]
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer registers the specials as added tokens already; make sure every one is special/unsplit.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(out / "tokenizer.json"))

    added = {}
    for s in specials:
        added[str(tok.token_to_id(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [s for s in CHAT_TOKENS if s not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    n = tok.get_vocab_size(with_added_tokens=True)
    logger.info("tokenizer with %d entries written to %s", n, out)
    return n
