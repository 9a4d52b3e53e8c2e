"""The fixed-shape runner: no host sync in a warm step, keys as cache views, per-row sampling modes,
buckets and the CUDA-graph setting."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bitdance_core.engine import runner as runner_mod
from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.protocol import EventKind, GenerationRequest
from bitdance_core.engine.recorded_graph import RecordedGraph, RecordingBackend
from bitdance_core.families.text_to_image.loader import load_model
from bitdance_core.models import qwen3
from bitdance_core.sampling import binarize, euler_maruyama

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"
aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.masked_select, aten._unique2,
           aten.unique_consecutive, aten.equal}


class NoHostSync(TorchDispatchMode):
    """CPU proxy of ``torch.cuda.set_sync_debug_mode("error")``: fails on every op that reads a tensor's
    value on the host (``.item()``, ``bool(t)``, data-dependent shapes) and on device-to-host copies;
    ``allowed`` opens a window (the update phase's decodes)."""

    def __init__(self):
        super().__init__()
        self.allowed = False
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if not self.allowed:
            if func.overloadpacket in SYNCING:
                raise AssertionError(f"host sync in a warm step: {func}")
            if func.overloadpacket in (aten._to_copy, aten.copy_):
                src = args[1] if func.overloadpacket is aten.copy_ else args[0]
                dst = args[0].device if func.overloadpacket is aten.copy_ else kwargs.get("device")
                if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                    raise AssertionError(f"device-to-host copy in a warm step: {func}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE)


def _reads_host(name):
    def fail(self, *a, **kw):
        raise AssertionError(f"Tensor.{name}() in a warm step")
    return fail


def _mixed_requests(steps=(3, 5)):
    return [GenerationRequest("a", "a red circle", 128, 128, seed=1, steps=steps[0], guidance_scale=4.0,
                              preview_every=0),
            GenerationRequest("b", "blue", 64, 128, seed=2, steps=steps[1], guidance_scale=1.0, num_images=2,
                              preview_every=0),
            GenerationRequest("c", "green", 128, 64, seed=3, steps=steps[0], guidance_scale=2.5, num_images=2,
                              negative_prompt="red", preview_every=0)]


def test_warm_steps_make_no_host_sync_and_decodes_sync_only_in_the_update(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_batch_requests=4, preview_method="linear"))
    reqs = _mixed_requests()
    reqs[0] = dataclasses.replace(reqs[0], preview_every=3)
    for r in reqs:
        engine.add_request(r)
    engine.step()  # prefill + first AR step (cold)
    engine.step()
    mode = NoHostSync()
    opened = {"_finish": 0, "_preview": 0}

    def may_sync(name):
        inner = getattr(engine, name)

        def wrapper(*a):
            opened[name] += 1
            mode.allowed = True
            try:
                return inner(*a)
            finally:
                mode.allowed = False
        return wrapper

    for name in opened:  # the update phase's final decodes and previews may read the device
        monkeypatch.setattr(engine, name, may_sync(name))
    real = {n: getattr(torch.Tensor, n) for n in ("cpu", "numpy", "tolist", "item")}
    for name in real:  # a CPU tensor's .cpu()/.numpy() dispatch nothing: catch the calls themselves
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, **kw: (
            real[_n](self, *a, **kw) if mode.allowed else _reads_host(_n)(self)))
    done, warm = set(), 0
    with mode:
        while engine.has_work():
            for ev in engine.step():
                assert ev.kind is not EventKind.FAILED, ev.data
                if ev.kind is EventKind.COMPLETED:
                    done.add(ev.request_id)
            warm += 1
    assert done == {"a", "b", "c"} and warm >= 10 and mode.ops > 1000
    assert opened["_finish"] >= 1 and opened["_preview"] >= 2


