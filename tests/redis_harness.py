"""A real ``redis-server`` for the tests: on a free loopback port, its data (AOF) in a temporary
directory, never a system service. Debian's ``redis-server`` package provides it (``.ci/run``)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from typing import Any

from server_harness import free_port

MISSING = "needs redis-server (Debian: apt-get install redis-server)"


def available() -> bool:
    return shutil.which("redis-server") is not None


class RedisServer:
    """``redis-server`` on a free loopback port, its data (AOF) in a temporary directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="bitdance-redis-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._wait_up()

    def _wait_up(self) -> bool:
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, decode_responses=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis writes its data and exits
            self.proc.wait(15)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
