"""AUTOMATIC1111-compatible routes (issue 18 item 3) through the real ``webuiapi`` client against a live server:
the fake worker for the route behaviour (refusals, progress with previews and ETA, interrupt, options,
schemathesis), the real worker on a diffusers-layout checkpoint for image parity with ``/generate`` and with the
official-layout twin (issue 18 item 1, once through a real server)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from PIL import Image
from server_harness import REPO, LiveServer, decode_b64, real_worker_available, wait_for

from server.a1111_schemas import SAMPLER

if TYPE_CHECKING:
    import webuiapi

CONFIG = Path(__file__).with_name("schemathesis.toml")


def client(srv: LiveServer) -> webuiapi.WebUIApi:
    import webuiapi  # imported here, not at the top: ~1 CPU-s for every collecting test process

    return webuiapi.WebUIApi(baseurl=srv.url + "/sdapi/v1", sampler=SAMPLER, scheduler="automatic", steps=4)


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    server = LiveServer("--devices", "cpu", "--a1111-api", "--max-body-bytes", "100000",
                        env={"FAKE_WORKER_STEP_S": "0.002", "FAKE_WORKER_MAX_TOKENS": "1000000"})
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.kill()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.slow
def test_txt2img_through_webuiapi(srv):
    api = client(srv)
    r = api.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=1234, width=128, height=64, batch_size=2,
                    n_iter=2, cfg_scale=5.0, steps=3)
    assert len(r.images) == 4 and all(im.size == (128, 64) for im in r.images)
    assert r.info["seed"] == 1234 and r.info["all_seeds"] == [1234] * 4 and r.info["sampler_name"] == SAMPLER
    assert r.info["infotexts"][0] == r.images[0].info["parameters"]  # the PNG's own A1111 infotext
    assert "Seed: 1234" in r.info["infotexts"][0] and "Negative prompt: fog" in r.info["infotexts"][0]
    assert r.parameters["prompt"] == "a lighthouse" and r.parameters["batch_size"] == 2
    with srv.client() as c:  # the same request through /generate: the same pixels
        g = c.post("/generate", json={"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 1234, "width": 128,
                                      "height": 64, "num_images": 4, "guidance_scale": 5.0, "steps": 3}).json()
    for im, ref in zip(r.images, g["images"], strict=True):
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels(decode_b64(ref["b64_json"])))


@pytest.mark.slow
def test_random_seed_is_reported(srv):
    r = client(srv).txt2img(prompt="x", seed=-1, width=64, height=64)
    assert isinstance(r.info["seed"], int) and r.info["seed"] >= 0
    assert f"Seed: {r.info['seed']}," in r.images[0].info["parameters"]


@pytest.mark.slow
def test_send_images_false(srv):
    with srv.client() as c:
        body = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "send_images": False, "width": 64,
                                                 "height": 64}).json()
    assert body["images"] == [] and json.loads(body["info"])["seed"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("extra,field", [
    ({"sampler_name": "Euler a"}, "sampler_name"),
    ({"sampler_index": "DPM++ 2M"}, "sampler_index"),
    ({"scheduler": "Karras"}, "scheduler"),
    ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"s_churn": 1.0}, "s_churn"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
    ({"save_images": True}, "save_images"),
    ({"hr_cfg": 3.0}, "hr_cfg"),
    ({"override_settings": {"sd_model_checkpoint": "sd_xl_base_1.0"}}, "override_settings.sd_model_checkpoint"),
    ({"batch_size": 3, "n_iter": 2}, "batch_size"),
    ({"width": 512, "height": 512}, "width"),
    ({"cfg_scale": 99.0}, "cfg_scale"),
    ({"steps": 0}, "steps"),
])
def test_refusals_name_the_field(srv, extra, field):
    with srv.client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, **extra})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert field.split(".")[0] in (err.get("field") or "") + err["message"], err


@pytest.mark.slow
def test_webuiapi_defaults_refused_for_another_sampler(srv):
    import webuiapi

    api = webuiapi.WebUIApi(baseurl=srv.url + "/sdapi/v1")  # sampler "Euler a", as the client defaults
    with pytest.raises(RuntimeError, match="sampler_name"):
        api.txt2img(prompt="x", width=64, height=64)


@pytest.mark.slow
def test_models_and_options(srv):
    api = client(srv)
    models = api.get_sd_models()
    assert [m["title"] for m in models] == ["fake-tiny"]
    opts = api.get_options()
    assert opts["sd_model_checkpoint"] == "fake-tiny" and opts["samples_format"] == "png"
    assert api.util_get_current_model() == "fake-tiny"
    assert api.set_options({"sd_model_checkpoint": "fake-tiny"}) is None  # already current: accepted
    with srv.client() as c:
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "sd_model_checkpoint"
        assert c.post("/sdapi/v1/options", json={"sd_vae": "auto"}).status_code == 422


@pytest.mark.slow
def test_progress_with_preview_and_eta_then_interrupt(tmp_path):
    server = LiveServer("--devices", "cpu", "--a1111-api", "--sizes", "256x256",
                        env={"FAKE_WORKER_STEP_S": "0.2"})  # 64 patches x 0.2 s: ~13 s unless interrupted
    try:
        server.wait_ready(60)
        api = client(server)
        assert api.get_progress()["state"]["job_count"] == 0
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("r", _post_txt2img(server)))
        t.start()
        p = wait_for(lambda: (q := api.get_progress())["current_image"] and q["progress"] > 0.05 and q, 30,
                     "a preview in /progress")
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["job_count"] == 1
        assert p["state"]["sampling_steps"] == 64 and 0 < p["state"]["sampling_step"] < 64
        Image.open(io.BytesIO(decode_b64(p["current_image"]))).load()
        later = api.get_progress()
        assert later["progress"] >= p["progress"]
        assert api.interrupt() == {}
        t.join(30)
        r = out["r"]
        assert r.status_code == 499 and "interrupt" in r.json()["error"]["message"]
        q = api.get_progress()
        assert q["state"]["job_count"] == 0 and q["progress"] == 0.0
        assert api.interrupt() == {}  # nothing running: still {}
    finally:
        server.kill()


def _post_txt2img(server: LiveServer) -> httpx.Response:
    with server.client(timeout=60) as c:
        return c.post("/sdapi/v1/txt2img", json={"prompt": "slow", "sampler_name": SAMPLER, "seed": 1})


def test_routes_are_off_by_default():
    server = LiveServer("--devices", "cpu")
    try:
        server.wait_ready(60)
        with server.client() as c:
            assert c.get("/sdapi/v1/options").status_code == 404
            assert "/sdapi/v1/txt2img" not in c.get("/openapi.json").json()["paths"]
    finally:
        server.kill()


@pytest.mark.slow
def test_schemathesis_on_the_a1111_routes(srv, tmp_path):
    with srv.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/sd-models",
            "/sdapi/v1/options"} <= set(paths)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", srv.url + "/openapi.json",
           "--include-path-regex", "^/sdapi/", "--phases", "examples,coverage,fuzzing",
           "--checks", "all", "--max-examples", "40", "--seed", "1",
           "--request-timeout", "30", "--no-color"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert re.search(r"Tested: 6\b", text), text[-2000:]


# ---- the real worker, a diffusers-layout checkpoint -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not real_worker_available(), reason="needs the real worker")
def test_real_server_diffusers_checkpoint_same_images(tmp_path):
    from test_diffusers_layout import T2I_SIDE, t2i_images

    from bitdance_core.cli import main as cli_main

    for layout in ("official", "diffusers"):
        assert cli_main(["make-checkpoint", "--preset", "tiny", "--output", str(tmp_path / layout), "--seed", "3",
                         "--layout", layout]) == 0
    server = LiveServer("--model", str(tmp_path / "diffusers"), "--devices", "cpu", "--a1111-api", fake=False)
    try:
        server.wait_ready(180)
        assert server.info()["model"] == "diffusers"
        r = client(server).txt2img(prompt="a red fox in the snow", seed=11, width=T2I_SIDE, height=T2I_SIDE,
                                   batch_size=2, cfg_scale=3.0, steps=3)
        with server.client(timeout=300) as c:
            g = c.post("/generate", json={"prompt": "a red fox in the snow", "seed": 11, "width": T2I_SIDE,
                                          "height": T2I_SIDE, "num_images": 2, "guidance_scale": 3.0,
                                          "steps": 3}).json()
    finally:
        server.kill()
    a1111 = np.stack([np.asarray(im.convert("RGB")) for im in r.images])
    generate = np.stack([pixels(decode_b64(im["b64_json"])) for im in g["images"]])
    official, _ = t2i_images(tmp_path / "official")  # in-process engine, the official-layout twin
    assert a1111.shape == (2, T2I_SIDE, T2I_SIDE, 3)
    assert np.array_equal(a1111, generate) and np.array_equal(generate, official)


@pytest.mark.slow
def test_class_conditional_server_refuses(tmp_path):
    """A class-conditional diffusers folder serves (the worker dispatches it to the class loader) and the A1111
    routes refuse it clearly."""
    from bitdance_core.families.diffusers_checkpoints import write_diffusers_checkpoint

    if not real_worker_available():
        pytest.skip("needs the real worker")
    folder = write_diffusers_checkpoint("imagenet-tiny", tmp_path / "BitDance_tiny_4x")
    server = LiveServer("--model", str(folder), "--devices", "cpu", "--a1111-api", "--no-warmup", fake=False)
    try:
        server.wait_ready(180)
        info = server.info()
        assert info["kind"] == "class-conditional" and info["model"] == "BitDance_tiny_4x"
        with server.client() as c:
            for method, path, body in (("post", "/sdapi/v1/txt2img", {"prompt": "otter"}),
                                       ("get", "/sdapi/v1/sd-models", None), ("get", "/sdapi/v1/options", None)):
                r = c.request(method.upper(), path, json=body)
                assert r.status_code == 422 and "class-conditional" in r.json()["error"]["message"], r.text
            assert c.get("/sdapi/v1/progress").status_code == 200
    finally:
        server.kill()
