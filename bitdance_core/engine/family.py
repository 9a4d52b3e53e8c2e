"""The model-family seam: everything the engine does that depends on the kind of model.

The engine (admission, KV slots, the shared unconditional-prefix cache, the fused CFG rows, the
sampler, previews, events) is one piece of code for every BitDance model. What differs between
the text-to-image models (Qwen3 prior, prompts) and the class-conditional ImageNet models
(LlamaGen-style prior, class labels) lives behind :class:`ModelFamily`. A family is built once
per loaded model (the engine builds ``model.family_type``; ``bitdance_core.families.registry`` lists
the families) and is stateless per request: per-request data lives in
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

from ..loading.quantize import module_bytes as _module_bytes
from ..models.autoencoder import to_uint8
from .protocol import GenerationRequest
from .serving_config import ServingConfig


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

    kind: str  # shown in /info: "text-to-image" | "class-conditional"
    name: str  # the registry key (bitdance_core.families.registry): the loaded model and its config name it

    @classmethod
    @abstractmethod
    def default_serving(cls, model) -> ServingConfig:
        """The model's serving defaults (sizes, steps, guidance) when the deployment gives none."""

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
        return GenerationRequest(request_id, "warm up", height, width, **kw)

    # ---- what the memory plan asks (memory_plan.py knows no model kind) ---------------------

    MODULES: tuple[str, ...] = ()  # the model's modules the family serves with (their bytes are the weights)

    def module_bytes(self) -> dict[str, int]:
        """Bytes of the parameters and buffers of each module the family serves with, as built (quantised or not)."""
        return self.model_bytes(self.model)

    @classmethod
    def model_bytes(cls, model) -> dict[str, int]:
        return {name: _module_bytes(getattr(model, name)) for name in cls.MODULES}

    def plan_requests(self, n: int, height: int, width: int, *, steps: int, guidance: float,
                      distinct: int) -> list:
        """The memory plan's ``n`` worst-case requests (one image each, guided): the longest prefixes, with at
        most ``distinct`` different unconditional prefixes (the prefix cache's entries)."""
        return [self.example_request(f"plan-{i}", height, width, seed=i, steps=steps, guidance_scale=guidance,
                                     preview_every=0) for i in range(n)]

    def info(self) -> dict:
        return {"kind": self.kind}
