"""From a validated request body and the model's info to a ``GenerationRequest``, and back.

``info`` is the worker's ``WorkerReady.info``: sizes as ``[[h, w], ...]``, ``defaults`` and
``limits`` (``[lo, hi]`` per parameter, ``max_prompt_chars``). The token-length limit of the
prompt is checked by the worker (its first event is then ``failed`` / ``invalid_request``).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Any

from bitdance_core.engine.protocol import ErrorCode, GenerationRequest
from server.errors import APIError

INVALID = ErrorCode.INVALID.value


def _check_range(field: str, value: float, bounds: Any) -> None:
    lo, hi = bounds
    if not lo <= value <= hi:
        raise APIError(
            INVALID,
            f"{field} must be between {lo} and {hi} (got {value})",
            field=field,
            allowed={"min": lo, "max": hi},
        )


def allowed_sizes(info: dict[str, Any]) -> list[str]:
    return [f"{w}x{h}" for h, w in info["sizes"]]


def _check_size(info: dict[str, Any], width: int, height: int, field: str) -> None:
    if [height, width] not in [list(s) for s in info["sizes"]]:
        sizes = allowed_sizes(info)
        raise APIError(
            INVALID,
            f"size {width}x{height} (width x height) is not supported; allowed: {', '.join(sizes)}",
            field=field,
            allowed=sizes,
        )


def build_request(
    info: dict[str, Any],
    *,
    prompt: str,
    negative_prompt: str | None,
    width: int | None,
    height: int | None,
    size_field: str,
    num_images: int | None,
    num_images_field: str,
    steps: int | None,
    guidance_scale: float | None,
    seed: int | None,
    output_format: str | None,
    preview_every: int | None,
    return_tokens: bool = False,
) -> GenerationRequest:
    """Apply the model's defaults and limits (422 on anything out of range; never clamps)."""
    limits, defaults = info["limits"], info["defaults"]
    max_chars = int(limits.get("max_prompt_chars", 10_000))
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None and len(text) > max_chars:
            raise APIError(
                INVALID,
                f"{field} is too long: {len(text)} characters, at most {max_chars}",
                field=field,
                allowed={"max_chars": max_chars},
            )
    if not prompt.strip(" \t\n\r\f\v"):  # the schema's NOT_BLANK pattern
        raise APIError(INVALID, "prompt is empty", field="prompt")
    if (width is None) != (height is None):
        raise APIError(INVALID, "width and height must be given together", field="width" if width is None else "height")
    if width is None or height is None:
        height, width = info["default_size"]
    _check_size(info, width, height, size_field)
    num_images = defaults.get("num_images", 1) if num_images is None else num_images
    _check_range(num_images_field, num_images, limits["num_images"])
    steps = defaults["steps"] if steps is None else steps
    _check_range("steps", steps, limits["steps"])
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    _check_range("guidance_scale", guidance_scale, limits["guidance_scale"])
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        seed=secrets.randbelow(2**31) if seed is None else seed,
        steps=steps,
        guidance_scale=float(guidance_scale),
        num_images=num_images,
        preview_every=preview_every,
        output_format=output_format or "png",
        return_tokens=return_tokens,
    )


def ar_steps(info: dict[str, Any], height: int, width: int) -> int:
    """AR steps of one image: T = (h/ds) * (w/ds) / parallel_num."""
    ds, pn = int(info["downsample"]), int(info["parallel_num"])
    return max(1, (height // ds) * (width // ds) // pn)


def preview_every_for(info: dict[str, Any], height: int, width: int, partial_images: int) -> int:
    """A cadence giving about ``partial_images`` previews before the final image (0 = none)."""
    if partial_images <= 0:
        return 0
    return max(1, ar_steps(info, height, width) // (partial_images + 1))


def parse_size(size: str | None, info: dict[str, Any]) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        sizes = allowed_sizes(info)
        raise APIError(
            INVALID, f"size {size!r} is not 'WxH' or 'auto'; allowed: {', '.join(sizes)}", field="size", allowed=sizes
        )
    return int(parts[0]), int(parts[1])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def completed_body(data: dict[str, Any], total_s: float, return_tokens: bool) -> dict[str, Any]:
    """The ``/generate`` response (and the ``completed`` SSE event) from a worker ``completed``."""
    images = []
    for im in data["images"]:
        item = {"b64_json": b64(im["data"])}
        if return_tokens and im.get("tokens") is not None:
            item["tokens"] = b64(im["tokens"])
        images.append(item)
    timings = data.get("timings", {})
    body: dict[str, Any] = {
        "seed": data["seed"],
        "width": data["width"],
        "height": data["height"],
        "images": images,
        "timings": {
            "queue_s": round(float(timings.get("queue_s", 0.0)), 4),
            "generation_s": round(float(timings.get("generation_s", 0.0)), 4),
            "total_s": round(total_s, 4),
        },
    }
    if return_tokens:
        body["token_shape"] = data.get("token_shape")
    return body
