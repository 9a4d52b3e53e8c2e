"""Request bodies of the AUTOMATIC1111-compatible routes (``server/routes/a1111.py``) and their schema patch.

Every field of A1111's ``StableDiffusionTxt2ImgProcessingAPI`` that the ``webuiapi`` client sends is declared,
with what this server does with it:

* mapped: ``prompt``, ``negative_prompt``, ``seed`` (-1 = random), ``steps`` (diffusion steps per patch),
  ``cfg_scale``, ``width`` / ``height``, ``batch_size`` x ``n_iter`` (images of one request, one seed),
  ``send_images``;
* the one sampler: ``sampler_name`` / ``sampler_index`` must name it (``SAMPLER``) or be absent; ``scheduler``
  ``automatic`` or absent; the sampler tuning fields only at their A1111 defaults (``s_churn`` 0, ``s_tmin`` 0,
  ``s_tmax`` 0, ``s_noise`` 1, ``s_min_uncond`` 0, ``subseed_strength`` 0, ``seed_resize_from_*`` -1 or 0);
* features this server does not have are refused unless off: ``enable_hr``, ``restore_faces``, ``tiling``,
  ``styles``, ``script_name`` / ``script_args`` / ``alwayson_scripts``, ``save_images``, ``firstpass_image``,
  ``refiner_checkpoint``, ``infotext``; ``override_settings`` only with the current option values;
* ignored as A1111 ignores them in this case: the ``hr_*`` / ``firstphase_*`` / ``denoising_strength`` fields
  while ``enable_hr`` is false, ``eta`` (A1111 applies it to ancestral / DDIM samplers only), ``subseed``
  while ``subseed_strength`` is 0, ``refiner_switch_at`` without a refiner, ``do_not_save_*`` (nothing is
  saved), ``override_settings_restore_afterwards``, ``comments``, ``force_task_id``, ``disable_extra_networks``.

Any other key is a 422 naming it. The model-dependent bounds (sizes, steps, cfg_scale, batch_size x n_iter,
the model's name) are written into the OpenAPI schema from the worker's info (``patch_schema``).
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from server.schemas import MAX_SEED, NOT_BLANK, Int, _whole_float

SAMPLER = "Euler-Maruyama"  # the diffusion head's sampler (spec: Euler-Maruyama over the flow ODE's SDE)
EMPTY = Literal[""]


def _only(value: Any, kind: str):
    """A field that takes one value (a strict type: ``0`` is not ``false``, ``true`` is not ``1``)."""

    def check(v: Any) -> Any:
        if v != value:
            raise ValueError(f"not supported on this server: only {json.dumps(value)}")
        return v

    return Annotated[type(value), AfterValidator(check), WithJsonSchema({"type": kind, "const": value})]


OFF = _only(False, "boolean")
SeedInt = Annotated[int, Field(ge=-1, le=MAX_SEED), BeforeValidator(_whole_float)]  # bounds first: in the schema


def _fixed(value: float, what: str):
    return Field(None, ge=value, le=value, description=f"{what}; only {value} (A1111's default) is accepted.")


class A1111Options(BaseModel):
    """``POST /sdapi/v1/options`` and ``override_settings``: only the current values are accepted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sd_model_checkpoint: str | None = Field(None, description="The served model's title (one model per server).")
    samples_format: Literal["png"] | None = Field(None, description="Images are PNG (with A1111 infotext).")
    CLIP_stop_at_last_layers: _only(1, "integer") | None = Field(None, description="No CLIP here: 1 only.")
    live_previews_enable: _only(True, "boolean") | None = Field(None, description="Previews feed /progress.")


