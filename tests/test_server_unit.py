"""Server pieces without a running server: settings/CLI, mailbox coalescing, SSE framing, params,
and the rule that the API process never imports torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from server_harness import REPO, iter_sse

from bitdance_core.engine.protocol import GenerationRequest
from server import cli
from server import settings as settings_mod
from server.errors import APIError
from server.mailbox import RequestState
from server.params import build_request, preview_every_for
from server.routes.generate import negotiate
from server.settings import Settings
from server.sse import frame

INFO = {
    "model": "m",
    "sizes": [[64, 64], [64, 128]],
    "default_size": [64, 64],
    "downsample": 16,
    "parallel_num": 4,
    "defaults": {"steps": 4, "guidance_scale": 4.0, "num_images": 1},
    "limits": {"steps": [1, 8], "guidance_scale": [1.0, 9.0], "num_images": [1, 2], "max_prompt_chars": 20},
}


def test_api_process_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from server.settings import Settings\n"
        "from server.app import create_app\n"
        "import server.cli, server.worker_pool, server.worker_entry, server.routes.openai\n"
        "app = create_app(Settings(devices=['cpu', 'cpu'], model='/nonexistent'))\n"
        "banned = ('torch', 'transformers', 'numpy', 'safetensors')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_settings_env_flags_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITDANCE_DEVICES", "cpu,cpu")
    monkeypatch.setenv("BITDANCE_MAX_QUEUE", "7")
    monkeypatch.setenv("BITDANCE_CORS_ORIGINS", "http://a.test, http://b.test")
    monkeypatch.setenv("BITDANCE_API_KEY", "sekrit")
    s = cli.parse_settings(["--max-queue", "9", "--no-warmup", "--sizes", "64x64,128x64"])
    assert s.devices == ["cpu", "cpu"] and s.max_queue == 9 and s.warmup is False
    assert s.cors_origins == ["http://a.test", "http://b.test"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "sekrit" and "sekrit" not in repr(s)
    configs = s.worker_configs()
    assert [c.worker_index for c in configs] == [0, 1] and configs[0].engine.max_waiting == 9
    assert configs[0].sizes == ((64, 64), (64, 128)) and configs[0].warmup is False


def test_every_setting_is_a_documented_flag() -> None:
    help_text = cli.build_parser().format_help()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert "--" + name.replace("_", "-") in help_text, name


def test_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.serve_main(["--devices", "tpu"]) == 2
    assert "devices" in capsys.readouterr().err
    assert cli.serve_main(["--max-queue", "-1"]) == 2


def test_auto_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_mod.shutil, "which", lambda name: None)
    assert Settings().resolved_devices() == ["cpu"]
    monkeypatch.setattr(settings_mod, "_list_gpus", lambda: 2)
    assert Settings(devices="auto").resolved_devices() == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError):
        Settings(devices="auto,cpu")


def _state() -> RequestState:
    return RequestState(GenerationRequest("r", "p", 64, 64, 0), 0)


def test_mailbox_coalesces_previews_and_keeps_the_terminal() -> None:
    async def run() -> None:
        st = _state()
        st.push("queued", {"position": 3})
        for step in range(1, 50):
            st.push("progress", {"step": step})
            st.push("preview", {"step": step})
        st.push("completed", {"ok": True})
        st.push("preview", {"step": 99})  # after the end: ignored
        got = []
        while (item := await st.get(timeout=0.1)) is not None:
            got.append(item)
        assert got == [("queued", {"position": 3}), ("progress", {"step": 49}), ("preview", {"step": 49}),
                       ("completed", {"ok": True})]  # fmt: skip
        assert st.exhausted and st.status == "completed"

    asyncio.run(run())


def test_mailbox_wakes_a_waiting_consumer() -> None:
    async def run() -> None:
        st = _state()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, st.push, "failed", {"code": "worker_died", "message": "x"})
        assert await st.result() == ("failed", {"code": "worker_died", "message": "x"})
        assert st.status == "worker_died"

    asyncio.run(run())


def test_sse_frame_roundtrip() -> None:
    raw = frame("preview", {"step": 1, "b64_json": "QQ=="}) + b": ping\n\n" + frame("completed", {"seed": 1})
    events = list(iter_sse(iter(raw.decode().split("\n"))))
    assert events == [("preview", {"step": 1, "b64_json": "QQ=="}), ("completed", {"seed": 1})]


def test_accept_negotiation() -> None:
    assert negotiate(None) == "json"
    assert negotiate("*/*") == "json"
    assert negotiate("text/event-stream") == "sse"
    assert negotiate("image/webp;q=0.9, */*") == "webp"
    assert negotiate("application/json, image/png") == "json"


def _build(**kw: object) -> GenerationRequest:
    args = dict(prompt="a", negative_prompt=None, width=None, height=None, size_field="size", num_images=None,
                num_images_field="num_images", steps=None, guidance_scale=None, seed=None, output_format=None,
                preview_every=None)  # fmt: skip
    args.update(kw)
    return build_request(INFO, **args)  # type: ignore[arg-type]


def test_params_defaults_and_random_seed() -> None:
    req = _build()
    assert (req.height, req.width, req.steps, req.guidance_scale, req.num_images) == (64, 64, 4, 4.0, 1)
    assert 0 <= req.seed < 2**31 and req.output_format == "png"
    assert _build(width=128, height=64, seed=5).seed == 5


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"steps": 9}, "steps"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": 9.5}, "guidance_scale"),
        ({"num_images": 3}, "num_images"),
        ({"width": 128, "height": 128}, "size"),
        ({"width": 64}, "height"),
        ({"prompt": "x" * 21}, "prompt"),
        ({"negative_prompt": "x" * 21}, "negative_prompt"),
        ({"prompt": "   "}, "prompt"),
    ],
)
def test_params_out_of_range_is_422_never_clamped(kw: dict[str, object], field: str) -> None:
    with pytest.raises(APIError) as exc:
        _build(**kw)
    assert exc.value.status == 422 and exc.value.field == field


def test_partial_images_cadence() -> None:
    assert preview_every_for(INFO, 64, 64, 0) == 0
    assert preview_every_for(INFO, 64, 64, 3) == 1  # T = 4
    info = {**INFO}
    t = (1024 // 16) ** 2 // 4  # 1024 AR steps
    every = preview_every_for(info, 1024, 1024, 3)
    assert (t - 1) // every >= 3 and every == t // 4


def test_usable_cpus_reads_affinity_and_cgroup_quota(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server import settings as settings_mod

    monkeypatch.setattr(settings_mod.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5})
    root = tmp_path / "cg"
    root.mkdir()
    assert settings_mod.usable_cpus(str(root)) == 6  # no quota file: the affinity mask
    (root / "cpu.max").write_text("max 100000\n")
    assert settings_mod.usable_cpus(str(root)) == 6
    (root / "cpu.max").write_text("250000 100000\n")  # a 2.5-CPU limit
    assert settings_mod.usable_cpus(str(root)) == 2
    (root / "cpu.max").write_text("50000 100000\n")
    assert settings_mod.usable_cpus(str(root)) == 1
    monkeypatch.setattr(settings_mod, "usable_cpus", lambda: 6)
    cfgs = Settings(devices=["cpu", "cpu", "cpu"]).worker_configs()
    assert [c.threads for c in cfgs] == [2, 2, 2] and all(c.interop_threads == 1 for c in cfgs)
    assert Settings(devices=["cpu"]).worker_env("cpu") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert Settings(devices=["cpu"], omp_wait_policy="default").worker_env("cpu") == {}


def test_job_store_bounds_oldest_first_and_remembers_what_it_evicted() -> None:
    from server.jobs import JobStore
    from server.mailbox import RequestState

    store = JobStore(ttl_s=600, max_results=10, max_bytes=2_000_000)

    def finish(i: int, nbytes: int) -> str:
        st = RequestState(GenerationRequest(f"{i:032x}", "p", 64, 64, seed=0, steps=2), 0)
        store.add(st, "job")
        st.push("queued", {"position": 0})
        data = {"images": [{"data": b"x" * nbytes, "format": "png"}], "seed": 0, "width": 64, "height": 64}
        st.push("completed", data)
        return st.request_id

    ids = [finish(i, 600_000) for i in range(3)]  # base64 ~800 kB each: the byte cap keeps two
    assert store.get(ids[0]) is None and store.was_here(ids[0]) == "evicted"
    assert store.get(ids[1]).status == "succeeded" and store.get(ids[2]) is not None
    assert store.get("f" * 32) is None and store.was_here("f" * 32) is None  # unknown: 404, not 410
    store.get(ids[1])  # reading a result does not make it younger: still the first out
    finish(3, 600_000)
    assert store.get(ids[1]) is None and store.get(ids[2]) is not None


def test_openapi_condition_fields_follow_the_served_kind():
    """A text-to-image schema requires a prompt and has no class fields; a class-conditional one takes
    a bounded class_label or an exact class name, and no negative_prompt (what the server enforces)."""
    import jsonschema
    from fastapi.openapi.utils import get_openapi

    from server.app import create_app
    from server.openapi_text import patch_schema

    base = get_openapi(title="t", version="1", routes=create_app().routes)
    limits = {"num_images": [1, 4], "steps": [1, 100], "guidance_scale": [0, 20], "max_prompt_chars": 100}
    t2i = {"kind": "text-to-image", "model": "m", "sizes": [[64, 64]], "limits": limits}
    cc = {**t2i, "kind": "class-conditional", "num_classes": 1000, "class_names": ["goldfish", "tench"],
          "sizes": [[256, 256]]}

    def valid(info: dict, body: dict) -> bool:
        schema = patch_schema(base, info, [])["components"]["schemas"]["GenerateBody"]
        try:
            jsonschema.validate(body, schema)
            return True
        except jsonschema.ValidationError:
            return False

    assert valid(t2i, {"prompt": "a red circle"})
    assert not valid(t2i, {}) and not valid(t2i, {"prompt": None})
    assert not valid(t2i, {"prompt": "a", "class_label": 1})
    assert not valid(t2i, {"prompt": "a", "cfg_schedule": "linear"})
    assert valid(cc, {"class_label": 3}) and valid(cc, {"class_label": [1, 2]}) and valid(cc, {"prompt": "goldfish"})
    assert not valid(cc, {}) and not valid(cc, {"class_label": 1000}) and not valid(cc, {"prompt": "a dog"})
    assert not valid(cc, {"class_label": 1, "negative_prompt": "x"})


CLASS_INFO = {"kind": "class-conditional", "num_classes": 1000, "defaults": {"cfg_schedule": "linear"}}


@pytest.mark.parametrize("label, prompt, ok", [
    (0, "tench", True),  # the prompt names the same class: fine
    (0, "Tench ", True),
    ([0, 0], "tench", True),
    (1, "tench", False),  # class 1 is goldfish
    ([0, 1], "tench", False),
    (0, "a fish", False),  # not a class name at all
])
def test_class_label_with_a_prompt_must_name_the_same_class(label, prompt, ok) -> None:
    from server.class_params import class_params

    def call():
        return class_params(CLASS_INFO, prompt=prompt, negative_prompt=None, class_label=label, num_images=None,
                            num_images_field="num_images", cfg_schedule=None)

    if ok:
        assert set(call()[1]) == {0}
        return
    with pytest.raises(APIError) as e:
        call()
    assert e.value.status == 422 and e.value.field == "class_label"
    assert "class_label" in e.value.message and "prompt" in e.value.message and repr(prompt) in e.value.message
