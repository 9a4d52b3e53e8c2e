"""The CUDA tier, on CPU: the engine's real CUDA code on fake ``cuda`` tensors (``tests/cuda_standins.py``).

For each family (text-to-image tiny, class-conditional 1x, next-patch 4x) in bfloat16 with CUDA graphs on, on
``cuda:0`` and on ``cuda:1`` (the second worker of ``--devices cuda:0,cuda:1``), a worker starts as it does on a
GPU (``worker.build_engine``: bind the device, load, ``plan_on_device``, warm up, the warm max-batch check), then
serves: admission, AR steps of requests with different step counts and sizes, a cancel, final decodes and
previews. Every tensor a step creates is on the worker's device, and in the planned dtype or float32
(``DeviceCheck``); every stream, graph capture, pinned buffer and generator belongs to the worker's device.
"""

from __future__ import annotations

import json
import time
from unittest import mock

import pytest
import torch
from cuda_standins import DeviceCheck, fake_cuda

from bitdance_core.engine.protocol import EventKind, GenerationRequest, WorkerConfig
from bitdance_core.families.class_conditional import family as class_family
from bitdance_core.families.class_conditional.random_checkpoint import (
    CLASS_PRESETS,
    TINY,
    TINY_DDCONFIG,
    ClassPreset,
    write_class_checkpoint,
)
from bitdance_core.families.text_to_image.random_checkpoint import write_checkpoint
from bitdance_core.worker.worker import build_engine

FAMILIES = ("text-to-image", "class-conditional-1x", "next-patch-4x")


STEPS = 3  # the served default step count (warm-up runs it): few steps keep the tier quick


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny presets; the class-conditional ones at 64x64 (16 tokens: 16 AR steps at 1x, 4 at 4x)."""
    root = tmp_path_factory.mktemp("cuda-tier")
    t2i = write_checkpoint("tiny", root / "t2i", seed=0)
    (t2i / "serving_config.json").write_text(json.dumps({"default_steps": STEPS}))
    small = {"tier-1x": ClassPreset("BitDance_tiny_1x.pt", "BitDance-Tiny", {**TINY, "image_size": 64}, 1, 4,
                                    TINY_DDCONFIG),
             "tier-4x": ClassPreset("BitDance_tiny_4x.pt", "BitDance-Tiny", {**TINY, "image_size": 64}, 4, 4,
                                    TINY_DDCONFIG)}
    with mock.patch.dict(CLASS_PRESETS, small):
        return {"text-to-image": str(t2i),
                "class-conditional-1x": str(write_class_checkpoint("tier-1x", root / "c1", seed=0)),
                "next-patch-4x": str(write_class_checkpoint("tier-4x", root / "c4", seed=0))}


def _requests(family: str, engine) -> list[GenerationRequest]:
    """Mixed step counts, sizes (text-to-image) and image counts, guided and not, previews on."""
    if family == "text-to-image":
        (h0, w0), (h1, w1) = sorted(engine.sizes.allowed())[:2]
        return [GenerationRequest("a", "a red fox", h0, w0, seed=1, steps=2, guidance_scale=3.0, preview_every=1),
                GenerationRequest("b", "a blue cat", h1, w1, seed=2, steps=3, guidance_scale=1.0, num_images=2,
                                  preview_every=2),
                GenerationRequest("c", "cancelled", h0, w0, seed=3, steps=2, guidance_scale=2.0)]
    h, w = engine.serving.default_size
    return [GenerationRequest("a", "", h, w, seed=1, steps=2, guidance_scale=4.0, class_label=(3,), preview_every=1),
            GenerationRequest("b", "", h, w, seed=2, steps=3, guidance_scale=2.0, num_images=2, class_label=(1, 7),
                              cfg_schedule="constant", preview_every=3),
            GenerationRequest("c", "", h, w, seed=3, steps=2, guidance_scale=1.0, class_label=(5,))]


# ~40 CPU-s each: make test-fast runs one (next-patch 4x on the second device, at most 2 requests a batch: fewer
# row buckets, fewer graphs to capture on fake tensors; ~15 s, text-to-image ~21 s), the CI gate all six at 4
SLOW = pytest.mark.slow
FAST = ("next-patch-4x", "cuda:1")


@pytest.mark.parametrize("family, device", [
    pytest.param(family, device, marks=() if (family, device) == FAST else SLOW)
    for family in FAMILIES for device in ("cuda:0", "cuda:1")])
def test_worker_on_cuda(checkpoints, family, device):
    t0 = time.process_time()
    dev = torch.device(device)
    sizes = ((64, 64), (64, 128)) if family == "text-to-image" else None
    batch = 2 if (family, device) == FAST else 4
    from bitdance_core.engine.engine_config import EngineConfig

    config = WorkerConfig(model_dir=checkpoints[family], device=device, dtype="bfloat16", sizes=sizes,
                          engine=EngineConfig(cuda_graphs="on", max_batch_requests=batch, preview_every=0),
                          worker_index=dev.index)
    check = DeviceCheck(dev, torch.bfloat16)  # also while warming up: that is when the graphs are captured
    with fake_cuda(devices=2) as cuda, mock.patch.object(class_family, "DEFAULT_STEPS", STEPS):
        with check:
            engine = build_engine(config)  # bind, load, plan_on_device, warm-up, the warm max-batch check
        assert cuda.current == dev.index, "the worker did not make its device current (torch.cuda.set_device)"
        assert engine.device == dev and engine.runner.use_graphs
        assert engine.family.prior.dtype == torch.bfloat16 and engine.cache.k.dtype == torch.bfloat16
        assert engine.cache.k.device == dev
        plan = engine.memory_plan
        assert plan.fits and plan.max_concurrent_requests >= 1 and plan.kv_bytes > 0
        assert plan.device == "cuda", "the plan measured the CPU code path"
        assert plan.graph_pool_bytes > 0, "the graph pool is not in the plan"

        events: dict[str, list] = {}
        with check:
            reqs = _requests(family, engine)
            for r in reqs:
                engine.add_request(r)
            for _ in range(2):
                for ev in engine.step():
                    events.setdefault(ev.request_id, []).append(ev)
            assert engine.cancel("c") is not None
            for _ in range(10_000):
                if not engine.has_work():
                    break
                for ev in engine.step():
                    events.setdefault(ev.request_id, []).append(ev)
        kinds = {rid: [e.kind for e in evs] for rid, evs in events.items()}
        for rid in ("a", "b"):
            assert kinds[rid][-1] is EventKind.COMPLETED, (rid, kinds[rid])
            done = events[rid][-1].data
            req = next(r for r in reqs if r.request_id == rid)
            assert done["images"].shape == (req.num_images, req.height, req.width, 3)
            assert EventKind.PREVIEW in kinds[rid]
        assert EventKind.COMPLETED not in kinds.get("c", [])
        assert check.ops > 0 and torch.bfloat16 in check.dtypes

        assert cuda.captures and set(cuda.captures) == {dev.index}, \
            f"graphs captured on streams of cuda:{sorted(set(cuda.captures))}, the worker is on {device}"
        assert cuda.replays > 0
        assert set(cuda.streams) <= {dev.index}, f"streams made on cuda:{sorted(set(cuda.streams))}"
        assert set(cuda.pinned_for) <= {dev.index}, f"host memory pinned for cuda:{sorted(set(cuda.pinned_for))}"
        assert cuda.generators and set(cuda.generators) == {dev.index}
    assert time.process_time() - t0 < 60, "the tier must stay quick: tiny models, few steps"  # CPU seconds
