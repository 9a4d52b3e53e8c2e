"""Demo scenes: determinism, the held-out split, and the detector on ground truth."""

from __future__ import annotations

import hashlib

import numpy as np

from bitdance_core.demo import data
from bitdance_core.demo.score import detect, score


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def test_same_seed_same_bytes():
    a, ca, _ = data.make_dataset(64, seed=3)
    b, cb, _ = data.make_dataset(64, seed=3)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 64, 3)
    assert _digest(a) == _digest(b) and ca == cb
    c, cc, _ = data.make_dataset(64, seed=4)
    assert _digest(a) != _digest(c)


def test_captions_follow_the_grammar():
    _, caps, scenes = data.make_dataset(300, seed=0)
    for cap, sc in zip(caps, scenes):
        assert cap == sc.caption
        words = cap.split()
        assert words[0] == "a" and words[1] in data.COLORS and words[2] in data.SHAPES
        if len(sc.objects) == 2:
            assert words[3:5] == ["and", "a"] and words[5] in data.COLORS and words[6] in data.SHAPES
        elif sc.position is not None:
            assert cap.endswith(f" in the {sc.position}")
    kinds = {(len(s.objects), s.position is None) for s in scenes}
    assert kinds == {(1, True), (1, False), (2, True)}


def test_held_out_split_is_disjoint_and_unseen():
    train, held = data.caption_split()
    train_caps = {s.caption for s in train}
    assert not train_caps & {s.caption for s in held}
    single_pairs = {(o.color, o.shape) for s in train if len(s.objects) == 1 for o in s.objects}
    assert not single_pairs & data.HELD_OUT_PAIRS
    assert any(len(s.objects) == 2 for s in held)
    _, caps, _ = data.make_dataset(500, seed=1)
    assert set(caps) <= train_caps
    sets = data.evaluation_captions(8)
    assert all(sets[k] for k in sets)


def test_detector_on_ground_truth():
    images, _, scenes = data.make_dataset(150, seed=11)
    results = [score(im, sc) for im, sc in zip(images, scenes)]
    assert np.mean([r.all for r in results]) >= 0.99
    blobs = detect(np.full((64, 64, 3), 255, np.uint8))
    assert blobs == []


def test_detector_rejects_wrong_captions():
    rng = np.random.default_rng(0)
    sc = data.Scene((data.Obj("red", "circle"),), "top left")
    img = data.render(sc, rng)
    assert score(img, sc).all
    assert not score(img, data.Scene((data.Obj("blue", "circle"),), "top left")).color
    assert not score(img, data.Scene((data.Obj("red", "square"),), "top left")).shape
    assert not score(img, data.Scene((data.Obj("red", "circle"),), "bottom right")).position
    two = data.Scene((data.Obj("green", "square"), data.Obj("yellow", "triangle")))
    img2 = data.render(two, rng)
    assert score(img2, two).all
    swapped = data.Scene((data.Obj("yellow", "triangle"), data.Obj("green", "square")))
    assert not score(img2, swapped).all
