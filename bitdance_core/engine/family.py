"""The model-family seam: everything the engine does that depends on the kind of model.

The engine (admission, KV slots, the shared unconditional-prefix cache, the fused CFG rows, the
sampler, previews, events) is one piece of code for every BitDance model. What differs between
the text-to-image models (Qwen3 prior, prompts) and the class-conditional ImageNet models
(LlamaGen-style prior, class labels) lives behind :class:`ModelFamily`. A family is built once
per loaded model by :func:`family_for` and is stateless per request: per-request data lives in
the :class:`Prepared` it returns and in the engine's ``RequestState``.

Rows. A request with ``B`` images has ``B`` conditional rows and, when it uses guidance,
``B`` unconditional rows after them (``rows = 2B``). Every per-row tensor below is ordered the
same way: ``[cond_0 .. cond_{B-1}, uncond_0 .. uncond_{B-1}]``.

Life of a request, and which method the engine calls (``st`` is the engine's RequestState:
``st.req``, ``st.h``, ``st.w``, ``st.num_images``, ``st.rows``, ``st.prep``):

1. ``prepare(req)`` at submission: validate (raise ``InvalidRequest(msg, field=...)`` naming
   the field and what is allowed) and return a :class:`Prepared`: the latent grid, the number
   of AR steps, the conditional and (when guided) unconditional prefixes, the key of the
   unconditional prefix in the engine's shared prefix cache, and ``uses_cfg``.
2. Prefill: ``prefix_embeddings(prefix)`` turns one prefix into ``(L, D)`` input embeddings of
   the prior (T2I: token ids -> ``embed_tokens``; ImageNet: class label -> ``cls_token_num``
   class-embedding rows + ``P - 1`` learned query rows, the null class for the unconditional
   row). The engine pads the rows, runs ONE prior forward through
   ``prior.plan_cached(cache, slots, lengths, longest, block=prefill_block)`` and keeps the
   hidden states of the last ``P`` positions of each row as the predictors of block 0.
3. Every AR step ``i`` (0-based) of a running request:

   * ``step_guidance(st, i)`` decides the sampling mode for this request at this step:
     a float ``g`` (> 1) means *guided*: the sampler draws noise ``randn(B, P, C)``, the
     unconditional rows take the conditional rows' state and the velocity is
     ``v_u + g (v_c - v_u)``; the same tokens are fed back to both rows. ``None`` means *every
     row independent and unguided*: noise ``randn(rows, P, C)`` (all rows, cond first) and each
     row keeps and feeds back its own tokens. A request without unconditional rows always gets
     ``None`` (rows = B). ImageNet's linear schedule returns ``None`` at step 0 (guidance
     exactly 1.0: the reference samples all 2B rows independently) and
     ``1 + (g - 1) i / T`` after it.
   * ``head_offset(st, i)`` -> ``(P, ch_cond)`` (or ``None`` for zero) added to the prior's
     hidden states to condition the head: ``cond = head_condition(hidden, offset)``
     (T2I: sincos PE slice; ImageNet: learned ``pos_for_diff`` rows).
   * After sampling, ``feed_embeddings(bits, offset)`` maps the sampled ``(R, P, C)`` ±1 bits of
     all rows to ``(R, P, D)`` prior inputs, with ``offset`` from ``feed_offset(st, i)``
     (T2I: ``projector(bits) + PE``; ImageNet: SwiGLU ``proj_in`` + RMSNorm ``emb_norm``, no
     PE, so it returns ``None``). This must be a pure function of its tensors (it runs inside
     a CUDA graph on GPUs). The last block is never fed back.
4. ``decode(tokens, h, w, generator)``: ``(B, h*w, C)`` tokens in generation order -> uint8
   ``(B, H, W, 3)`` images; ``latent(tokens, h, w)`` is the un-patchify used by previews.

The prior (``self.prior``) is called only through the forward-over-embeddings contract of
:class:`bitdance_core.models.qwen3.Qwen3Model`; a second transformer class (ImageNet:
LlamaGen-style, fused ``wqkv``, kv heads = heads, 2-D RoPE indexed by sequence position)
implements the same members with its own RoPE and attention layout, reusing ``AttnPlan``,
``KVCache`` and ``bitdance_core.models.attention.attention``:

* ``dtype``, ``device``; ``kv_layout()`` -> ``(layers, kv_heads, head_dim)``: the engine
  allocates ``KVCache(layers, rows, max_len, kv_heads, head_dim)`` from it;
* ``rope(positions (R, L) long, dtype)`` -> ``(cos, sin)``, each ``(R, L, X)``, a function of each
  position alone: the runner builds the table of every cache position once and gathers rows into
  buffers of the dtype ``rope`` returned (``X``, the table's dtype and the rotation that consumes it
  are the transformer's business: Qwen3 casts to ``dtype`` as HF does; the class-conditional
  transformer keeps float32 whatever ``dtype``, as the reference rotates in float32);
* ``plan_cached(cache, slots, new_tokens, length, block)``: a prefill plan from host lengths
  (advances ``cache.lengths``);
* ``plan_step(cache, buf, rows, key_len)``: the fixed-shape block step over slots
  ``0..rows-1`` from the runner's device buffers (``runner.StepBuffers``); copy Qwen3's;
* ``__call__(embeds (R, L, D), plan)`` -> hidden ``(R, L, D)`` after the final norm.

The head (``self.head``) offers ``dtype``, ``condition(c)`` (once per AR step),
``time_table(t_values)`` and ``predict(x, t, cond_emb, t_emb)``
(:class:`bitdance_core.models.diffusion_head.DiffusionHead`). The autoencoder (``self.ae``)
offers ``decode(latent, generator=...)``, ``dtype`` and ``gan_decoder`` (True when decoding
draws noise, so requests are decoded one at a time with their own generators). ``sizes`` is a
``SizePolicy`` (``allowed()``, ``grid(H, W)``, ``ar_steps(h, w)``) for the sizes served.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..families.text_to_image.loader import LoadedModel
from ..families.text_to_image.pipeline import to_uint8
from ..families.text_to_image.prompts import PromptEncoder
from ..models.projector import pos2d_table, sincos_1d, unpatchify_tokens
from ..resolutions import POS_TABLE_ROWS, SizeError
from ..serving_config import InvalidRequest, ServingConfig


@dataclass(frozen=True)
class Prepared:
    """A validated request, as its family sees it. ``cond_prefix``/``uncond_prefix`` are opaque to
    the engine (handed back to ``prefix_embeddings``); only their lengths matter to it."""

    h: int  # latent grid rows
    w: int  # latent grid columns
    total_steps: int  # AR steps T
    cond_prefix: Any
    cond_len: int
    uncond_prefix: Any = None  # None without guidance
    uncond_len: int = 0
    uncond_key: Hashable | None = None  # shared unconditional-prefix cache key; equal keys = equal prefixes
    cond_prefixes: tuple | None = None  # one hashable prefix per image when images differ (class labels)

    @property
    def uses_cfg(self) -> bool:
        return self.uncond_prefix is not None

    def cond_groups(self, num_images: int) -> list[tuple[Any, list[int]]]:
        """``(prefix, images with it)`` in first-seen order: the prefill computes each group's prefix once."""
        if self.cond_prefixes is None:
            return [(self.cond_prefix, list(range(num_images)))]
        groups: dict = {}
        for j, p in enumerate(self.cond_prefixes):
            groups.setdefault(p, []).append(j)
        return list(groups.items())


