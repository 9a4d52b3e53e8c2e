"""Request parameters of a class-conditional model (``GET /info`` ``kind`` = ``class-conditional``).

* ``class_label``: an int ``0 .. num_classes - 1``, or a list with one label per image (``num_images`` then
  defaults to its length; a different ``num_images`` is a 422); one int with ``num_images`` K gives K images of it;
* ``prompt``: accepted only when it is exactly an ImageNet class name (case-insensitive), so the OpenAI client and
  plain prompt boxes work; anything else is a 422 saying how to give a label; with ``class_label`` too, it must
  name that same class (else a 422 naming both fields);
* ``cfg_schedule``: ``linear`` (default, as the paper) or ``constant``; ``negative_prompt`` does not apply.

On a text-to-image model ``class_label`` and ``cfg_schedule`` are 422s. Torch-free.
"""

from __future__ import annotations

from typing import Any

from bitdance_core.engine.protocol import ErrorCode
from bitdance_core.engine.serving_config import InvalidRequest
from bitdance_core.families.class_conditional.classes import HOW, label_for_prompt
from server.errors import APIError

INVALID = ErrorCode.INVALID.value
KIND = "class-conditional"


def is_class_conditional(info: dict[str, Any]) -> bool:
    return info.get("kind") == KIND


def refuse_class_params(class_label: Any, cfg_schedule: str | None) -> None:
    """A text-to-image model: class-conditional parameters are an error, never ignored."""
    for field, value in (("class_label", class_label), ("cfg_schedule", cfg_schedule)):
        if value is not None:
            raise APIError(INVALID, f"{field} applies to class-conditional models only; the served model is "
                                    "text-to-image (give a prompt)", field=field)


def class_params(info: dict[str, Any], *, prompt: str | None, negative_prompt: str | None, class_label: Any,
                 num_images: int | None, num_images_field: str, cfg_schedule: str | None
                 ) -> tuple[str, tuple[int, ...], int | None, str]:
    """-> (prompt text, labels, num_images, cfg_schedule); ``num_images`` None = the model's default."""
    n_classes = int(info.get("num_classes") or 1000)
    if negative_prompt is not None:
        raise APIError(INVALID, "negative_prompt does not apply to a class-conditional model (its unconditional "
                                "stream is the null class)", field="negative_prompt")
    schedules = info.get("cfg_schedules") or ["linear", "constant"]
    schedule = cfg_schedule or info.get("defaults", {}).get("cfg_schedule", "linear")
    if schedule not in schedules:
        raise APIError(INVALID, f"cfg_schedule must be one of {schedules}", field="cfg_schedule", allowed=schedules)
    if class_label is not None:
        labels = [class_label] if isinstance(class_label, int) else list(class_label)
        if not labels:
            raise APIError(INVALID, "class_label is an empty list; give one label per image", field="class_label")
        for x in labels:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_classes:
                raise APIError(INVALID, f"class_label {x!r} is not an integer from 0 to {n_classes - 1}",
                               field="class_label", allowed={"min": 0, "max": n_classes - 1})
        if isinstance(class_label, list):
            if num_images is not None and num_images != len(labels):
                raise APIError(INVALID, f"{num_images_field}={num_images} but class_label lists {len(labels)} "
                                        "labels; give one label per image", field=num_images_field)
            num_images = len(labels)
        if prompt is not None:
            _same_class_or_refuse(prompt, labels, n_classes)
        text = prompt or ""
    elif prompt is not None and prompt.strip():
        try:
            labels = [label_for_prompt(prompt, n_classes)]
        except InvalidRequest as e:
            raise APIError(INVALID, str(e), field="prompt") from e
        text = prompt
    else:
        raise APIError(INVALID, f"a class-conditional model needs a class: {HOW}", field="class_label")
    return text, tuple(labels), num_images, schedule


def _same_class_or_refuse(prompt: str, labels: list[int], n_classes: int) -> None:
    """``class_label`` with a ``prompt``: accepted only when the prompt names that very class (every image's)."""
    try:
        named: int | None = label_for_prompt(prompt, n_classes)
    except InvalidRequest:
        named = None
    if named is not None and set(labels) == {named}:
        return
    what = f"names class {named}" if named is not None else "is not exactly one ImageNet class name"
    raise APIError(INVALID, f"class_label and prompt both given, and they disagree: class_label is "
                            f"{labels[0] if len(labels) == 1 else labels} but prompt {prompt!r} {what}; give one of "
                            "class_label or prompt", field="class_label")


def expand_labels(labels: tuple[int, ...], num_images: int) -> tuple[int, ...]:
    """One label for K images -> K copies; a list already has one per image."""
    return labels * num_images if len(labels) == 1 else labels
