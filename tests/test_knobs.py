"""Every engine knob is declared once (``EngineConfig``) and reaches every surface: a ``bitdance serve`` flag, a
``BITDANCE_*`` variable, a Settings field with the declared default and help, the ``WorkerConfig`` the worker
gets, and the generated docs (deploy/env.example, README). Torch-free."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from bitdance_core.engine.engine_config import DEFAULTS, EngineConfig, Knob, knobs
from bitdance_core.engine.protocol import WorkerConfig
from server import cli, knob_docs
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KNOBS = knobs()
# Fields of the same name that are another concept: a request's own preview interval (the knob is its default)
NOT_KNOBS = {("bitdance_core/engine/protocol.py", "preview_every"),
             ("bitdance_core/engine/request.py", "preview_every"), ("server/params.py", "preview_every")}
# Where a restated knob would hide: the worker config, the server, the fake worker, the engine's own parts
SCANNED = [*sorted((ROOT / "bitdance_core").rglob("*.py")), *sorted((ROOT / "server").rglob("*.py")),
           ROOT / "tests" / "fake_worker.py"]


def _other_value(k: Knob) -> tuple[str, typing.Any]:
    """A valid value that is not the default, as an env string and as parsed."""
    if k.choices:
        value = next(c for c in k.choices if c != k.default)
        return value, value
    if k.type is bool:
        return str(not k.default).lower(), not k.default
    value = (k.default or 0) + 3
    return str(value), value


def test_every_field_is_a_declared_knob():
    assert [k.field for k in KNOBS] == [f for f in EngineConfig.__dataclass_fields__]
    for k in KNOBS:
        assert k.help and k.help.strip().endswith("."), k.field
        assert k.default == getattr(DEFAULTS, k.field)
    settings_names = [k.setting for k in KNOBS]
    assert len(settings_names) == len(set(settings_names)), "two knobs share a flag / variable"
    assert {"max_queue", "max_batch_requests", "kv_budget_bytes", "preview_every", "cuda_graphs",
            "max_cuda_graphs"} <= set(settings_names), "a flag / variable name clients use was renamed"


def test_each_knob_is_a_flag_with_its_help_and_a_settings_field():
    help_text = " ".join(cli.build_parser().format_help().split())
    for k in KNOBS:
        assert k.flag in help_text and k.env in help_text, k.field
        field = Settings.model_fields[k.setting]
        assert field.description == k.help and field.get_default() == k.default, k.field
        if k.choices:
            assert cli._choices(field.annotation) == list(k.choices), k.field


@pytest.mark.parametrize("k", KNOBS, ids=[k.field for k in KNOBS])
def test_each_knob_from_env_and_flag_reaches_the_worker(k: Knob, monkeypatch: pytest.MonkeyPatch):
    text, value = _other_value(k)
    monkeypatch.setenv(k.env, text)
    from_env = cli.parse_settings(["--devices", "cpu"])
    assert getattr(from_env, k.setting) == value
    assert getattr(from_env.worker_configs()[0].engine, k.field) == value
    monkeypatch.delenv(k.env)
    argv = ["--devices", "cpu", *([k.flag if value else "--no-" + k.flag[2:]] if k.type is bool else [k.flag, text])]
    from_flag = cli.parse_settings(argv).worker_configs()[0].engine
    assert from_flag == EngineConfig(**{k.field: value}), "a flag set another knob too"
    if k.ge is not None:  # the declared bound is enforced at the settings
        assert cli.serve_main(["--devices", "cpu", k.flag, str(k.ge - 1)]) == 2


def test_the_worker_config_carries_the_engine_config_whole():
    names = {f.name for f in dataclasses.fields(WorkerConfig)}
    assert not names & {k.field for k in KNOBS}, "a knob forwarded by hand next to WorkerConfig.engine"
    assert WorkerConfig("m").engine == DEFAULTS


def test_no_knob_is_declared_twice():
    """Outside engine_config.py no class field or parameter declares a knob with its own default (a literal)."""
    found = []
    for path in SCANNED:
        rel = path.relative_to(ROOT).as_posix()
        if rel == "bitdance_core/engine/engine_config.py":
            continue
        text = path.read_text()
        for k in KNOBS:
            for name in {k.field, k.setting} - {n for f, n in NOT_KNOBS if f == rel}:
                # `name: type = <default>` with a default that is not EngineConfig's (DEFAULTS.x / config.x)
                for m in re.finditer(rf"\b{name}[ \t]*:[ \t]*[\w\[\], |.]+?=[ \t]*(?!DEFAULTS\.|\w*config\.)\S", text):
                    found.append(f"{rel}: {m.group(0)}")
                found += [f"{rel}: {name} Field" for _ in re.finditer(rf"\b{name}[ \t]*:[^\n]*=[ \t]*Field\(", text)]
    assert not found, found


def test_generated_docs_match_the_declaration():
    assert knob_docs.stale() == [], "run: python -m server.knob_docs"
    env = knob_docs.ENV_EXAMPLE.read_text()
    readme = knob_docs.README.read_text()
    for k in KNOBS:
        assert env.count(f"# {k.env}=") == 1 and f"`{k.flag}`" in readme, k.field
