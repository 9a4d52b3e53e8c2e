"""Synthetic scenes for the embedded demo model: flat shapes on white, with captions.

Grammar (issue 5): ``a {color} {shape}``, ``a {color} {shape} in the {position}``,
``a {color} {shape} and a {color} {shape}`` (the first-named object is the left one). Shapes are axis-aligned
squares, upward triangles (apex at the top centre) and circles, 20-40 % of the image side.

Everything is a pure function of a seed (``numpy.random.default_rng``), so the same seed gives the same bytes.

Held-out split: a few color-shape pairs never appear in single-object training captions (they do appear
inside two-object captions, so the words are not unknown), and some ordered two-object combinations never
appear at all. ``caption_split`` and ``evaluation_captions`` expose both halves.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
WHITE = (255, 255, 255)
IMAGE_SIZE = 64
SIZE_RANGE = (0.20, 0.40)  # shape extent as a fraction of the image side

# (x, y) centre of each named position, as a fraction of the side.
POSITION_CENTERS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
POSITION_JITTER = 0.03

# Color-shape pairs never used in single-object training captions.
HELD_OUT_PAIRS = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("purple", "triangle"), ("orange", "circle")}
)


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """A caption and what it asks for. ``position`` is None when not specified (or two objects)."""

    objects: tuple[Obj, ...]
    position: str | None = None

    @property
    def caption(self) -> str:
        if len(self.objects) == 2:
            a, b = self.objects
            return f"a {a.color} {a.shape} and a {b.color} {b.shape}"
        (a,) = self.objects
        if self.position is None:
            return f"a {a.color} {a.shape}"
        return f"a {a.color} {a.shape} in the {self.position}"


def all_pairs() -> list[Obj]:
    return [Obj(c, s) for c in COLORS for s in SHAPES]


def _two_object_held_out(a: Obj, b: Obj) -> bool:
    """A fixed ~11 % of the ordered two-object combinations (deterministic, independent of the seed)."""
    ia = list(COLORS).index(a.color) * 3 + SHAPES.index(a.shape)
    ib = list(COLORS).index(b.color) * 3 + SHAPES.index(b.shape)
    return (ia * 7 + ib * 5) % 9 == 4


def caption_split() -> tuple[list[Scene], list[Scene]]:
    """(train scenes, held-out scenes): every caption of the grammar, split as described in the module doc."""
    train: list[Scene] = []
    held: list[Scene] = []
    for o in all_pairs():
        target = held if (o.color, o.shape) in HELD_OUT_PAIRS else train
        target.append(Scene((o,)))
        target.extend(Scene((o,), p) for p in POSITIONS)
    for a, b in itertools.product(all_pairs(), repeat=2):
        if a == b:
            continue
        (held if _two_object_held_out(a, b) else train).append(Scene((a, b)))
    return train, held


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, rgb) -> None:
    h = size / 2.0
    x0, y0, x1, y1 = cx - h, cy - h, cx + h, cy + h
    if shape == "square":
        draw.rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 0.5, y1 - 1), (x0, y1 - 1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` with random size/placement from ``rng`` (position follows the caption)."""
    img = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(img)
    lo, hi = SIZE_RANGE
    if len(scene.objects) == 1:
        (o,) = scene.objects
        pos = scene.position or POSITIONS[int(rng.integers(len(POSITIONS)))]
        fx, fy = POSITION_CENTERS[pos]
        fx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        fy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        s = rng.uniform(lo, hi)
        _draw_shape(draw, o.shape, fx * size, fy * size, s * size, COLORS[o.color])
    else:
        for k, o in enumerate(scene.objects):
            s = rng.uniform(lo, hi)
            # left object centred in the left half, right object in the right half; no overlap possible
            fx = (0.25 if k == 0 else 0.75) + rng.uniform(-0.03, 0.03)
            fy = rng.uniform(0.5 - (0.5 - s / 2 - 0.04), 0.5 + (0.5 - s / 2 - 0.04))
            _draw_shape(draw, o.shape, fx * size, fy * size, s * size, COLORS[o.color])
    return img


def sample_scenes(n: int, seed: int, scenes: list[Scene] | None = None) -> list[Scene]:
    """``n`` training scenes, balanced: 1/3 plain single, 1/3 positioned single, 1/3 two objects."""
    if scenes is None:
        scenes = caption_split()[0]
    rng = np.random.default_rng([seed, 1])
    groups = [
        [s for s in scenes if len(s.objects) == 1 and s.position is None],
        [s for s in scenes if len(s.objects) == 1 and s.position is not None],
        [s for s in scenes if len(s.objects) == 2],
    ]
    groups = [g for g in groups if g]
    out = []
    for i in range(n):
        g = groups[i % len(groups)]
        out.append(g[int(rng.integers(len(g)))])
    return out


def make_dataset(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str], list[Scene]]:
    """(uint8 images (n, size, size, 3), captions, scenes) for training; deterministic in ``seed``."""
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng([seed, 2])
    images = np.stack([np.asarray(render(s, rng, size)) for s in scenes])
    return images, [s.caption for s in scenes], scenes


def evaluation_captions(n_per_group: int = 24, seed: int = 0) -> dict[str, list[Scene]]:
    """Fixed evaluation sets: seen/held-out x (single plain, single positioned, two objects)."""
    train, held = caption_split()
    rng = np.random.default_rng([seed, 3])
    out: dict[str, list[Scene]] = {}
    for split, scenes in (("seen", train), ("heldout", held)):
        groups = {
            "single": [s for s in scenes if len(s.objects) == 1 and s.position is None],
            "position": [s for s in scenes if len(s.objects) == 1 and s.position is not None],
            "two": [s for s in scenes if len(s.objects) == 2],
        }
        for name, g in groups.items():
            idx = rng.permutation(len(g))[: min(n_per_group, len(g))]
            out[f"{split}/{name}"] = [g[i] for i in sorted(idx)]
    return out


def corpus() -> list[str]:
    """Every caption of the grammar (train and held out), for building the tokenizer."""
    train, held = caption_split()
    return [s.caption for s in train + held]
