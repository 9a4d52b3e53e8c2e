"""The HTTP server on a class-conditional checkpoint (the shared fixture ``reference-imagenet-tiny-a``), real uvicorn +
the real worker on loopback: ``/info`` kind and defaults, ``POST /generate`` with ``class_label`` (int or list),
class-name prompts, ``cfg_schedule``, golden images through HTTP (the fixture's three cases, sent at once so they
share engine steps), the 422s; and ``class_label`` refused by a text-to-image server."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from server_harness import LiveServer, decode_b64, iter_sse, real_worker_available

pytestmark = [pytest.mark.skipif(not real_worker_available(), reason="needs the real worker")]
FIXTURE = Path(__file__).parent / "fixtures" / "reference-imagenet-tiny-a"
CASES = json.loads((FIXTURE / "golden.json").read_text())["cases"]


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    server = LiveServer("--model", str(FIXTURE / "BitDance_tiny_a_4x.pt"), "--model-args",
                        str(FIXTURE / "model_args_4x.json"), "--devices", "cpu", "--max-batch-requests", "8",
                        fake=False)
    try:
        server.wait_ready(180)
        yield server
    finally:
        server.kill()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(decode_b64(b64))).convert("RGB"))


@pytest.mark.slow
def test_info(srv):
    info = srv.info()
    assert info["kind"] == "class-conditional" and info["num_classes"] == 1000
    assert info["size"] == "256x256" and info["sizes"] == ["256x256"]
    assert info["defaults"]["steps"] == 100 and info["defaults"]["cfg_schedule"] == "linear"
    assert info["defaults"]["guidance_scale"] == 4.0  # not a released file: the fallback default
    assert info["class_names"][360] == "otter" and info["cfg_schedules"] == ["linear", "constant"]


@pytest.mark.slow
def test_golden_cases_over_http_concurrently(srv):
    golden = load_file(FIXTURE / "golden.safetensors")

    def post(c):
        body = {"class_label": c["labels"], "seed": c["seed"], "steps": c["sample_steps"],
                "guidance_scale": c["cfg_scale"], "cfg_schedule": c["cfg_schedule"]}
        with srv.client(timeout=300) as cl:
            return cl.post("/generate", json=body)

    with ThreadPoolExecutor(3) as ex:
        responses = list(ex.map(post, CASES))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["seed"] == CASES[i]["seed"] and (body["width"], body["height"]) == (256, 256)
        assert len(body["images"]) == len(CASES[i]["labels"])  # num_images from the list's length
        got = np.stack([pixels(im["b64_json"]) for im in body["images"]])
        assert np.abs(got.astype(int) - golden[f"case{i}.image"].numpy().astype(int)).max() <= 1


@pytest.mark.slow
def test_prompt_naming_a_class_equals_its_label(srv):
    common = {"seed": 3, "steps": 2, "guidance_scale": 2.0}
    with srv.client(timeout=300) as cl:
        a = cl.post("/generate", json={"prompt": "Otter", **common})
        b = cl.post("/generate", json={"class_label": 360, **common})
        c = cl.post("/generate", json={"class_label": 360, "cfg_schedule": "constant", **common})
    assert a.status_code == b.status_code == c.status_code == 200
    img = [pixels(x.json()["images"][0]["b64_json"]) for x in (a, b, c)]
    assert np.array_equal(img[0], img[1]) and not np.array_equal(img[1], img[2])


@pytest.mark.slow
def test_openai_client_with_a_class_name(srv):
    from openai import OpenAI  # imported here: ~2 CPU-s for every collecting test process

    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=300)
    res = client.images.generate(prompt="goldfish", n=2, size="256x256", extra_body={"steps": 2, "seed": 1})
    assert len(res.data) == 2 and pixels(res.data[0].b64_json).shape == (256, 256, 3)


@pytest.mark.slow
def test_streaming_previews(srv):
    with srv.client(timeout=300) as cl, cl.stream("POST", "/generate", json={"class_label": 1, "steps": 2,
                                                                            "stream": True}) as r:
        events = [k for k, _ in iter_sse(r.iter_lines())]
    assert "preview" in events and events[-1] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("body, field", [
    ({"class_label": [1, 2], "num_images": 3}, "num_images"),
    ({"class_label": 1000}, "class_label"),
    ({"class_label": [1, -1]}, "class_label"),
    ({"class_label": []}, "class_label"),
    ({"prompt": "a cat on a sofa"}, "prompt"),
    ({"prompt": "crane"}, "prompt"),  # two classes share the name
    ({}, "class_label"),
    ({"class_label": 1, "cfg_schedule": "cosine"}, "cfg_schedule"),
    ({"class_label": 1, "width": 512, "height": 512}, "size"),
    ({"class_label": 1, "negative_prompt": "blur"}, "negative_prompt"),
    ({"class_label": "1"}, "class_label"),
    ({"class_label": 1, "prompt": "tench"}, "class_label"),  # two classes (1 is goldfish): both fields named
])
def test_invalid_requests_are_422_naming_the_field(srv, body, field):
    with srv.client() as cl:
        r = cl.post("/generate", json={"steps": 2, **body})
    assert r.status_code == 422, r.text
    text = json.dumps(r.json())
    assert field in text
    assert r.json()["error"]["field"] == field, text  # as the client sent it (not "class_label.int")
    if field == "prompt" or "prompt" in body:
        assert "class_label" in text and "prompt" in r.json()["error"]["message"]  # says how to give a label


def test_text_to_image_server_refuses_class_label():
    server = LiveServer("--devices", "cpu", fake=True)
    try:
        server.wait_ready(120)
        with server.client() as cl:
            assert server.info()["kind"] == "text-to-image"
            r = cl.post("/generate", json={"prompt": "x", "class_label": 3})
            s = cl.post("/generate", json={"prompt": "x", "cfg_schedule": "linear"})
            t = cl.post("/generate", json={"class_label": 3})
        assert r.status_code == s.status_code == t.status_code == 422
        assert r.json()["error"]["field"] == "class_label" and s.json()["error"]["field"] == "cfg_schedule"
        assert "text-to-image" in r.json()["error"]["message"]
    finally:
        server.kill()