class Txt2ImgBody(BaseModel):
    """``POST /sdapi/v1/txt2img`` (A1111's field names and defaults; see the module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="What to draw.", json_schema_extra={"pattern": NOT_BLANK})
    negative_prompt: str = Field("", description="Replaces the unconditional (CFG) prompt when not empty.")
    styles: list[str] = Field(default_factory=list, max_length=0, description="No saved styles here: [] only.")
    seed: SeedInt = Field(-1, description="-1 = random; the seed used is in info.")
    subseed: SeedInt = Field(-1, description="Unused (subseed_strength is 0).")
    subseed_strength: float | None = _fixed(0, "Variation seeds are not supported")
    seed_resize_from_h: Int = Field(-1, ge=-1, le=0, description="Off only (-1 or 0).")
    seed_resize_from_w: Int = Field(-1, ge=-1, le=0, description="Off only (-1 or 0).")
    sampler_name: Literal["Euler-Maruyama"] | None = Field(None, description=f"The one sampler: {SAMPLER}.")
    sampler_index: Literal["Euler-Maruyama"] | None = Field(None, description=f"Deprecated alias: {SAMPLER}.")
    scheduler: Literal["automatic", "Automatic"] | None = Field(None, description="The sampler's own time schedule.")
    batch_size: Int = Field(1, ge=1, description="Images per batch; batch_size x n_iter images in all.")
    n_iter: Int = Field(1, ge=1, description="Batches; batch_size x n_iter images, one request, one seed.")
    steps: Int | None = Field(None, description="Diffusion sampling steps per patch (default: the model's).")
    cfg_scale: float | None = Field(None, description="Classifier-free guidance (default: the model's).")
    width: Int | None = Field(None, description="Width; with height, one of the model's sizes (default size).")
    height: Int | None = Field(None, description="Height; with width, one of the model's sizes.")
    restore_faces: OFF | None = Field(None, description="Not supported: false or absent.")
    tiling: OFF | None = Field(None, description="Not supported: false or absent.")
    do_not_save_samples: bool = Field(False, description="Nothing is saved on the server either way.")
    do_not_save_grid: bool = Field(False, description="Nothing is saved on the server either way.")
    eta: float | None = Field(None, description="Ignored (A1111 uses it for ancestral / DDIM samplers only).")
    denoising_strength: float | None = Field(None, description="Ignored while enable_hr is false (as in A1111).")
    s_min_uncond: float | None = _fixed(0, "Negative-guidance skipping is not supported")
    s_churn: float | None = _fixed(0, "Sampler tuning")
    s_tmax: float | None = _fixed(0, "Sampler tuning")
    s_tmin: float | None = _fixed(0, "Sampler tuning")
    s_noise: float | None = _fixed(1, "Sampler tuning")
    override_settings: A1111Options | None = Field(None, description="Only the current option values.")
    override_settings_restore_afterwards: bool = Field(True, description="Nothing is overridden: no effect.")
    refiner_checkpoint: EMPTY | None = Field(None, description="No refiner: absent or empty.")
    refiner_switch_at: float | None = Field(None, description="Ignored without a refiner.")
    disable_extra_networks: bool = Field(False, description="No extra networks here: no effect.")
    firstpass_image: None = Field(None, description="Not supported: absent.")
    comments: dict[str, Any] | None = Field(None, description="Ignored.")
    enable_hr: OFF = Field(False, description="Hires. fix is not supported: false.")
    firstphase_width: Int = Field(0, description="Ignored while enable_hr is false.")
    firstphase_height: Int = Field(0, description="Ignored while enable_hr is false.")
    hr_scale: float = Field(2.0, description="Ignored while enable_hr is false.")
    hr_upscaler: str | None = Field(None, description="Ignored while enable_hr is false.")
    hr_second_pass_steps: Int = Field(0, description="Ignored while enable_hr is false.")
    hr_resize_x: Int = Field(0, description="Ignored while enable_hr is false.")
    hr_resize_y: Int = Field(0, description="Ignored while enable_hr is false.")
    hr_checkpoint_name: str | None = Field(None, description="Ignored while enable_hr is false.")
    hr_sampler_name: str | None = Field(None, description="Ignored while enable_hr is false.")
    hr_scheduler: str | None = Field(None, description="Ignored while enable_hr is false.")
    hr_prompt: str = Field("", description="Ignored while enable_hr is false.")
    hr_negative_prompt: str = Field("", description="Ignored while enable_hr is false.")
    force_task_id: str | None = Field(None, description="Ignored.")
    sampler_noise_scheduler_override: None = Field(None, description="Not supported: absent.")
    script_name: EMPTY | None = Field(None, description="No scripts here: absent or empty.")
    script_args: list[Any] = Field(default_factory=list, max_length=0, description="No scripts here: [].")
    send_images: bool = Field(True, description="false: the response's images list is empty.")
    save_images: OFF = Field(False, description="Nothing is saved on the server: false.")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, max_length=0, description="No scripts: {}.")
    infotext: EMPTY | None = Field(None, description="Not supported: absent or empty.")


def current_options(info: dict[str, Any]) -> dict[str, Any]:
    """``GET /sdapi/v1/options``: A1111's option names with this server's values."""
    return {"sd_model_checkpoint": info["model"], "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "live_previews_enable": True,
            "show_progress_every_n_steps": int(info.get("preview_every") or 0)}


def _prop(props: dict[str, Any], name: str, kind: str) -> dict[str, Any] | None:
    p = props.get(name)
    if p is None:
        return None
    if p.get("type") == kind:
        return p
    return next((a for a in p.get("anyOf", ()) if a.get("type") == kind), None)


def patch_schema(schema: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The served model's bounds in the txt2img and options schemas (what the handlers check)."""
    out = copy.deepcopy(schema)
    comps = out.get("components", {}).get("schemas", {})
    body, opts = comps.get("Txt2ImgBody"), comps.get("A1111Options")
    lim = info["limits"]
    if opts is not None:
        target = _prop(opts["properties"], "sd_model_checkpoint", "string")
        if target is not None:
            target["enum"] = [info["model"]]
    if body is None:
        return out
    props = body["properties"]
    chars = int(lim.get("max_prompt_chars", 10_000))
    for name in ("prompt", "negative_prompt"):
        target = _prop(props, name, "string")
        if target is not None:
            target["maxLength"] = chars
    for name, key in (("steps", "steps"), ("cfg_scale", "guidance_scale")):
        target = _prop(props, name, "integer") or _prop(props, name, "number")
        if target is not None:
            target["minimum"], target["maximum"] = lim[key]
    sizes = [(int(w), int(h)) for h, w in info["sizes"]]
    top = int(lim["num_images"][1])
    pairs = [(b, n) for b in range(1, top + 1) for n in range(1, top + 1) if b * n <= top]
    body["allOf"] = [
        {"anyOf": [{"properties": {"width": {"type": "null"}, "height": {"type": "null"}}},
                   *({"required": ["width", "height"], "properties": {"width": {"const": w}, "height": {"const": h}}}
                     for w, h in sizes)]},
        {"anyOf": [{"properties": {"batch_size": {"const": b}, "n_iter": {"const": n}}} for b, n in pairs]},
    ]
    return out
