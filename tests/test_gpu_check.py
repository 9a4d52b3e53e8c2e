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
                         "int8 vs bf16", "fp8 vs bf16", "class-conditional bf16 vs fp32",
                         "class throughput at 2 concurrent", "class batch-1 latency"}
    for name in ("no host sync in warm steps", "peak memory vs bitdance plan", "bf16 vs fp32", "CUDA graphs on == off",
                 "class-conditional bf16 vs fp32"):
        assert rows[name]["verdict"] == "PASS", rows[name]
    graphs = rows["CUDA graphs on == off"]["measured"]
    assert graphs.startswith("3/3") and "recording stand-in" in graphs and " 0 graphs" not in graphs
    assert "0 failed" in graphs  # graphs really on (the stand-in), against graphs off
    for name in ("batch-1 latency", "throughput at 2 concurrent", "class throughput at 2 concurrent",
                 "class batch-1 latency"):
        assert rows[name]["verdict"] == "INFO", rows[name]  # no target can be judged on a CPU: never PASS
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


def test_the_graphs_row_compares_graphs_on_with_off(monkeypatch):
    """The on == off row fails when graphs-on differs from graphs-off and when no graph was captured."""
    import gpu_check
    import torch

    from bitdance_core.engine.recorded_graph import RecordedGraph, RecordingBackend

    torch.set_num_threads(1)
    real = RecordedGraph.replay

    def corrupt(self):
        real(self)
        for t in self._pool:
            if t is not None and t.is_floating_point():
                t.neg_()

    monkeypatch.setattr(RecordedGraph, "replay", corrupt)
    row = gpu_check.check_graphs("cpu")
    assert row[3] == "FAIL" and not row[1].startswith("3/3"), row
    monkeypatch.undo()

    def no_capture(self, fn, restore, names):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(RecordingBackend, "capture", no_capture)
    row = gpu_check.check_graphs("cpu")
    assert row[3] == "FAIL" and row[1].startswith("3/3") and "0 graphs captured" in row[1], row
