"""Helpers for the server tests: a real ``python -m server`` subprocess on 127.0.0.1, SSE parsing.

Every wait here is bounded. The server runs in its own session (process group), so a signal
sent to it reaches the API process only, as in production (``docker stop``, Kubernetes).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TINY_MODEL = TESTS / "fixtures" / "reference-tiny-a"
FAKE_TARGET = "fake_worker:worker_main"
REAL_TARGET = "bitdance_core.worker.worker:worker_main"


def real_worker_available() -> bool:
    """The real worker is used when it exists, unless BITDANCE_TEST_WORKER=fake."""
    if os.environ.get("BITDANCE_TEST_WORKER") == "fake":
        return False
    return (REPO / "bitdance_core" / "worker" / "worker.py").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``python -m server`` on a free loopback port; ``stop()`` returns its exit status."""

    def __init__(self, *flags: str, fake: bool = True, env: dict[str, str] | None = None, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile(prefix="bitdance-server-", suffix=".log", delete=False)  # noqa: SIM115
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("BITDANCE_")}
        run_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)])
        run_env["BITDANCE_WORKER_TARGET"] = FAKE_TARGET if fake else REAL_TARGET
        if api_key:
            run_env["BITDANCE_API_KEY"] = api_key
        run_env.update(env or {})
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--model", str(TINY_MODEL), "--log-level", "info", *flags]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=run_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_text()}")

    def wait_unready(self, timeout: float = 10.0) -> None:
        wait_for(lambda: httpx.get(self.url + "/readyz", timeout=2).status_code == 503, timeout, "readyz 503")

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def info(self) -> dict[str, Any]:
        with self.client() as c:
            r = c.get("/info")
            r.raise_for_status()
            return r.json()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def kill(self) -> None:
        """Last resort: the whole session (API process and workers)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def iter_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Strict SSE parsing: every frame is 'event: X' + 'data: <json>' + a blank line (comments skipped)."""
    event, data = None, None
    for line in lines:
        if line.startswith(":"):
            continue
        if line == "":
            if event is None and data is None:
                continue
            assert event is not None and data is not None, f"incomplete SSE frame {event!r} {data!r}"
            yield event, json.loads(data)
            event, data = None, None
        elif line.startswith("event: "):
            assert event is None, "two event lines in one frame"
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            assert data is None, "multi-line data"
            data = line[len("data: ") :]
        else:
            raise AssertionError(f"unexpected SSE line {line[:80]!r}")
    assert event is None and data is None, "stream ended mid-frame"


def decode_b64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)
