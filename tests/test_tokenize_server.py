"""The tokenizer routes through a real server (uvicorn + real worker on 127.0.0.1): a tokenizer-only server on
a lone autoencoder file, and a generator server with --tokenizer-routes whose /generate return_tokens decode
through /v1/detokenize to the same image. Bad input is a 4xx naming the field."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_harness import TINY_MODEL, LiveServer

GOLDEN = Path(__file__).parent / "fixtures" / "tokenizer-official"


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def ae_srv() -> Iterator[LiveServer]:
    server = LiveServer("--devices", "cpu", "--threads", "1", "--model", str(TINY_MODEL / "ae.safetensors"),
                        fake=False)
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.kill()


@pytest.mark.slow
def test_tokenizer_only_server_matches_official_tokens(ae_srv):
    from safetensors.numpy import load_file

    golden = load_file(GOLDEN / "golden.safetensors")
    image = (GOLDEN / "t2i.png").read_bytes()
    with ae_srv.client() as c:
        info = c.get("/info").json()
        assert info["kind"] == "tokenizer" and info["tokenizer"]["z_channels"] == 16
        for ps in (1, 2):
            r = c.post("/v1/tokenize", json={"image": _b64(image), "patch_size": ps})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["token_shape"] == [24, 16] and not body["resized"] and body["patch_size"] == ps
            bits = np.unpackbits(np.frombuffer(base64.b64decode(body["tokens"]), np.uint8))[: 24 * 16]
            assert np.array_equal(bits.reshape(24, 16).astype(np.int8) * 2 - 1, golden[f"t2i.tokens.ps{ps}"])
        # multipart gives the same tokens
        r2 = c.post("/v1/tokenize", files={"image": ("x.png", image, "image/png")}, data={"patch_size": "2"})
        assert r2.status_code == 200, r2.text
        assert r2.json()["tokens"] == body["tokens"]
        # round trip: detokenize (JSON and raw PNG) equals the official decoder's image (within one level)
        req = {k: body[k] for k in ("tokens", "token_shape", "width", "height", "patch_size")}
        d = c.post("/v1/detokenize", json=req)
        assert d.status_code == 200, d.text
        img = _pixels(base64.b64decode(d.json()["b64_json"]))
        raw = c.post("/v1/detokenize", json=req, headers={"Accept": "image/png"})
        assert raw.headers["content-type"] == "image/png" and np.array_equal(_pixels(raw.content), img)
        expected = np.clip(127.5 * golden["t2i.decoded"][0] + 128.0, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        assert np.abs(img.astype(int) - expected.astype(int)).max() <= 1
        # generation is refused clearly
        g = c.post("/generate", json={"prompt": "a cat"})
        assert g.status_code == 501 and g.json()["error"]["code"] == "no_generator"


def test_size_policy_is_never_silent(ae_srv):
    odd = _png(np.full((50, 70, 3), 200, np.uint8), "WEBP")
    with ae_srv.client() as c:
        r = c.post("/v1/tokenize", json={"image": _b64(odd)})
        assert r.status_code == 422 and r.json()["error"]["field"] == "image"
        assert r.json()["error"]["allowed"]["multiple_of"] == 16
        r = c.post("/v1/tokenize", json={"image": _b64(odd), "resize": "fit"})
        assert r.status_code == 200 and r.headers["X-Resized"] == "true"
        body = r.json()
        assert (body["width"], body["height"], body["resized"]) == (64, 48, True)
        assert body["original"] == {"width": 70, "height": 50, "format": "webp"}
        assert body["token_shape"] == [12, 16]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"image": "not base64!"}, "image"),
        ({"image": _b64(b"GIF89a but not really")}, "image"),
        ({"image": _b64(b"x" * 10), "resize": "stretch"}, "resize"),
        ({"image": _b64(b"x"), "patch_size": 0}, "patch_size"),
        ({"image": _b64(b"x"), "extra": 1}, "extra"),
    ],
)
def test_tokenize_bad_input_names_the_field(ae_srv, body, field):
    with ae_srv.client() as c:
        r = c.post("/v1/tokenize", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.slow
def test_detokenize_bad_input_names_the_field(ae_srv):
    tokens = np.packbits(np.ones(24 * 16, bool)).tobytes()
    ok = {"tokens": _b64(tokens), "token_shape": [24, 16], "width": 96, "height": 64}
    cases = [
        ({**ok, "token_shape": [24, 15]}, "token_shape"),
        ({**ok, "tokens": _b64(tokens[:-1])}, "tokens"),
        ({**ok, "tokens": "%%%"}, "tokens"),
        ({**ok, "width": 90}, "size"),
        ({**ok, "patch_size": 5}, "patch_size"),
        ({**ok, "patch_size": 8}, "size"),  # a 6x4 token grid is no whole number of 8x8 patches
    ]
    with ae_srv.client() as c:
        assert c.post("/v1/detokenize", json=ok).status_code == 200
        for body, field in cases:
            r = c.post("/v1/detokenize", json=body)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, (body, r.text)
        r = c.post("/v1/tokenize", content=b"x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = c.post("/v1/tokenize", files={"other": ("x.png", b"x", "image/png")})
        assert r.status_code == 422 and r.json()["error"]["field"] == "image"


@pytest.mark.slow
def test_generate_return_tokens_decode_to_the_same_image():
    srv = LiveServer("--devices", "cpu", "--threads", "1", "--tokenizer-routes", fake=False)
    try:
        srv.wait_ready(180)
        with srv.client(timeout=300) as c:
            info = c.get("/info").json()
            assert info["tokenizer"]["patch_size"] == 2
            gen = c.post("/generate", json={"prompt": "a red circle", "seed": 3, "steps": 4, "return_tokens": True})
            assert gen.status_code == 200, gen.text
            body = gen.json()
            req = {"tokens": body["images"][0]["tokens"], "token_shape": body["token_shape"],
                   "width": body["width"], "height": body["height"]}
            d = c.post("/v1/detokenize", json=req, headers={"Accept": "image/png"})
            assert d.status_code == 200, d.text
            assert np.array_equal(_pixels(d.content), _pixels(base64.b64decode(body["images"][0]["b64_json"])))
            # and the generated image tokenizes to tokens of the same shape and order
            t = c.post("/v1/tokenize", json={"image": body["images"][0]["b64_json"]})
            assert t.status_code == 200 and t.json()["token_shape"] == body["token_shape"], t.text
    finally:
        srv.kill()


@pytest.mark.slow
def test_class_conditional_server_tokenizer_routes():
    """An ImageNet model with --tokenizer-routes: its encoder (from the --vae file) is loaded before the
    engine; /generate's return_tokens decode to the same image, and the golden image tokenizes as the official
    qae.py does (in the model's 2x2 patch order)."""
    from safetensors.numpy import load_file

    fixture = Path(__file__).parent / "fixtures" / "reference-imagenet-tiny-a"
    srv = LiveServer("--model", str(fixture / "BitDance_tiny_a_4x.pt"), "--model-args",
                     str(fixture / "model_args_4x.json"), "--devices", "cpu", "--threads", "1",
                     "--tokenizer-routes", fake=False)
    try:
        srv.wait_ready(180)
        with srv.client(timeout=300) as c:
            gen = c.post("/generate", json={"class_label": 3, "seed": 1, "steps": 4, "return_tokens": True})
            assert gen.status_code == 200, gen.text
            body = gen.json()
            assert body["token_shape"] == [256, 32]
            req = {"tokens": body["images"][0]["tokens"], "token_shape": body["token_shape"],
                   "width": body["width"], "height": body["height"]}
            d = c.post("/v1/detokenize", json=req, headers={"Accept": "image/png"})
            assert d.status_code == 200, d.text
            assert np.array_equal(_pixels(d.content), _pixels(base64.b64decode(body["images"][0]["b64_json"])))
            t = c.post("/v1/tokenize", json={"image": _b64((GOLDEN / "imagenet.png").read_bytes())})
            assert t.status_code == 200, t.text
            assert t.json()["patch_size"] == 2
            latent = load_file(GOLDEN / "golden.safetensors")["imagenet.latent"][0]  # (C, 16, 16)
            grid = latent.transpose(1, 2, 0).reshape(8, 2, 8, 2, 32).transpose(0, 2, 1, 3, 4).reshape(256, 32)
            bits = np.unpackbits(np.frombuffer(base64.b64decode(t.json()["tokens"]), np.uint8))
            assert np.array_equal(bits.reshape(256, 32).astype(np.int8) * 2 - 1, grid)
    finally:
        srv.kill()