class ModelFamily(ABC):
    """See the module docstring for the contract. Attributes every family sets in ``__init__``:
    ``kind`` (``"text-to-image"`` or ``"class-conditional"``), ``prior``, ``head``, ``ae``,
    ``parallel_num`` (P), ``z_channels`` (C), ``hidden_size`` (prior D), ``cond_dim`` (head
    ``ch_cond``), ``prefill_block`` (the mutually visible tail of a prefill), ``time_shift``
    (of the sampler's time grid), ``downsample``, ``sizes`` and ``device``."""

    kind: str

    @abstractmethod
    def prepare(self, req) -> Prepared: ...

    @abstractmethod
    def max_prefix_len(self) -> int:
        """Longest prefix (cond or uncond) any valid request can have: sizes the KV rows."""

    @abstractmethod
    def prefix_embeddings(self, prefix: Any) -> torch.Tensor:
        """One prepared prefix -> ``(L, D)`` prior input embeddings."""

    @abstractmethod
    def step_guidance(self, st, step: int) -> float | None: ...

    def head_offset(self, st, step: int) -> torch.Tensor | None:
        return None

    def feed_offset(self, st, step: int) -> torch.Tensor | None:
        return None

    def head_condition(self, hidden: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``(R, P, D)`` hidden + ``(R, P, ch_cond)`` float32 offset -> float32 head condition."""
        return hidden.float() + offset

    @abstractmethod
    def feed_embeddings(self, bits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def latent(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(B, h*w, C)`` tokens in generation order -> ``(B, C, h, w)`` latent."""

    def decode(self, tokens: torch.Tensor, h: int, w: int, generator: torch.Generator | None) -> np.ndarray:
        return to_uint8(self.ae.decode(self.latent(tokens, h, w).to(self.ae.dtype), generator=generator))

    def example_request(self, request_id: str, height: int, width: int, **kw):
        """A valid request for warm-up (``kw``: steps, guidance_scale, seed, preview_every)."""
        from .protocol import GenerationRequest

        return GenerationRequest(request_id, "warm up", height, width, **kw)

    # ---- what the memory plan asks (memory_plan.py knows no model kind) ---------------------

    MODULES: tuple[str, ...] = ()  # the model's modules the family serves with (their bytes are the weights)

    def module_bytes(self) -> dict[str, int]:
        """Bytes of the parameters and buffers of each module the family serves with, as built (quantised or not)."""
        return self.model_bytes(self.model)

    @classmethod
    def model_bytes(cls, model) -> dict[str, int]:
        from ..loading.quantize import module_bytes

        return {name: module_bytes(getattr(model, name)) for name in cls.MODULES}

    def plan_requests(self, n: int, height: int, width: int, *, steps: int, guidance: float,
                      distinct: int) -> list:
        """The memory plan's ``n`` worst-case requests (one image each, guided): the longest prefixes, with at
        most ``distinct`` different unconditional prefixes (the prefix cache's entries)."""
        return [self.example_request(f"plan-{i}", height, width, seed=i, steps=steps, guidance_scale=guidance,
                                     preview_every=0) for i in range(n)]

    def info(self) -> dict:
        return {"kind": self.kind}


class TextToImage(ModelFamily):
    """Qwen3 prior, prompts (and negative prompts) as the condition, 2-D sincos position table."""

    kind = "text-to-image"
    MODULES = ("llm", "head", "projector", "ae")  # no lm_head, no AE encoder

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
        from .protocol import GenerationRequest

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


def fake_text_model(config, dtype: torch.dtype, device: torch.device, *, tokenizer=None, build=None):
    """A text-to-image ``LoadedModel`` of fake tensors on ``device`` (call inside a ``FakeTensorMode``), as
    ``load_model`` builds it: modules on ``meta``, then every state-dict entry adopted as a fake tensor of
    ``dtype``. ``build(config, dtype)`` may replace this (e.g. a quantising builder)."""
    from ..device import Placement
    from ..families.text_to_image.loader import build_modules

    with torch.device(device):
        if build is not None:
            modules = build(config, dtype)
        else:
            modules = build_modules(config, with_encoder=False)
            for m in modules:
                state = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype)
                         for k, v in m.state_dict(keep_vars=True).items()}
                m.load_state_dict(state, strict=True, assign=True)
    for m in modules:
        m.eval().requires_grad_(False)
    return LoadedModel(config, Placement(torch.device(device), dtype, "memory plan (fake tensors)"), *modules,
                       tokenizer)


