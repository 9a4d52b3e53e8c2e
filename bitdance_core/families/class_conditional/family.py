"""The class-conditional model family for the engine (``bitdance_core.engine.family.ModelFamily``).

What differs from text-to-image, and nothing else: the prefix of a row is a class label (``cls_token_num``
class-embedding rows + ``P - 1`` learned query rows; the null class for the unconditional rows, one prefix shared
by every request through the engine's prefix cache); images of one request may have different labels (one prefix
per image, each distinct one computed once); the head's offset is the learned ``pos_for_diff`` rows; the feed is
``proj_in(bits)`` with no position term; the guidance follows the request's schedule, and the linear schedule's
step 0 (guidance exactly 1) samples every row independently, as the reference does; one size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...engine.family import ModelFamily, Prepared
from ...engine.protocol import GenerationRequest
from ...engine.serving_config import InvalidRequest, Limits, ServingConfig
from ...models.projector import unpatchify_tokens
from .classes import class_names, label_for_prompt
from .config import CFG_SCHEDULES, DEFAULT_STEPS, ClassModelConfig
from .guidance import check_labels, guidance_at

if TYPE_CHECKING:  # the loaded model names this class as its family (loader.py imports this module)
    from .loader import LoadedClassModel

NULL_KEY = ("class-conditional", "null")


def serving_for(model: LoadedClassModel | ClassModelConfig, limits: Limits | None = None) -> ServingConfig:
    """The serving defaults of a class-conditional model (or config): its one size, 100 steps, the released
    guidance."""
    cfg = model if isinstance(model, ClassModelConfig) else model.config
    return ServingConfig(default_size=cfg.size, default_steps=DEFAULT_STEPS, default_guidance=cfg.default_guidance,
                         sizes=(cfg.size,), limits=limits or Limits())


def refuse_quantize(mode: str | None) -> None:
    """Class-conditional models are served unquantised: any other ``--quantize`` is refused, with the reason."""
    if mode not in (None, "none"):
        raise ValueError(f"--quantize {mode} applies to text-to-image checkpoint directories; class-conditional "
                         "models are served unquantised (use --quantize none)")


def request_labels(req, num_classes: int) -> list[int]:
    """The request's labels: ``class_label`` (one per image), else the class its ``prompt`` names."""
    if req.class_label is not None:
        labels = check_labels(list(req.class_label), num_classes)
        if len(labels) != req.num_images:
            raise InvalidRequest(f"class_label has {len(labels)} labels but num_images is {req.num_images}; give "
                                 "one label per image (or one label and num_images copies)", field="class_label")
        return labels
    if not req.prompt:
        raise InvalidRequest("a class-conditional model needs class_label (an integer 0-"
                             f"{num_classes - 1}, or one per image) or a prompt naming an ImageNet class",
                             field="class_label")
    return [label_for_prompt(req.prompt, num_classes)] * req.num_images


class ClassConditional(ModelFamily):
    kind = "class-conditional"
    name = "class_conditional"
    MODULES = ("transformer", "head", "ae")  # no AE encoder

    @classmethod
    def default_serving(cls, model: LoadedClassModel) -> ServingConfig:
        return serving_for(model)

    def __init__(self, model: LoadedClassModel, serving: ServingConfig):
        cfg = model.config
        self.model, self.serving, self.config = model, serving, cfg
        self.prior, self.head, self.ae = model.transformer, model.head, model.ae
        self.parallel_num, self.z_channels = cfg.parallel_num, cfg.latent_dim
        self.hidden_size = self.cond_dim = cfg.dim
        self.prefill_block, self.time_shift, self.downsample = cfg.parallel_num, cfg.time_shift, cfg.downsample
        self.patch_side, self.device = cfg.patch_side, model.placement.device
        self.sizes = serving.size_policy(cfg)  # the one size (``serving_for``)

    def prepare(self, req) -> Prepared:
        cfg = self.config
        if (req.height, req.width) != cfg.size:
            raise InvalidRequest(f"size {req.width}x{req.height} (WxH) is not supported; this class-conditional "
                                 f"model generates {cfg.image_size}x{cfg.image_size} only", field="size")
        if req.negative_prompt is not None:
            raise InvalidRequest("negative_prompt does not apply to a class-conditional model (the unconditional "
                                 "stream is the null class)", field="negative_prompt")
        if req.cfg_schedule not in CFG_SCHEDULES:
            raise InvalidRequest(f"cfg_schedule {req.cfg_schedule!r} is not one of {list(CFG_SCHEDULES)}",
                                 field="cfg_schedule")
        labels = request_labels(req, cfg.num_classes)
        n = cfg.prefix_len
        guided = req.guidance_scale > 1.0
        return Prepared(cfg.grid, cfg.grid, cfg.ar_steps, labels[0], n,
                        cfg.null_class if guided else None, n if guided else 0, NULL_KEY if guided else None,
                        cond_prefixes=tuple(labels))

    def max_prefix_len(self) -> int:
        return self.config.prefix_len

    def prefix_embeddings(self, prefix: int) -> torch.Tensor:
        return self.prior.prefix_embeds(torch.tensor([prefix], device=self.device))[0]

    def step_guidance(self, st, step: int) -> float | None:
        if not st.prep.uses_cfg:
            return None
        g = guidance_at(step, st.prep.total_steps, st.req.guidance_scale, st.req.cfg_schedule)
        return g if g > 1.0 else None

    def head_offset(self, st, step: int) -> torch.Tensor:
        P = self.parallel_num
        return self.prior.pos_for_diff.weight[step * P : (step + 1) * P].float()

    def feed_embeddings(self, bits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self.prior.token_embeds(bits)

    def latent(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return unpatchify_tokens(tokens, h, w, self.patch_side)

    def example_request(self, request_id: str, height: int, width: int, **kw):
        label = kw.get("seed", 0) % self.config.num_classes  # a different class per seed
        return GenerationRequest(request_id, "", height, width, class_label=(label,), **kw)

    def info(self) -> dict:
        cfg = self.config
        names = list(class_names()) if cfg.num_classes == 1000 else None
        return {"kind": self.kind, "num_classes": cfg.num_classes, "class_names": names,
                "cfg_schedules": list(CFG_SCHEDULES), "defaults": {"cfg_schedule": "linear"},
                "size": list(cfg.size), "architecture": cfg.kind, "ar_steps": cfg.ar_steps,
                "weights": self.model.weights}
