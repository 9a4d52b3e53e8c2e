"""Prompt templates and special-token lookup (by string, never hard-coded ids).

The conditional text is the user turn of the Qwen chat format followed by the assistant turn
opener; the unconditional text drops the user turn (how training dropped captions). The user's
own text is tokenised with special tokens *split*: ``<|im_end|>`` typed in a prompt is text, not a
control token. For ordinary prompts this gives the same ids as the reference's single ``encode``.
"""

from __future__ import annotations

from dataclasses import dataclass

USER_OPEN = "<|im_start|>user\n"
USER_CLOSE = "<|im_end|>\n"
ASSISTANT_OPEN = "<|im_start|>assistant\n"
COND_TEMPLATE = USER_OPEN + "{prompt}" + USER_CLOSE + ASSISTANT_OPEN
UNCOND_TEXT = ASSISTANT_OPEN


class PromptError(ValueError):
    pass


@dataclass
class PromptEncoder:
    tokenizer: object  # a transformers fast tokenizer
    parallel_num: int

    def __post_init__(self) -> None:
        self._open = self._encode_template(USER_OPEN)
        self._close = self._encode_template(USER_CLOSE + ASSISTANT_OPEN)
        self._uncond = self._encode_template(UNCOND_TEXT)
        self.vision_start = self.token_id("<|vision_start|>")
        self.queries = [self.token_id(f"<|query_{i}|>") for i in range(1, self.parallel_num)]

    def _encode_template(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_user(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id or self.tokenizer.convert_ids_to_tokens(tid) != token:
            raise PromptError(f"the tokenizer has no token {token!r}")
        return int(tid)

    def count_user_tokens(self, prompt: str) -> int:
        return len(self._encode_user(prompt))

    def cond_ids(self, prompt: str) -> list[int]:
        return self._open + self._encode_user(prompt) + self._close

    def uncond_ids(self, negative_prompt: str | None = None) -> list[int]:
        """The unconditional stream; a negative prompt takes the place of the empty user turn."""
        if negative_prompt is None:
            return list(self._uncond)
        return self.cond_ids(negative_prompt)

    def image_prefix_ids(self, h_lat: int, w_lat: int) -> list[int]:
        """``[<|vision_start|>, <|res_h|>, <|res_w|>, <|query_1|> .. <|query_{P-1}|>]`` (length P + 2)."""
        return [self.vision_start, self.token_id(f"<|res_{h_lat}|>"), self.token_id(f"<|res_{w_lat}|>"), *self.queries]
