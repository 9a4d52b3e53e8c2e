"""bench/gpu_check.sh --smoke: the device check's code paths on CPU with tiny shapes (CI runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.slow
def test_gpu_check_smoke_prints_every_row_and_passes():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--json"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = {row["check"].split(" (")[0]: row for row in json.loads(r.stdout)["rows"]}
    assert set(rows) == {"bf16 vs fp32", "xformers vs SDPA", "no host sync in warm steps", "CUDA graphs on == off",
                         "batch-1 latency", "throughput at 2 concurrent", "peak memory vs bitdance plan",
                         "int8 vs bf16", "fp8 vs bf16"}
    assert rows["no host sync in warm steps"]["verdict"] == "PASS"
    assert rows["peak memory vs bitdance plan"]["verdict"] == "PASS"
    assert rows["bf16 vs fp32"]["verdict"] == "PASS"
    assert rows["CUDA graphs on == off"]["measured"].startswith("3/3")
    assert rows["int8 vs bf16"]["measured"].startswith("batch-1 ")  # int8 ran next to the unquantised run
    assert "compute capability" in rows["fp8 vs bf16"]["measured"]  # fp8: skipped with the reason on CPU


def test_the_sync_check_fails_on_a_sync(monkeypatch):
    """The sync row is not vacuous: a runner step that reads a tensor on the host makes it FAIL."""
    import gpu_check
    import torch

    real_init = gpu_check.Engine.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        step = self.runner.step

        def syncing(running, tick):
            torch.ones(1).sum().item()
            return step(running, tick)

        self.runner.step = syncing

    monkeypatch.setattr(gpu_check.Engine, "__init__", init)
    torch.set_num_threads(1)
    row = gpu_check.check_sync("cpu", warm_steps=1)
    assert row[3] == "FAIL" and "host sync" in row[1]
