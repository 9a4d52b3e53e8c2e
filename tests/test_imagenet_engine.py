"""Class-conditional requests in the batching engine: golden alone and mixed with other class-conditional requests
(other labels, seeds, steps, guidance, schedules, joining mid-run), batched == single-request pipeline, the 1x
code path, the shared null-class prefix, previews, cancel and the validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.engine.recorded_graph import RecordingBackend
from bitdance_core.engine.serving_config import InvalidRequest
from bitdance_core.families.class_conditional.family import NULL_KEY
from bitdance_core.families.class_conditional.loader import load_class_model
from bitdance_core.families.class_conditional.pipeline import ClassConditionalPipeline
from bitdance_core.families.class_conditional.random_checkpoint import write_class_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "reference-imagenet-tiny-a"
CASES = json.loads((FIXTURE / "golden.json").read_text())["cases"]


@pytest.fixture(scope="module")
def model():
    return load_class_model(FIXTURE / "BitDance_tiny_a_4x.pt", "cpu", model_args=FIXTURE / "model_args_4x.json")


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURE / "golden.safetensors")


def request(rid: str, labels, seed: int, steps: int, guidance: float, schedule: str = "linear", **kw):
    return GenerationRequest(rid, "", 256, 256, seed=seed, steps=steps, guidance_scale=guidance,
                             num_images=len(labels), class_label=tuple(labels), cfg_schedule=schedule,
                             preview_every=kw.pop("preview_every", 0), **kw)


def case_request(i: int, rid: str | None = None) -> GenerationRequest:
    c = CASES[i]
    return request(rid or f"case{i}", c["labels"], c["seed"], c["sample_steps"], c["cfg_scale"], c["cfg_schedule"])


def run(engine: Engine, requests, join: dict[int, list] | None = None) -> tuple[dict, dict, list[int]]:
    """Run to completion; ``join[k]`` requests are added before step ``k``."""
    results, events, batches = {}, {}, []
    for r in requests:
        engine.add_request(r)
    for k in range(10_000):
        for r in (join or {}).pop(k, []):
            engine.add_request(r)
        if not engine.has_work() and not join:
            break
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
            if ev.kind in (EventKind.COMPLETED, EventKind.FAILED):
                results[ev.request_id] = ev
        batches.append(engine.last_batch)
    assert not engine.has_work()
    return results, events, batches


def assert_case(ev, golden, i: int) -> None:
    assert ev.kind is EventKind.COMPLETED, ev.data
    assert torch.equal(ev.data["tokens"], golden[f"case{i}.tokens"])
    diff = np.abs(ev.data["images"].astype(int) - golden[f"case{i}.image"].numpy().astype(int))
    assert diff.max() <= 1


def test_golden_alone(model, golden):
    for i in range(len(CASES)):
        results, _, batches = run(Engine(model, EngineConfig(max_batch_requests=4)), [case_request(i)])
        assert set(batches) == {1}
        assert_case(results[f"case{i}"], golden, i)


def make_engine(model, graphs: str, **cfg) -> Engine:
    """``graphs="standin"``: CUDA graphs on, on CPU, through the recording stand-in (recorded_graph.py)."""
    engine = Engine(model, EngineConfig(**cfg))
    if graphs == "standin":
        engine.runner.set_graph_backend(RecordingBackend())
    return engine


@pytest.mark.slow  # over 40 s at load 10: the CI gate runs it, make test-fast does not
@pytest.mark.parametrize("graphs", ["eager", "standin"])
def test_golden_mixed_with_other_class_requests(model, golden, graphs):
    """The three golden cases share steps with requests of other labels, seeds, step counts, guidance and
    schedules, some joining mid-run; every one equals its single-request pipeline result."""
    others = [request("o1", [207, 360], seed=3, steps=5, guidance=3.0, schedule="constant"),
              request("o2", [999], seed=11, steps=4, guidance=1.0),
              request("o3", [1, 1], seed=0, steps=8, guidance=4.0)]
    late = [case_request(2, "late2"), request("o4", [42], seed=9, steps=3, guidance=2.0)]
    engine = make_engine(model, graphs, max_batch_requests=8)
    results, _, batches = run(engine, [case_request(0), case_request(1), *others], join={5: late})
    assert max(batches) >= 5
    assert graphs == "eager" or (engine.runner.graphs.captures and not engine.runner.graphs.failed)
    assert_case(results["case0"], golden, 0)
    assert_case(results["case1"], golden, 1)
    assert_case(results["late2"], golden, 2)
    pipe = ClassConditionalPipeline(model)
    for r in [*others, late[1]]:
        want = pipe(list(r.class_label), seed=r.seed, steps=r.steps, guidance_scale=r.guidance_scale,
                    cfg_schedule=r.cfg_schedule)
        got = results[r.request_id]
        assert got.kind is EventKind.COMPLETED, got.data
        assert torch.equal(got.data["tokens"], want.tokens), r.request_id
        assert np.abs(got.data["images"].astype(int) - want.pixels.numpy().astype(int)).max() <= 1


def test_null_prefix_shared_and_labels_prefilled_once(model):
    engine = Engine(model, EngineConfig(max_batch_requests=8))
    calls = []
    fam = engine.family
    orig = fam.prefix_embeddings
    fam.prefix_embeddings = lambda p: calls.append(p) or orig(p)
    run(engine, [request("a", [5, 5, 6], seed=1, steps=2, guidance=3.0),
                 request("b", [7], seed=2, steps=2, guidance=3.0)])
    assert sorted(calls) == [5, 6, 7, 1000]  # one null-class prefill for both requests, label 5 once
    assert NULL_KEY in engine.runner.prefix_cache
    calls.clear()
    run(engine, [request("c", [8], seed=2, steps=2, guidance=3.0)])
    assert calls == [8]  # the null prefix comes from the cache


@pytest.mark.slow  # over 40 s at load 10: the CI gate runs it, make test-fast does not
def test_prompt_names_a_class(model):
    engine = Engine(model, EngineConfig())
    r = GenerationRequest("p", "Goldfish", 256, 256, seed=4, steps=2, guidance_scale=2.0, num_images=2)
    results, _, _ = run(engine, [r])
    want = ClassConditionalPipeline(model)([1, 1], seed=4, steps=2, guidance_scale=2.0)
    assert torch.equal(results["p"].data["tokens"], want.tokens)


@pytest.mark.parametrize("kw, field, needle", [
    ({"class_label": (1, 2), "num_images": 3}, "class_label", "2 labels but num_images is 3"),
    ({"class_label": (1000,)}, "class_label", "0..999"),
    ({"prompt": "a photo of a cat"}, "prompt", "not an ImageNet class name"),
    ({"prompt": ""}, "class_label", "needs class_label"),
    ({"class_label": (1,), "height": 512, "width": 512}, "size", "256x256 only"),
    ({"class_label": (1,), "cfg_schedule": "cosine"}, "cfg_schedule", "linear"),
    ({"class_label": (1,), "negative_prompt": "blurry"}, "negative_prompt", "null class"),
])
def test_invalid_requests_name_the_field(model, kw, field, needle):
    engine = Engine(model, EngineConfig())
    base = {"request_id": "x", "prompt": "", "height": 256, "width": 256, "seed": 0, "steps": 2}
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(GenerationRequest(**{**base, **kw}))
    assert e.value.field == field and needle in str(e.value)
    assert not engine.has_work()


def test_previews_and_cancel(model):
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    engine.add_request(request("prev", [3], seed=1, steps=2, guidance=3.0, preview_every=16))
    engine.add_request(request("gone", [4, 5], seed=1, steps=2, guidance=3.0))
    kinds: dict[str, list] = {}
    for k in range(200):
        if k == 3:
            assert engine.cancel("gone").data["code"] == "cancelled"
            assert engine.scheduler.used_rows == 2
        if not engine.has_work():
            break
        for ev in engine.step():
            kinds.setdefault(ev.request_id, []).append(ev)
    previews = [e for e in kinds["prev"] if e.kind is EventKind.PREVIEW]
    assert [e.data["step"] for e in previews] == [16, 32, 48]
    assert previews[0].data["images"].shape == (1, 256, 256, 3)
    assert kinds["prev"][-1].kind is EventKind.COMPLETED
    assert all(e.kind is not EventKind.COMPLETED for e in kinds["gone"])
    assert engine.scheduler.used_rows == 0


@pytest.mark.slow  # over 40 s at load 10: the CI gate runs it, make test-fast does not
@pytest.mark.parametrize("graphs", ["eager", "standin"])
def test_next_token_model_in_the_engine(tmp_path, graphs):
    """The 1x code path (256 AR steps of one token, MlpEncoder head): batched == single."""
    model = load_class_model(write_class_checkpoint("imagenet-tiny-1x", tmp_path, seed=0), "cpu")
    reqs = [request("a", [5, 998], seed=7, steps=2, guidance=3.0), request("b", [12], seed=1, steps=3, guidance=1.5,
                                                                           schedule="constant")]
    results, _, _ = run(make_engine(model, graphs, max_batch_requests=4), reqs)
    pipe = ClassConditionalPipeline(model)
    for r in reqs:
        want = pipe(list(r.class_label), seed=r.seed, steps=r.steps, guidance_scale=r.guidance_scale,
                    cfg_schedule=r.cfg_schedule)
        assert torch.equal(results[r.request_id].data["tokens"], want.tokens)


def test_info(model):
    info = Engine(model, EngineConfig()).info()
    assert info["kind"] == "class-conditional" and info["num_classes"] == 1000
    assert info["defaults"]["steps"] == 100 and info["defaults"]["cfg_schedule"] == "linear"
    assert info["size"] == [256, 256] and info["sizes"] == [[256, 256]]
    assert info["class_names"][207] == "golden retriever"


def test_a_request_without_steps_or_guidance_gets_the_served_defaults(model):
    """In-process callers get what HTTP gets: the class family's 100 steps, not the text-to-image 50."""
    engine = Engine(model, EngineConfig())
    ev = engine.add_request(GenerationRequest("d", "", 256, 256, seed=1, class_label=(1,)))
    st = engine.requests[ev.request_id]
    assert engine.serving.default_steps == 100
    assert (st.req.steps, st.req.guidance_scale) == (100, engine.serving.default_guidance)
