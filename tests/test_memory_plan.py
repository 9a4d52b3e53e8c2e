"""The memory plan: live-bytes accounting, the engine's measured peaks, the solve, the CLI.

The 14B figures are checked only where they cost no trajectory (weights and KV shapes); the full
14B plans take ~15 s each and are quoted in the README (``bitdance plan``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bitdance_core.engine.engine import Engine, EngineConfig
from bitdance_core.engine.serving_config import ServingConfig
from bitdance_core.families.text_to_image.random_checkpoint import get_preset, model_config
from bitdance_core.planning import memory_plan as mp
from bitdance_core.planning.fake_memory import FakeMode, LiveBytes

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_SIZE = (256, 256)


def test_live_bytes_counts_new_storages_until_freed():
    w = torch.zeros(1000)
    with LiveBytes() as live:
        a = torch.ones(100, 10)  # 4000 bytes
        v = a.view(-1)  # a view: nothing new
        w.add_(1)  # in place on an outside tensor: nothing new
        b = a * 2  # 4000 more
        assert live.current == 8000 and live.peak == 8000
        del a, v
        assert live.current == 4000
        assert live.reset_peak() == 4000
        c = torch.empty(250)  # 1000
        del c
        assert live.peak == 5000 and live.current == 4000
        del b
        assert live.current == 0


def test_parse_bytes():
    assert mp.parse_bytes("80GiB") == 80 * 2**30
    assert mp.parse_bytes("141GB") == 141 * 10**9
    assert mp.parse_bytes("48G") == 48 * 2**30
    assert mp.parse_bytes("1048576") == 2**20
    with pytest.raises(ValueError, match="80GiB"):
        mp.parse_bytes("eighty")


def test_solve_fits_the_peak_it_reports():
    def peaks(n):  # a transient that grows with the batch
        return 100 + 10 * n, 50 + 30 * n

    n, pf, ps = mp.solve(10_000, 500, peaks)
    assert n * 500 + max(pf, ps) <= 10_000 < (n + 1) * 500 + max(peaks(n + 1))
    assert (pf, ps) == peaks(n)
    assert mp.solve(10_000, 500, peaks, cap=3)[0] == 3
    assert mp.solve(400, 500, peaks)[0] == 0


@pytest.mark.parametrize("available", [10_000, 20_000, 47_000, 100_000, 1_000_000])
@pytest.mark.parametrize("slope", [0, 1, 30, 300])
def test_solve_is_the_exhaustive_answer_in_few_runs(available, slope):
    """The solve's N is the largest that fits (checked against every N), found with at most 4 measured runs when the
    peak grows by a few % of a request's KV per request (14B: ~7 %), usually 2 (N + 1 is not measured when the
    peak at N already rules it out)."""
    runs = []

    def peaks(n):
        runs.append(n)
        return 700 + 11 * n, 900 + slope * n + 20 * slope * (n // 7)  # rises with N, in steps (row buckets)

    n, *_ = mp.solve(available, 500, peaks)
    measured = set(runs)
    every = [m for m in range(1, mp.MAX_PLANNED_REQUESTS + 1) if m * 500 + max(peaks(m)) <= available]
    assert n == max(every, default=0)
    assert len(measured) <= (4 if slope <= 30 else 8), measured


@pytest.mark.parametrize("preset,vocab_params", [("14b-64x", 151988 * 5120), ("14b-16x", 151940 * 5120)])
def test_14b_weights_and_kv_shapes(preset, vocab_params):
    p = get_preset(preset)
    cfg = model_config(p, 1000)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = mp.fake_model(cfg, None, torch.bfloat16)
        parts = mp.module_bytes(model)
    # Qwen3-14B without lm_head: ~13.99 B parameters (the embedding included), 2 bytes each
    assert parts["llm"] / 2 == pytest.approx(13.99e9, rel=0.01)
    assert parts["llm"] / 2 - vocab_params == pytest.approx(13.99e9 - vocab_params, rel=0.01)
    assert parts["head"] == pytest.approx(3.5e9, rel=0.05)
    assert parts["ae"] == pytest.approx(0.5e9, rel=0.1)
    kv_row = 2 * cfg.llm.num_layers * cfg.llm.num_kv_heads * cfg.llm.head_dim * 2
    assert kv_row == 160 * 1024
    with FakeTensorMode(allow_non_fake_inputs=True):  # the plan's weights: from the shallow model it runs
        assert mp.planned_weights(mp.fake_model(mp.shallow_config(cfg), None, torch.bfloat16), cfg) == parts


@pytest.mark.slow  # the 40-layer 14B model quantised on fake tensors: 5-9 s
def test_planned_weights_of_an_int8_model():
    from bitdance_core.loading.quantize import fake_build

    cfg = model_config(get_preset("14b-64x"), 1000)
    with FakeMode():
        full = mp.module_bytes(mp.fake_model(cfg, None, torch.bfloat16, fake_build("int8")))
        shallow = mp.fake_model(mp.shallow_config(cfg), None, torch.bfloat16, fake_build("int8"))
        assert mp.planned_weights(shallow, cfg) == full


def test_planned_weights_of_class_conditional_models():
    from bitdance_core.families.class_conditional.random_checkpoint import CLASS_PRESETS

    with FakeMode():
        for name in ("imagenet-b-4x", "imagenet-h-1x"):
            c = CLASS_PRESETS[name].config()
            assert mp.planned_weights(mp.fake_model(mp.shallow_config(c), None, torch.bfloat16), c) == \
                mp.module_bytes(mp.fake_model(c, None, torch.bfloat16)), name


def _tiny():
    from bitdance_core.families.text_to_image.loader import load_tokenizer
    from bitdance_core.families.text_to_image.random_checkpoint import write_tokenizer

    p = get_preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        n = write_tokenizer(p, tmp)
        tok = load_tokenizer(tmp)
    cfg = model_config(p, n, name="tiny")
    serving = ServingConfig.for_model(cfg, {"sizes": [list(TINY_SIZE)], "default_size": list(TINY_SIZE)})
    return cfg, tok, serving


# a whole plan (the solve measures the engine's steps on fake tensors, several times): 15-55 CPU-s each on 2 cores;
# make test-fast runs the accounting tests above and below, the CI gate all of them
PLAN_SOLVE = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.mark.slow  # every AR step on fake tensors, three times: over 60 CPU-s; the CI gate runs it
def test_fast_forward_measures_what_every_step_measures(tiny):
    """The plan skips the AR steps between the second and the next-to-last; stepping through all of
    them must give the same peak (the worst step is the one with the longest keys)."""
    cfg, tok, serving = tiny
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = mp.fake_model(cfg, tok, torch.float32)
        cfg = EngineConfig(max_prefill_rows=4)  # 3 requests of 2 rows: admitted over two steps
        mp.measure_peaks(model, serving, cfg, TINY_SIZE, 3)  # process-wide caches filled once
        fast = mp.measure_peaks(model, serving, cfg, TINY_SIZE, 3)
        full = mp.measure_peaks(model, serving, cfg, TINY_SIZE, 3, fast_forward=False)
    assert fast["ar_step"] > 0 and fast["prefill"] > 0 and fast["decode"] > 0
    assert fast == full


def _deep(cfg, layers=5):
    """The tiny model with 5 prior layers and a head of 6 blocks in 2 adaLN groups (as 14B's)."""
    from dataclasses import replace

    return replace(cfg, llm=replace(cfg.llm, num_layers=layers), head={**cfg.head, "depth_latent": 6,
                                                                       "depth_adanln": 2})


@pytest.mark.slow  # a 5-layer model on fake tensors, twice: ~20 s; test_fake_peaks_equal_real_peaks stays fast
def test_shallow_model_measures_what_the_full_depth_measures(tiny):
    """The plan runs a model of PLAN_LAYERS prior layers and counts what grows with depth at the planned depth
    (the exported prefixes of the prefix cache; weights and KV are not in the peaks): its peaks equal a run of
    the full depth (a 5-layer model, two admission steps, the graph pool on)."""
    cfg, tok, _ = tiny
    deep = _deep(cfg)
    serving = ServingConfig.for_model(cfg, {"sizes": [[128, 128]], "default_size": [128, 128]})  # 16 AR steps
    ecfg = EngineConfig(max_prefill_rows=4)  # 3 requests of 2 rows: admitted over two steps
    with FakeMode():
        dev = mp.plan_device()
        full_model = mp.fake_model(deep, tok, torch.bfloat16, device=dev)
        shallow = mp.fake_model(mp.shallow_config(deep), tok, torch.bfloat16, device=dev)
        assert shallow.llm.kv_layout()[0] == mp.PLAN_LAYERS < 5 and len(shallow.head.net.res_blocks) == 4
        for m in (full_model, shallow):  # the modules' lazily made tables (512 bytes) made once
            mp.measure_peaks(m, serving, ecfg, (128, 128), 1)
        full = mp.measure_peaks(full_model, serving, ecfg, (128, 128), 3)
        fast = mp.measure_peaks(shallow, serving, ecfg, (128, 128), 3, layers=5)
        unscaled = mp.measure_peaks(shallow, serving, ecfg, (128, 128), 3)
        assert mp.engine_shapes(shallow, serving, ecfg, 5) == mp.engine_shapes(full_model, serving, ecfg)
    assert full["graph_pool"] > 0 and full["prefill"] > 0
    assert fast == full
    assert unscaled["ar_step"] < full["ar_step"], (unscaled, full)  # the prefix cache held in the step: at 5 layers


@pytest.mark.slow
def test_fast_plan_equals_the_full_depth_plan(tiny, monkeypatch):
    """A whole plan (weights, KV, peaks, the solve) on the shallow model equals the plan measured at full depth,
    for both families."""
    cfg, tok, _ = tiny
    deep = _deep(cfg)
    gpu = 2**30
    kw = dict(size=(128, 128), reserved_bytes=gpu - 12 * 2**20)
    fast = mp.plan(deep, tok, torch.bfloat16, gpu, **kw)
    monkeypatch.setattr(mp, "PLAN_LAYERS", 5)
    monkeypatch.setattr(mp, "_shallow_head", lambda depth, adaln: (depth, adaln))
    full = mp.plan(deep, tok, torch.bfloat16, gpu, **kw)
    assert fast.max_concurrent_requests >= 2 and fast.fits
    assert fast.as_json() == full.as_json()


@pytest.mark.slow
def test_fast_class_conditional_plan_equals_the_full_depth_plan(monkeypatch):
    from dataclasses import replace

    from bitdance_core.families.class_conditional.random_checkpoint import CLASS_PRESETS

    deep = replace(CLASS_PRESETS["imagenet-tiny"].config(), n_layer=5, diff_layers=6, diff_adanln_layers=2)
    assert (mp.shallow_config(deep).n_layer, mp.shallow_config(deep).diff_layers) == (mp.PLAN_LAYERS, 4)
    gpu = 2**30
    fast = mp.plan(deep, None, torch.bfloat16, gpu, reserved_bytes=gpu - 24 * 2**20)
    monkeypatch.setattr(mp, "PLAN_LAYERS", 5)
    monkeypatch.setattr(mp, "_shallow_head", lambda depth, adaln: (depth, adaln))
    full = mp.plan(deep, None, torch.bfloat16, gpu, reserved_bytes=gpu - 24 * 2**20)
    assert fast.max_concurrent_requests >= 2 and fast.fits
    assert fast.as_json() == full.as_json()


def test_fake_peaks_equal_real_peaks(tiny):
    """The same accounting on real CPU tensors (a real model of the same shapes) gives the same bytes:
    fake tensors change nothing but the data, so the plan is what the real step holds."""
    from bitdance_core.families.text_to_image.loader import LoadedModel, build_modules

    cfg, tok, serving = tiny
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = mp.measure_peaks(mp.fake_model(cfg, tok, torch.float32), serving, EngineConfig(), TINY_SIZE, 2)
    modules = build_modules(cfg, device="cpu")
    for m in modules:
        m.eval().requires_grad_(False)
    real_model = LoadedModel(cfg, mp.Placement(torch.device("cpu"), torch.float32, "test"), *modules, tok)
    real = mp.measure_peaks(real_model, serving, EngineConfig(), TINY_SIZE, 2)
    assert set(real) == set(fake)
    for k in real:  # (a few bytes of process-wide caches filled by whichever run came first)
        assert real[k] == pytest.approx(fake[k], rel=1e-3), k


@pytest.mark.slow  # ~11 s: 18 admission steps on fake tensors
def test_requests_finishing_during_admission_are_decoded_in_the_plan(tiny):
    """With 2 prefill rows a step (``bitdance plan --max-prefill-rows 2``), admitting more requests than a small
    image has AR steps: the first ones finish, and are decoded, inside admission steps, as served. The plan
    measured them on fake tensors instead of failing on their pixels; that step's peak holds the decode."""
    cfg, tok, _ = tiny
    serving = ServingConfig.for_model(cfg, {"sizes": [[64, 64]], "default_size": [64, 64]})
    ecfg = EngineConfig(max_prefill_rows=2)  # one guided request a step
    with FakeMode():
        model = mp.fake_model(cfg, tok, torch.bfloat16, device=mp.plan_device())
        probe = EngineConfig(kv_budget_bytes=2**30, cuda_graphs="off")
        n = Engine(model, probe, serving).sizes.ar_steps(64, 64) + 2
        peaks = mp.measure_peaks(model, serving, ecfg, (64, 64), n)
    assert peaks["decode"] > 0 and peaks["prefill"] >= peaks["decode"], peaks


@PLAN_SOLVE
def test_plan_adds_up(tiny):
    cfg, tok, serving = tiny
    gpu = 2**30
    p = mp.plan(cfg, tok, torch.float32, gpu, size=TINY_SIZE, reserved_bytes=gpu - 48 * 2**20)
    assert p.fits and p.max_concurrent_requests >= 1
    assert p.kv_rows == 2 * p.max_concurrent_requests
    assert p.kv_bytes == p.kv_rows * p.kv_tokens_per_row * p.kv_bytes_per_token_row
    assert p.total_bytes <= gpu
    assert p.device == "cuda" and p.graph_pool_bytes > 0  # the CUDA path, its graph pool a term of its own
    with FakeMode():  # one more request would not fit
        more = mp.measure_peaks(mp.fake_model(cfg, tok, torch.float32, device=mp.plan_device()), serving,
                                EngineConfig(), TINY_SIZE, p.max_concurrent_requests + 1)
    kv_req = 2 * p.kv_tokens_per_row * p.kv_bytes_per_token_row
    assert (p.total_bytes - max(p.peak_prefill_bytes, p.peak_step_bytes) - p.graph_pool_bytes + kv_req
            + max(more["prefill"], more["step"]) + more["graph_pool"]) > gpu
    assert set(p.as_json()) == set(mp.JSON_KEYS)


@PLAN_SOLVE
def test_plan_runs_the_cuda_path(tiny):
    """The plan's engine runs on fake ``cuda`` tensors: the CUDA branches (key lengths rounded to KEY_BUCKET, the
    folded GQA attention) and the graph pool are measured; with graphs off the captured functions' bytes are in
    the step instead."""
    from bitdance_core.engine import runner

    cfg, tok, serving = tiny
    seen = []
    real_feed = runner.Runner._prior_fn

    def spy(self, R, key_len):
        seen.append((self.device.type, key_len, self.cache.max_len))
        return real_feed(self, R, key_len)

    with FakeMode(), mock.patch.object(runner.Runner, "_prior_fn", spy):
        model = mp.fake_model(cfg, tok, torch.bfloat16, device=mp.plan_device())
        mp.measure_peaks(model, serving, EngineConfig(), TINY_SIZE, 1)  # process-wide caches filled once
        on = mp.measure_peaks(model, serving, EngineConfig(), TINY_SIZE, 2)
        off = mp.measure_peaks(model, serving, EngineConfig(cuda_graphs="off"), TINY_SIZE, 2)
        shared: dict = {}  # the plan's runs share the decode's measurement (it depends on the decode batch only)
        mp.measure_peaks(model, serving, EngineConfig(), TINY_SIZE, 3, decode_cache=shared)
        assert mp.measure_peaks(model, serving, EngineConfig(), TINY_SIZE, 2, decode_cache=shared) == on
    assert seen and all(d == "cuda" and (k % runner.KEY_BUCKET == 0 or k == top) for d, k, top in seen), seen
    assert on["graph_pool"] > 0 and off["graph_pool"] == 0
    assert off["ar_step"] > on["ar_step"]  # graphs off: the captured functions' transient is the step's


@PLAN_SOLVE
def test_class_conditional_plan(tmp_path):
    """``bitdance plan`` for a class-conditional preset: the family builds the model and makes the requests."""
    p = mp.plan_preset("imagenet-tiny", 2**30, "bfloat16", reserved_bytes=2**30 - 64 * 2**20)
    assert p.fits and p.max_concurrent_requests >= 1 and p.size == (256, 256) and p.device == "cuda"
    assert [k for k, _ in p.weights_by_module] == ["transformer", "head", "ae"]
    with pytest.raises(ValueError, match="unquantised"):
        mp.plan_preset("imagenet-tiny", 2**30, build=object())
    with pytest.raises(ValueError, match="256x256 only"):
        mp.plan_preset("imagenet-tiny", 2**30, size=(512, 512))


@PLAN_SOLVE
def test_does_not_fit_says_what_would(tiny):
    """A plan that does not fit names what would fit one request: --quantize int8 (its weights built as that load
    keeps them), a smaller size, and the device size one request needs."""
    cfg, tok, serving = tiny
    none = mp.plan(cfg, tok, torch.bfloat16, 2**20, size=TINY_SIZE, reserved_bytes=0)
    assert not none.fits and none.max_concurrent_requests == 0
    need = (none.weights_bytes + 2 * none.kv_tokens_per_row * none.kv_bytes_per_token_row
            + max(none.peak_prefill_bytes, none.peak_step_bytes) + none.graph_pool_bytes)
    assert any(x.startswith(f"a device of at least {mp.gib(need)}") for x in none.suggestions), none.suggestions
    from bitdance_core.loading.quantize import fake_build

    with FakeMode():
        w8 = sum(mp.module_bytes(mp.fake_model(cfg, tok, torch.bfloat16, fake_build("int8"))).values())
    gpu = need - (none.weights_bytes - w8) // 2  # between the int8 need and the bfloat16 need
    p = mp.plan(cfg, tok, torch.bfloat16, gpu, size=TINY_SIZE, reserved_bytes=0)
    assert not p.fits and any(s.startswith("--quantize int8") for s in p.suggestions), p.suggestions


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bitdance_core.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


@PLAN_SOLVE
def test_cli_json_has_exactly_the_keys():
    r = _cli("--preset", "tiny", "--gpu-memory", "1.06GiB", "--size", "256x256", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out) == list(mp.JSON_KEYS)
    assert out["fits"] is True and out["gpu_memory_bytes"] == int(1.06 * 2**30)
    assert out["max_concurrent_requests"] * 2 == out["kv_rows"]


def test_cli_plans_at_the_engine_knobs_given(monkeypatch, capsys):
    """``bitdance plan`` takes the knobs the plan measures (``EngineConfig``'s ``planned`` ones) as ``bitdance serve``
    does, and plans the engine at those values; the server's bounds hold."""
    from bitdance_core import cli
    from bitdance_core.engine.engine_config import plan_knobs

    assert [k.flag for k in plan_knobs()] == ["--max-prefill-rows", "--prefix-cache-entries", "--cuda-graphs",
                                              "--decode-batch"]
    seen = {}

    def fake_plan(preset, gpu, dtype, size, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(mp, "plan_preset", fake_plan)
    argv = ["plan", "--preset", "tiny", "--gpu-memory", "8GiB"]
    assert cli.main([*argv, "--max-prefill-rows", "2", "--decode-batch", "3", "--cuda-graphs", "off"]) == 2
    assert seen["engine_config"] == EngineConfig(max_prefill_rows=2, decode_batch=3, cuda_graphs="off")
    assert cli.main(argv) == 2 and seen["engine_config"] == EngineConfig()
    assert cli.main([*argv, "--max-prefill-rows", "0"]) == 2
    assert "--max-prefill-rows must be >= 1, got 0" in capsys.readouterr().err


@PLAN_SOLVE
def test_cli_model_dir_and_not_fitting_exit_1():
    from bitdance_core import default_model_dir

    r = _cli("--model", default_model_dir(), "--gpu-memory", "1GiB", "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert list(out) == list(mp.JSON_KEYS) and out["fits"] is False and out["max_concurrent_requests"] == 0
    assert "does not fit" in r.stderr and "needs" in r.stderr and "1.00 GiB" in r.stderr
    assert (r.stdout + r.stderr).count("does not fit") == 1, r.stderr  # said once
    assert "what would fit one request" in r.stderr and "a device of at least" in r.stderr
    assert "bitdance plan: N=1: admission step 1" in r.stderr  # progress: one line per measured step
    assert "bitdance plan: N=1: final decode" in r.stderr
    r = _cli("--preset", "nope", "--gpu-memory", "8GiB")
    assert r.returncode == 2 and "unknown preset" in r.stderr
    r = _cli("--preset", "tiny", "--gpu-memory", "lots")
    assert r.returncode == 2 and "--gpu-memory" in r.stderr


@pytest.mark.slow  # ~15 s; the CUDA tier's fast test runs plan_on_device through build_engine
def test_engine_start_up_plan_on_a_pretend_device(tiny, monkeypatch):
    """``plan_on_device`` (what the engine runs on CUDA when no KV budget is set): what the free memory
    leaves after the measured peak and the slack, at most max_batch_requests requests."""
    from bitdance_core.families.text_to_image.loader import LoadedModel, build_modules

    cfg, tok, serving = tiny
    modules = build_modules(cfg, device="cpu")
    model = LoadedModel(cfg, mp.Placement(torch.device("cpu"), torch.float32, "test"), *modules, tok)
    total = 2**30
    free = int(mp.RESERVED_FRACTION * total) + 40 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    p = mp.plan_on_device(model, serving, EngineConfig(max_batch_requests=8))
    assert 1 <= p.max_concurrent_requests <= 8
    assert p.kv_bytes + max(p.peak_prefill_bytes, p.peak_step_bytes) <= free - int(mp.RESERVED_FRACTION * total)
    assert p.weights_bytes == sum(t.numel() * 4 for m in modules for t in [*m.parameters(), *m.buffers()])


def test_the_step_peak_holds_the_noise_buffer_of_the_longest_allowed_request(tiny):
    """A request may ask for up to ``limits.steps`` sampler steps; the runner keeps ``steps + 1`` noise slices
    for it for the engine's life (plus the warm-up's default-step buffer beside it with graphs on), so the plan
    counts that buffer, not the 3 slices of its own 2-step requests."""
    from dataclasses import replace

    from bitdance_core.engine.serving_config import Limits

    cfg, tok, serving = tiny
    short = replace(serving, limits=Limits(steps=(1, 10)))
    long = replace(serving, limits=Limits(steps=(1, 110)))
    ecfg = EngineConfig(cuda_graphs="off")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = mp.fake_model(cfg, tok, torch.float32)
        mp.measure_peaks(model, short, ecfg, TINY_SIZE, 1)  # process-wide caches filled once
        a = mp.measure_peaks(model, short, ecfg, TINY_SIZE, 2)
        b = mp.measure_peaks(model, long, ecfg, TINY_SIZE, 2)
        from bitdance_core.engine.engine import Engine

        shapes = mp.engine_shapes(model, serving, ecfg)
        probe = Engine(model, replace(ecfg, max_batch_requests=2, max_waiting=2,
                                      kv_budget_bytes=4 * shapes.kv_tokens_per_row * shapes.kv_bytes_per_token_row),
                       serving)
        noise = probe.runner.noise  # (slices, rows, P, C): no slice reserved yet
        slice_bytes = math.prod(noise.shape[1:]) * noise.element_size()
    assert b["step"] - a["step"] == 100 * slice_bytes > 0
