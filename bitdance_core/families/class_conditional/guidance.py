"""The class-conditional request's guidance per AR step (the reference's ``cfg_iter``) and its label check;
shared by the reference pipeline and the engine's family. Torch-free."""

from __future__ import annotations

from ...engine.serving_config import InvalidRequest
from .config import CFG_SCHEDULES


def guidance_at(step: int, ar_steps: int, scale: float, cfg_schedule: str) -> float:
    """Guidance of AR step ``step`` (the reference's ``cfg_iter``); 1.0 means unguided."""
    if scale <= 1.0:
        return 1.0
    if cfg_schedule == "constant":
        return scale
    if cfg_schedule == "linear":
        return 1.0 + (scale - 1.0) * step / ar_steps
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")


def check_labels(labels, num_classes: int) -> list[int]:
    if isinstance(labels, int):
        labels = [labels]
    labels = list(labels)
    if not labels:
        raise InvalidRequest("class_label must name at least one class", field="class_label")
    for x in labels:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_classes:
            raise InvalidRequest(f"class_label {x!r} is not an integer class in 0..{num_classes - 1}",
                                 field="class_label")
    return labels
