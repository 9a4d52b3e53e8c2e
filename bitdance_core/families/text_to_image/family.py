"""The text-to-image family for the engine (``bitdance_core.engine.family.ModelFamily``).

Qwen3 prior; the prefix of a row is the chat-templated prompt (the negative prompt for the unconditional rows,
shared through the engine's prefix cache by requests with the same size and negative prompt) and the image-size
tokens; the head's offset and the feed's position term are the 2-D sin-cos table; guidance is constant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...engine.family import ModelFamily, Prepared
from ...engine.protocol import GenerationRequest
from ...engine.serving_config import InvalidRequest, ServingConfig
from ...models.projector import pos2d_table, sincos_1d, unpatchify_tokens
from ...resolutions import POS_TABLE_ROWS, SizeError
from .prompts import PromptEncoder

if TYPE_CHECKING:  # the loaded model names this class as its family (loader.py imports this module)
    from .loader import LoadedModel


class TextToImage(ModelFamily):
    """Qwen3 prior, prompts (and negative prompts) as the condition, 2-D sincos position table."""

    kind = "text-to-image"
    name = "text_to_image"
    MODULES = ("llm", "head", "projector", "ae")  # no lm_head, no AE encoder

    @classmethod
    def default_serving(cls, model: LoadedModel) -> ServingConfig:
        return ServingConfig.for_model(model.config)

    def __init__(self, model: LoadedModel, serving: ServingConfig):
        cfg = model.config
        self.model, self.serving = model, serving
        self.prior, self.head, self.ae, self.projector = model.llm, model.head, model.ae, model.projector
        self.parallel_num, self.z_channels = cfg.parallel_num, cfg.z_channels
        self.hidden_size = self.cond_dim = cfg.llm.hidden_size
        self.prefill_block, self.time_shift, self.downsample = cfg.parallel_num, cfg.time_shift, cfg.downsample
        self.patch_side, self.device = cfg.patch_side, model.placement.device
        self.prompts = PromptEncoder(model.tokenizer, self.parallel_num)
        self.sizes = serving.size_policy(cfg)
        self._pos_1d = sincos_1d(cfg.llm.hidden_size // 2, POS_TABLE_ROWS).to(self.device)
        self._pe: dict[tuple[int, int], torch.Tensor] = {}

    def prepare(self, req) -> Prepared:
        try:
            h, w = self.sizes.grid(req.height, req.width)
        except SizeError as e:
            raise InvalidRequest(str(e), field="size") from e
        limit = self.serving.limits.max_prompt_tokens
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if text is not None and (n := self.prompts.count_user_tokens(text)) > limit:
                raise InvalidRequest(f"{name} is {n} tokens long; at most {limit} tokens are allowed", field=name)
        image_prefix = self.prompts.image_prefix_ids(h, w)
        cond = self.prompts.cond_ids(req.prompt) + image_prefix
        uncond = key = None
        if req.guidance_scale > 1.0:
            uncond = self.prompts.uncond_ids(req.negative_prompt) + image_prefix
            key = (h, w, req.negative_prompt)
        return Prepared(h, w, h * w // self.parallel_num, cond, len(cond), uncond, len(uncond or ()), key)

    def max_prefix_len(self) -> int:
        template = len(self.prompts.cond_ids(""))
        return template + self.serving.limits.max_prompt_tokens + self.parallel_num + 2

    def prefix_embeddings(self, prefix: list[int]) -> torch.Tensor:
        return self.prior.embed_tokens(torch.tensor(prefix, device=self.device))

    def step_guidance(self, st, step: int) -> float | None:
        return st.req.guidance_scale if st.prep.uses_cfg else None

    def pos_table(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._pe:
            self._pe[(h, w)] = pos2d_table(h, w, self.patch_side, self.hidden_size, self._pos_1d)
        return self._pe[(h, w)]

    def head_offset(self, st, step: int) -> torch.Tensor:
        P = self.parallel_num
        return self.pos_table(st.h, st.w)[step * P : (step + 1) * P]

    feed_offset = head_offset

    def feed_embeddings(self, bits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self.projector(bits).float() + offset

    def latent(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return unpatchify_tokens(tokens, h, w, self.patch_side)

    def plan_requests(self, n: int, height: int, width: int, *, steps: int, guidance: float,
                      distinct: int) -> list:
        limit = self.serving.limits.max_prompt_tokens
        prompt = _longest_text(self.prompts, limit, "a photo of ")
        negative = _longest_text(self.prompts, limit - 2, "blurry ")
        return [GenerationRequest(f"plan-{i}", prompt, height, width, seed=i, steps=steps, guidance_scale=guidance,
                                  negative_prompt=f"{i % max(1, distinct)} {negative}", preview_every=0)
                for i in range(n)]


def _longest_text(prompts, limit: int, word: str) -> str:
    """A prompt of at most ``limit`` user tokens, as long as the tokenizer allows."""
    per = max(1, prompts.count_user_tokens(word * 8) // 8)
    n = max(1, limit // per)
    while n > 1 and prompts.count_user_tokens(word * n) > limit:
        n -= 1
    return (word * n).strip()