def test_block_step_reads_keys_as_views_of_the_cache(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    for r in _mixed_requests():
        engine.add_request(r)
    engine.step()
    seen = []
    real = qwen3.attention

    def spy(q, k, v, **kw):
        seen.append((k.untyped_storage().data_ptr(), kw.get("mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(qwen3, "attention", spy)
    engine.step()
    cache_ptr = engine.cache.k.untyped_storage().data_ptr()
    assert seen and all(ptr == cache_ptr for ptr, _ in seen)
    mask = seen[0][1]
    assert mask.shape[1:3] == (1, 1), "the step's mask is per row (R, 1, 1, Lk), not per query"


def _run(engine, reqs):
    out = {}
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        for ev in engine.step():
            assert ev.kind is not EventKind.FAILED, ev.data
            if ev.kind is EventKind.COMPLETED:
                out[ev.request_id] = ev.data["tokens"]
    return out


def _linear_schedule(engine):
    """The class-conditional models' linear CFG schedule on the text-to-image family: guidance 1 at
    step 0 (every row independent, unguided), then ``1 + (g - 1) i / T``."""
    def step_guidance(st, i):
        if not st.prep.uses_cfg or i == 0:
            return None
        return 1 + (st.req.guidance_scale - 1) * i / st.total_steps
    engine.family.step_guidance = step_guidance


def test_independent_rows_at_step_zero_match_the_unbatched_sampler(model, monkeypatch):
    """Step 0 with guidance 1: all 2B rows sampled independently from noise randn(2B, P, C), and the
    cond and uncond rows keep different tokens."""
    engine = Engine(model, EngineConfig(max_batch_requests=4))
    _linear_schedule(engine)
    req = GenerationRequest("r", "a red circle", 128, 128, seed=5, steps=4, guidance_scale=4.0, preview_every=0)
    engine.add_request(req)
    st = engine.requests["r"]
    gen = torch.Generator().manual_seed(5)
    captured = {}
    sample = engine.runner._sample

    def capture(steps, reqs):
        captured["hidden"] = engine.runner.hidden[list(st.slots)].clone()
        return sample(steps, reqs)

    monkeypatch.setattr(engine.runner, "_sample", capture)
    engine.step()  # prefill + AR step 0
    fam, head, P = engine.family, model.head, engine.P
    cond = head.condition(fam.head_condition(captured["hidden"], fam.head_offset(st, 0)).to(head.dtype))
    t_emb = engine.runner._time_table(4)
    x = euler_maruyama(lambda xr, tr, i: head.predict(xr, tr, cond, t_emb[i]),
                       lambda: torch.randn((2, P, engine.C), generator=gen), [1.0, 1.0], 4, fam.time_shift)
    want = binarize(x)
    got = engine.runner.bits[list(st.slots)]
    assert torch.equal(got, want)
    assert not torch.equal(got[0], got[1]), "cond and uncond rows feed back different tokens"
    assert torch.equal(st.tokens[0, :P], want[0])


def test_per_step_modes_are_batch_invariant(model):
    reqs = _mixed_requests(steps=(3, 4))
    alone = {}
    for r in reqs:
        e = Engine(model, EngineConfig(max_batch_requests=4))
        _linear_schedule(e)
        alone.update(_run(e, [r]))
    e = Engine(model, EngineConfig(max_batch_requests=4))
    _linear_schedule(e)
    together = _run(e, reqs)
    for rid in alone:
        assert torch.equal(alone[rid], together[rid]), rid


def test_row_buckets_and_cuda_graph_setting(monkeypatch):
    assert runner_mod.row_buckets(1) == [1]
    b = runner_mod.row_buckets(100)
    assert b[:5] == [1, 2, 4, 8, 16] and b[-1] == 100 and b == sorted(set(b))
    assert all(y <= 2 * x for x, y in zip(b, b[1:]))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not runner_mod.graphs_enabled("auto", cpu) and runner_mod.graphs_enabled("auto", cuda)
    assert not runner_mod.graphs_enabled("off", cuda) and runner_mod.graphs_enabled("ON", cuda)
    with pytest.raises(ValueError, match="cuda_graphs"):
        runner_mod.graphs_enabled("sometimes", cpu)


def test_the_cuda_graphs_setting_has_one_owner(monkeypatch):
    """``BITDANCE_CUDA_GRAPHS`` is read once, by the server's settings, into the worker's EngineConfig; the
    runner never reads the environment, so an explicit argument (gpu_check's on/off rows) is what runs."""
    from server import cli

    cuda = torch.device("cuda")
    monkeypatch.setenv("BITDANCE_CUDA_GRAPHS", "off")
    assert runner_mod.graphs_enabled("on", cuda) and runner_mod.graphs_enabled("auto", cuda)
    monkeypatch.setenv("BITDANCE_CUDA_GRAPHS", "on")
    assert not runner_mod.graphs_enabled("off", cuda)
    monkeypatch.setenv("BITDANCE_CUDA_GRAPHS", "off")
    monkeypatch.setenv("BITDANCE_MAX_CUDA_GRAPHS", "3")
    cfg = cli.parse_settings([]).worker_configs()[0].engine
    assert cfg.cuda_graphs == "off" and cfg.max_cuda_graphs == 3
    cfg = cli.parse_settings(["--cuda-graphs", "on", "--max-cuda-graphs", "0"]).worker_configs()[0].engine
    assert cfg.cuda_graphs == "on" and cfg.max_cuda_graphs == 0


def _standin_engine(model, **cfg):
    engine = Engine(model, EngineConfig(**{"max_batch_requests": 4, **cfg}))
    engine.runner.set_graph_backend(RecordingBackend())
    return engine


def test_graphs_through_the_recording_stand_in_give_the_eager_tokens(model, monkeypatch):
    """Graphs "on" on CPU with the recording stand-in (kernels replayed on the captured storages, no Python
    re-run): the eager tokens bit for bit, with padded key lengths; one capture per key, replays after it."""
    reqs = _mixed_requests(steps=(3, 4))
    want = _run(Engine(model, EngineConfig(max_batch_requests=4)), reqs)
    engine = _standin_engine(model, max_cuda_graphs=64)
    engine.runner.reserve_steps(4)  # else the noise buffer grows at the first 4-step request: its graphs go
    graphs, replays = engine.runner.graphs, []
    real_replay = RecordedGraph.replay

    def count(self):
        replays.append(self)
        return real_replay(self)

    monkeypatch.setattr(RecordedGraph, "replay", count)
    got = _run(engine, reqs)
    for rid in want:
        assert torch.equal(want[rid], got[rid]), rid
    assert not graphs.failed and graphs.captures == len(graphs) and len(graphs) >= 4
    keys = graphs.keys()
    assert {k[0] for k in keys} == {"head", "prior"} and {k[1] for k in keys if k[0] == "head"} == {3, 4}
    assert all(k[2] % runner_mod.KEY_BUCKET == 0 or k[2] == engine.cache.max_len for k in keys if k[0] == "prior")
    assert len(replays) > 2 * len(keys) and len(set(map(id, replays))) == len(keys)


def test_a_graph_owns_the_schedule_it_reads(model):
    """Bug 3: the head's graph reads the schedule's tensors. Other step counts (64 distinct pairs, as a client
    can send) must not free them: the same key replayed afterwards still gives the eager tokens."""
    from bitdance_core import sampling

    req = dict(prompt="a red circle", height=64, width=64, steps=3, guidance_scale=4.0, preview_every=0)
    want = _run(Engine(model, EngineConfig(max_batch_requests=4)), [GenerationRequest("b", seed=2, **req)])
    engine = _standin_engine(model)
    _run(engine, [GenerationRequest("a", seed=1, **req)])  # captures ("head", 3, ...)
    for steps in range(4, 70):  # what other requests' step counts do to a cache of 64 schedules
        sampling.schedule(steps, 1.0, "cpu")
        engine.runner._schedule(steps)
    gc.collect()
    captures = engine.runner.graphs.captures
    got = _run(engine, [GenerationRequest("b", seed=2, **req)])
    assert engine.runner.graphs.captures == captures, "the key was replayed, not captured again"
    assert torch.equal(got["b"], want["b"])


def test_undeclared_keys_are_bounded_and_declared_ones_are_captured_at_warmup(model):
    """--max-cuda-graphs bounds the graphs of undeclared keys (LRU); warm-up captures the declared ones, and
    a request at the default step count then captures nothing while it is served."""
    engine = _standin_engine(model, max_cuda_graphs=2, max_batch_requests=1)
    engine.serving = dataclasses.replace(engine.serving, default_steps=2)
    runner = engine.runner
    declared = runner.declared_keys([2])
    assert ("head", 2, 1, 1) in declared and all(("prior", r, n) in declared for r in runner.buckets
                                                 for n in runner.key_lengths())
    assert runner.capture_declared([2]) == {"captured": len(declared), "failed": 0}
    n = len(runner.graphs)
    reqs = [GenerationRequest("a", "a red circle", 64, 64, seed=1, steps=2, guidance_scale=4.0, preview_every=0)]
    want = _run(Engine(model, EngineConfig(max_batch_requests=1)), reqs)
    assert torch.equal(_run(engine, reqs)["a"], want["a"]) and len(runner.graphs) == n
    assert runner.graphs.captures == n, "a declared key was captured while serving"
    for steps in (5, 4, 3):  # longest first: the second noise buffer grows once (a growth drops its graphs)
        _run(engine, [dataclasses.replace(reqs[0], request_id=f"s{steps}", steps=steps)])
    extra = [k for k in runner.graphs if k not in declared]
    assert [k[1] for k in extra] == [4, 3] and len(runner.graphs) == n + 2  # the LRU kept the last two


def test_the_sync_detector_detects():
    with NoHostSync(), pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(2).sum() > 0)
    with NoHostSync(), pytest.raises(AssertionError, match="host sync"):
        torch.arange(4).nonzero()


def test_cuda_graphs_setting_is_validated_and_reported(model):
    with pytest.raises(ValueError, match="cuda_graphs must be auto, on or off"):
        Engine(model, EngineConfig(cuda_graphs="yes"))
    assert Engine(model, EngineConfig(cuda_graphs="auto")).info()["cuda_graphs"] is False  # CPU: never


def test_an_out_of_memory_in_a_capture_goes_to_the_fault_ladder(model):
    """A capture's OOM is not a reason to turn graphs off: the step's requests fail with out_of_memory, the
    admission limit drops, graphs stay on and the next request is captured and served."""
    engine = _standin_engine(model)
    real = engine.runner.graphs.backend

    class OomOnce:
        def capture(self, fn, restore, names):
            self.capture = real.capture
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    engine.runner.graphs.backend = OomOnce()
    req = GenerationRequest("a", "a red circle", 64, 64, seed=1, steps=2, guidance_scale=4.0, preview_every=0)
    failed = []
    engine.add_request(req)
    while engine.has_work():
        failed += [ev for ev in engine.step() if ev.kind is EventKind.FAILED]
    assert [ev.data["code"] for ev in failed] == ["out_of_memory"]
    assert engine.scheduler.max_batch_requests < 4 and engine.runner.use_graphs and not engine.runner.graphs.failed
    want = _run(Engine(model, EngineConfig(max_batch_requests=4)), [dataclasses.replace(req, request_id="b")])
    assert torch.equal(_run(engine, [dataclasses.replace(req, request_id="b")])["b"], want["b"])