def fake_model(config, dtype: torch.dtype, device: torch.device, *, tokenizer=None, build=None):
    """A model of fake tensors of the kind ``config`` describes (text-to-image or class-conditional)."""
    from ..families.class_conditional.config import ClassModelConfig

    if isinstance(config, ClassModelConfig):
        from ..families.class_conditional.family import fake_class_model

        return fake_class_model(config, dtype, device, build=build)
    return fake_text_model(config, dtype, device, tokenizer=tokenizer, build=build)


def default_serving(model) -> ServingConfig:
    """A model's serving defaults when none are given (a class-conditional model has its own)."""
    from ..families.class_conditional.loader import LoadedClassModel

    if isinstance(model, LoadedClassModel):
        from ..families.class_conditional.family import serving_for

        return serving_for(model)
    return ServingConfig.for_model(model.config)


def family_class(model) -> type[ModelFamily]:
    """The family of a loaded model: class-conditional for a ``LoadedClassModel``, else text-to-image."""
    from ..families.class_conditional.loader import LoadedClassModel

    if isinstance(model, LoadedClassModel):
        from ..families.class_conditional.family import ClassConditional

        return ClassConditional
    return TextToImage


def family_for(model, serving: ServingConfig) -> ModelFamily:
    return family_class(model)(model, serving)
