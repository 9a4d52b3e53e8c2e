"""A small detector for the demo scenes: finds flat coloured blobs on white and checks a caption.

Colour: nearest palette colour of the non-white pixels (majority vote per blob). Blobs: 4-connected
components of the non-white mask, tiny ones dropped. Shape: from the blob's fill ratio and its width profile
(square: full width at top and bottom; triangle: narrow top, wide bottom; circle: narrow at both ends).
Position: the centroid (quadrant, or centre when near the middle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from bitdance_core.demo.data import COLORS, Scene

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)
MIN_AREA_FRAC = 0.008  # blobs smaller than this fraction of the image are noise
CENTER_RADIUS = 0.14


@dataclass
class Blob:
    color: str
    shape: str
    cx: float  # centroid, fraction of the width
    cy: float
    area: int

    @property
    def position(self) -> str:
        if abs(self.cx - 0.5) < CENTER_RADIUS and abs(self.cy - 0.5) < CENTER_RADIUS:
            return "center"
        return ("top" if self.cy < 0.5 else "bottom") + " " + ("left" if self.cx < 0.5 else "right")


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat indices."""
    h, w = mask.shape
    flat = mask.ravel()
    seen = np.zeros(h * w, dtype=bool)
    comps = []
    for start in np.flatnonzero(flat):
        if seen[start]:
            continue
        stack = [start]
        seen[start] = True
        members = []
        while stack:
            p = stack.pop()
            members.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - 1, x > 0), (p + 1, x < w - 1), (p - w, y > 0), (p + w, y < h - 1)):
                if ok and flat[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        comps.append(np.array(members))
    return comps


def _shape(ys: np.ndarray, xs: np.ndarray) -> str:
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    fill = len(ys) / float(bh * bw)

    def width_at(frac: float) -> float:
        row = y0 + int(round(frac * (bh - 1)))
        sel = ys == row
        return (xs[sel].max() - xs[sel].min() + 1) / bw if sel.any() else 0.0

    top, mid, bottom = width_at(0.15), width_at(0.5), width_at(0.85)
    if bottom - top > 0.3 and fill < 0.75:
        return "triangle"
    if fill > 0.88 and min(top, bottom) > 0.85:
        return "square"
    if fill < 0.6:
        return "triangle"
    return "circle" if mid >= max(top, bottom) else "square"


def detect(image: Image.Image | np.ndarray) -> list[Blob]:
    """Blobs of an RGB image (largest first)."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    h, w, _ = a.shape
    d_white = np.linalg.norm(a - 255.0, axis=-1)
    d_pal = np.linalg.norm(a[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (h, w, colors)
    label = d_pal.argmin(-1)
    mask = d_white > np.minimum(d_pal.min(-1), 120.0)
    blobs = []
    for comp in _components(mask):
        if len(comp) < MIN_AREA_FRAC * h * w:
            continue
        ys, xs = np.divmod(comp, w)
        color = _NAMES[int(np.bincount(label.ravel()[comp], minlength=len(_NAMES)).argmax())]
        blobs.append(
            Blob(color, _shape(ys, xs), (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h, int(len(comp)))
        )
    blobs.sort(key=lambda b: -b.area)
    return blobs


@dataclass
class Score:
    """Per-caption correctness. For two-object captions ``color``/``shape`` mean both objects right on that
    attribute, ``position`` means the first-named object is left of the second, ``all`` everything."""

    color: bool
    shape: bool
    position: bool
    count: bool
    all: bool


def score(image: Image.Image | np.ndarray, scene: Scene) -> Score:
    blobs = detect(image)
    n = len(scene.objects)
    if n == 1:
        (o,) = scene.objects
        if not blobs:
            return Score(False, False, False, False, False)
        b = blobs[0]
        count = len(blobs) == 1
        color, shape = b.color == o.color, b.shape == o.shape
        position = True if scene.position is None else b.position == scene.position
        return Score(color, shape, position, count, color and shape and position and count)
    if len(blobs) < 2:
        return Score(False, False, False, False, False)
    left, right = sorted(blobs[:2], key=lambda b: b.cx)
    a, b = scene.objects
    color = left.color == a.color and right.color == b.color
    shape = left.shape == a.shape and right.shape == b.shape
    position = right.cx - left.cx > 0.15
    count = len(blobs) == 2
    return Score(color, shape, position, count, color and shape and position and count)
