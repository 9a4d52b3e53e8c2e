"""Reproducibility: a request's noise comes from its own generator; the global RNGs are never touched."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdance_core.families.text_to_image.pipeline import BitDancePipeline

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"
ARGS = dict(prompt="a green triangle", height=64, width=64, steps=3, guidance_scale=4.0)


@pytest.fixture(scope="module")
def pipe() -> BitDancePipeline:
    return BitDancePipeline.from_pretrained(FIXTURE, device="cpu")


def test_same_seed_same_image(pipe):
    a, b = pipe(**ARGS, seed=11), pipe(**ARGS, seed=11)
    assert torch.equal(a.tokens, b.tokens)
    assert a.images[0].tobytes() == b.images[0].tobytes()


def test_different_seed_different_image(pipe):
    a, b = pipe(**ARGS, seed=11), pipe(**ARGS, seed=12)
    assert not torch.equal(a.tokens, b.tokens)
    assert a.images[0].tobytes() != b.images[0].tobytes()


def test_images_of_one_request_differ(pipe):
    two = pipe(**ARGS, seed=3, num_images=2)
    assert two.tokens.shape[0] == 2 and len(two.images) == 2
    assert not torch.equal(two.tokens[0], two.tokens[1])


def test_global_rng_untouched(pipe):
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    pipe(**ARGS, seed=5)
    pipe(**ARGS, seed=None)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(np.random.get_state(), np_state))
    assert random.getstate() == py_state


def test_global_seed_does_not_change_the_result(pipe):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = pipe(**ARGS, seed=21)
        torch.manual_seed(999)
        b = pipe(**ARGS, seed=21)
    assert torch.equal(a.tokens, b.tokens)


def test_random_seed_is_reported_and_reproducible(pipe):
    a = pipe(**ARGS, seed=None)
    b = pipe(**ARGS, seed=None)
    assert isinstance(a.seed, int) and a.seed != b.seed
    again = pipe(**ARGS, seed=a.seed)
    assert torch.equal(a.tokens, again.tokens)


def test_progress_callback(pipe):
    calls = []
    pipe(**ARGS, seed=1, callback=lambda s, t: calls.append((s, t)))
    T = (64 // 16) * (64 // 16) // 4
    assert calls == [(s, T) for s in range(1, T + 1)]
