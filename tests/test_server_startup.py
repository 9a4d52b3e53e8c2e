"""Start-up errors no restart can fix: found before the server listens where possible (exit 2), else at the first
failed load (exit 3), with the loader's message; ``--keep-serving-on-load-error`` stays up with ``/readyz`` naming
the error and no restart loop. ``--model DIR`` holding one class-conditional ``.pt`` serves it; several: an error
listing them (``bitdance_core.model_path``)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from server_harness import LiveServer, real_worker_available, wait_for

from bitdance_core.loading.io import CheckpointError
from bitdance_core.model_path import resolve_model_path

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "reference-tiny-a"
CLASS = FIXTURES / "reference-imagenet-tiny-a"


def test_resolution(tmp_path: Path) -> None:
    assert resolve_model_path(TINY) == str(TINY.absolute())
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(CLASS / "BitDance_tiny_a_4x.pt", one)
    (one / "ae_d16c32.pt").write_bytes(b"an autoencoder is not a model")
    assert resolve_model_path(one) == str(one / "BitDance_tiny_a_4x.pt")
    (one / "BitDance_B_1x.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"2 class-conditional checkpoints \(BitDance_B_1x.pt, "
                                              r"BitDance_tiny_a_4x.pt\)"):
        resolve_model_path(one)
    bad = tmp_path / "bad"
    shutil.copytree(TINY, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        resolve_model_path(bad)
    (bad / "config.json").unlink()
    (bad / "ae_config.json").unlink()
    assert resolve_model_path(bad) == str(bad)  # no config.json, no .pt: the loader says what is missing


def _exit(server: LiveServer, timeout: float) -> tuple[int, str]:
    code = server.proc.wait(timeout)
    return code, server.log_text()


def test_errors_found_before_listening_exit_2(tmp_path: Path) -> None:
    two = tmp_path / "two"
    two.mkdir()
    for name in ("BitDance_B_1x.pt", "BitDance_L_1x.pt", "ae_d16c32.pt"):
        (two / name).write_bytes(b"x")
    bad = tmp_path / "bad"
    shutil.copytree(TINY, bad)
    (bad / "vision_head_config.json").write_text(json.dumps({"unknown_key": 1}))
    for model, words in ((tmp_path / "nope", "does not exist"), (two, "BitDance_B_1x.pt, BitDance_L_1x.pt"),
                         (bad, "vision_head_config.json")):
        server = LiveServer("--model", str(model))
        try:
            code, log = _exit(server, 60)
        finally:
            server.kill()
        assert code == 2 and "cannot serve the model" in log and words in log, log
        assert "Uvicorn running" not in log and "worker" not in log.lower()  # never listened, nothing spawned


def test_keep_serving_names_the_error_in_readyz(tmp_path: Path) -> None:
    server = LiveServer("--model", str(tmp_path / "nope"), "--keep-serving-on-load-error")
    try:
        wait_for(lambda: _get(server.url + "/readyz") is not None, 30, "listening")
        r = httpx.get(server.url + "/readyz", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "failed" and "does not exist" in r.json()["error"]
        g = httpx.post(server.url + "/generate", json={"prompt": "a"}, timeout=5)
        assert g.status_code == 503 and "does not exist" in g.json()["error"]["message"]
        assert all(w["restarts"] == 0 for w in r.json()["worker_states"])
    finally:
        server.kill()


@pytest.mark.slow
@pytest.mark.skipif(not real_worker_available(), reason="needs the real worker")
def test_a_checkpoint_that_fails_to_load_exits_3_or_stays_up_without_restarts(tmp_path: Path) -> None:
    import torch

    broken = tmp_path / "BitDance_B_1x.pt"  # a B-1x by name, with tensors strict loading refuses
    torch.save({"model": {"bogus.weight": torch.zeros(2, 2)}}, broken)
    flags = ("--model", str(broken), "--vae", str(CLASS / "ae_tiny_a.pt"), "--model-args",
             str(CLASS / "model_args_4x.json"), "--restart-backoff-s", "0.1")
    server = LiveServer(*flags, fake=False)
    try:
        code, log = _exit(server, 180)
    finally:
        server.kill()
    assert code == 3 and "the model could not be loaded: failed to load" in log and "bogus.weight" in log, log
    assert "restarting in" not in log
    server = LiveServer(*flags, fake=False, env={"BITDANCE_KEEP_SERVING_ON_LOAD_ERROR": "true"})
    try:
        body = wait_for(lambda: (b := _get(server.url + "/readyz")) and b.get("status") == "failed" and b, 180,
                        "readyz failed")
        assert "bogus.weight" in body["error"]
        time.sleep(2.0)  # 20 back-off periods: no restart happens
        again = _get(server.url + "/readyz")
        assert again["status"] == "failed" and all(w["restarts"] == 0 for w in again["worker_states"])
        assert server.proc.poll() is None and "restarting in" not in server.log_text()
    finally:
        server.kill()


def _get(url: str) -> dict | None:
    try:
        return httpx.get(url, timeout=2).json()
    except (httpx.TransportError, ValueError):
        return None
