"""ImageNet-1k class names (``imagenet_classes.txt``: line ``i`` names label ``i``, torchvision's short names).

A prompt names a class when it equals one of these names exactly, ignoring case and surrounding white space. Two
names are shared by two labels each (``crane`` 134 / 517, ``maillot`` 638 / 639): such a prompt is ambiguous and
the error lists both labels.
"""

from __future__ import annotations

import functools
from importlib import resources

from ...engine.serving_config import InvalidRequest

HOW = ("give class_label (an integer 0-999, or a list with one label per image), or a prompt that is exactly one "
       "ImageNet class name, e.g. \"golden retriever\" (GET /info lists them under class_names)")


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, tuple[int, ...]]:
    idx: dict[str, list[int]] = {}
    for i, n in enumerate(class_names()):
        idx.setdefault(n.casefold(), []).append(i)
    return {k: tuple(v) for k, v in idx.items()}


def label_for_prompt(prompt: str, num_classes: int = 1000, field: str = "prompt") -> int:
    """The label a prompt names, or ``InvalidRequest`` saying how to give one."""
    if num_classes != 1000:
        raise InvalidRequest(f"this model has {num_classes} classes without names; {field} cannot name one: give "
                             f"class_label (an integer 0-{num_classes - 1})", field=field)
    hits = _index().get(prompt.strip().casefold(), ())
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise InvalidRequest(f"{field} {prompt!r} names several ImageNet classes ({', '.join(map(str, hits))}); "
                             "give class_label instead", field=field)
    raise InvalidRequest(f"{field} {prompt!r} is not an ImageNet class name; {HOW}", field=field)
