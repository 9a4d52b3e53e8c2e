"""`bitdance serve --quantize int8` end to end: the flag (and BITDANCE_QUANTIZE) reaches the real worker, which
loads the prior quantised and serves the int8 model's exact tokens over real HTTP on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from server_harness import TINY_MODEL, LiveServer, decode_b64, real_worker_available

from bitdance_core.families.text_to_image.pipeline import BitDancePipeline
from server.settings import Settings

# golden case 0: int8 flips about 1 % of its bits
REQ = {"prompt": "a red circle on a white background", "width": 128, "height": 128, "steps": 8, "guidance_scale": 7.5,
       "seed": 42}


def test_quantize_setting_reaches_the_worker_config(monkeypatch):
    assert Settings(model=str(TINY_MODEL), devices=["cpu"]).worker_configs()[0].quantize == "none"
    monkeypatch.setenv("BITDANCE_QUANTIZE", "int8")
    assert Settings(model=str(TINY_MODEL), devices=["cpu"]).worker_configs()[0].quantize == "int8"
    monkeypatch.setenv("BITDANCE_QUANTIZE", "int4")
    with pytest.raises(ValueError, match="quantize"):
        Settings(model=str(TINY_MODEL), devices=["cpu"])


@pytest.mark.slow
@pytest.mark.skipif(not real_worker_available(), reason="needs the real worker")
def test_serve_quantize_int8_end_to_end():
    srv = LiveServer("--devices", "cpu", "--quantize", "int8", "--threads", "1", fake=False)
    try:
        srv.wait_ready(180)
        assert [w["quantize"] for w in srv.info()["workers"]] == ["int8"]
        with srv.client(timeout=120) as c:
            r = c.post("/generate", json={**REQ, "return_tokens": True})
        assert r.status_code == 200, r.text
        body = r.json()
        n, bits = body["token_shape"]
        got = np.unpackbits(np.frombuffer(decode_b64(body["images"][0]["tokens"]), np.uint8))[: n * bits]
        want = {m: BitDancePipeline.from_pretrained(TINY_MODEL, "cpu", quantize=m)(**REQ).tokens[0]
                for m in ("int8", "none")}
        as_bits = {m: (t.reshape(-1) > 0).numpy().astype(np.uint8) for m, t in want.items()}
        assert np.array_equal(got, as_bits["int8"])  # the quantised model's exact tokens
        assert not torch.equal(want["int8"], want["none"])  # ... which differ from the unquantised model's
    finally:
        srv.kill()
