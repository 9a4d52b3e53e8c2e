"""The graph set (keys, LRU, per-key fallback, faults) and the recording CUDA-graph stand-in that the CPU
tests replay the runner through: it must fail where a GPU graph would silently go wrong."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from bitdance_core.engine.cuda_graphs import GraphSet
from bitdance_core.engine.recorded_graph import GraphCaptureError, GraphInputError, RecordedGraph, RecordingBackend

CPU = torch.device("cpu")


def test_replay_runs_the_recorded_kernels_on_the_same_storages_not_the_python():
    a, out_buf = torch.arange(4.0), torch.zeros(4)
    calls, host = [0], {"scale": 2.0}

    def fn():
        calls[0] += 1
        y = (a * host["scale"]).exp()  # a Python scalar read at capture: baked in, as on a GPU
        out_buf.copy_(y)  # an in-place write into a buffer that outlives the graph
        return y + 1

    g = RecordedGraph()
    out = g.record(fn)
    assert calls == [1]
    a.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))  # new input values, same storage
    host["scale"] = 100.0
    g.replay()
    assert calls == [1], "replay ran the Python function"
    want = (torch.tensor([1.0, 0.0, -1.0, 2.0]) * 2.0).exp()
    assert torch.equal(out_buf, want) and torch.equal(out, want + 1), "replay writes into the captured output"


def test_replay_names_an_input_that_was_freed():
    kept = {"schedule": (torch.tensor(0.5), torch.tensor(0.25))}
    x = torch.ones(3)

    def fn(sch=kept["schedule"]):
        return x * sch[1]

    g = RecordedGraph(names=kept)
    g.record(fn)
    g.replay()
    del fn, kept["schedule"]
    gc.collect()
    with pytest.raises(GraphInputError, match=r"'schedule\[1\]' .* was freed"):
        g.replay()


def test_replay_fails_when_an_input_moved():
    x = torch.ones(3)
    g = RecordedGraph(names={"runner.hidden": x})
    g.record(lambda: x + 1)
    x.untyped_storage().resize_(1 << 16)  # a reallocation: the same tensor at another address
    with pytest.raises(GraphInputError, match="'runner.hidden'.*moved"):
        g.replay()


def test_capture_refuses_a_host_read():
    x = torch.ones(3)
    with pytest.raises(GraphCaptureError, match="host"):
        RecordedGraph().record(lambda: x * x.sum().item())


def _set(max_graphs: int) -> GraphSet:
    return GraphSet(CPU, True, max_graphs, RecordingBackend())


def test_undeclared_keys_are_an_lru_of_max_graphs_and_declared_keys_stay():
    s, x = _set(2), torch.ones(2)
    s.declare([("d",)])
    for k in [("d",), ("a",), ("b",), ("a",), ("c",)]:
        assert torch.equal(s.run(k, lambda: x * 2), x * 2)
    assert s.keys() == [("d",), ("a",), ("c",)]  # b was the least recently used
    eager, calls = _set(0), [0]

    def fn():
        calls[0] += 1
        return x + 1

    for _ in range(3):
        eager.run(("e",), fn)
    assert calls == [3] and len(eager) == 0 and eager.captures == 0


def test_a_capture_failure_falls_back_for_that_key_only(caplog):
    s, x = _set(4), torch.ones(2)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(s.run(("bad",), lambda: x * x.sum().item()), x * 2)
    assert ("bad",) in s.failed and "GraphCaptureError" in s.failed[("bad",)]
    assert "('bad',)" in caplog.text and "reads a device value on the host" in caplog.text
    s.run(("good",), lambda: x + 1)
    assert s.keys() == [("good",)] and s.enabled
    assert torch.equal(s.run(("bad",), lambda: x * x.sum().item()), x * 2)  # still eager, not retried


class _Raising:
    def __init__(self, exc):
        self.exc = exc

    def capture(self, fn, restore, names):
        fn()
        raise self.exc


def test_an_out_of_memory_in_a_capture_is_raised_to_the_fault_ladder():
    restored = []
    s = GraphSet(CPU, True, 4, _Raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")))
    with pytest.raises(torch.OutOfMemoryError):
        s.run(("k",), lambda: torch.ones(1), save=lambda: lambda: restored.append(1))
    assert restored and not s.failed  # side effects undone; the key may be captured later


def test_off_or_no_backend_runs_eagerly():
    assert not GraphSet(CPU, False, 4).enabled
    with pytest.raises(ValueError, match="max_cuda_graphs"):
        GraphSet(CPU, True, -1, RecordingBackend())


class _FakeCuda:
    """What ``CudaGraphBackend`` may call on ``torch.cuda``, recorded (a CPU build has no CUDA)."""

    def __init__(self):
        self.calls: list[str] = []
        self.capturing = False
        cuda = self

        class Stream:
            def __init__(self, device=None):
                self.device = device
                cuda.calls.append(f"Stream({device})")

            def wait_stream(self, other):
                cuda.calls.append("wait_stream")

        class CUDAGraph:
            def capture_begin(self, pool=None, capture_error_mode="global"):
                cuda.calls.append(f"capture_begin({pool})")
                cuda.capturing = True

            def capture_end(self):
                cuda.calls.append("capture_end")
                cuda.capturing = False

            def replay(self):
                cuda.calls.append("replay")

        self.Stream, self.CUDAGraph = Stream, CUDAGraph

    def install(self, monkeypatch):
        import contextlib as cl
        import gc as gc_mod

        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool0")
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.Stream(f"current {device}"))
        monkeypatch.setattr(torch.cuda, "stream", lambda s: cl.nullcontext(self.calls.append("stream ctx")))
        for name in ("synchronize", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: self.calls.append(_n))
        monkeypatch.setattr(gc_mod, "collect", lambda *a: self.calls.append("gc.collect"))


def test_the_cuda_backend_warms_then_captures_into_one_pool_without_gc_or_empty_cache(monkeypatch):
    from bitdance_core.engine.cuda_graphs import CudaGraphBackend

    fake = _FakeCuda()
    fake.install(monkeypatch)
    dev = torch.device("cuda:1")
    backend = CudaGraphBackend(dev)
    runs = []
    s = GraphSet(dev, True, 4, backend)
    for key in ("a", "b"):
        s.run((key,), lambda: runs.append(fake.capturing) or torch.ones(1),
              save=lambda: lambda: fake.calls.append("restore"))
    assert runs == [False, True, False, True]  # a warm run outside the capture, then the captured one
    assert fake.calls.count("capture_begin(pool0)") == 2 and fake.calls.count("replay") == 2  # one shared pool
    assert not {"gc.collect", "empty_cache", "synchronize"} & set(fake.calls)
    assert "Stream(cuda:1)" in fake.calls  # the side stream is the worker's device's
    first = fake.calls.index("capture_begin(pool0)")
    assert "restore" in fake.calls[:first]  # the warm run's side effects undone before the capture

    def boom():
        if fake.capturing:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.ones(1)

    with pytest.raises(torch.OutOfMemoryError):
        s.run(("c",), boom)
    assert not fake.capturing, "a failed capture was not ended"
