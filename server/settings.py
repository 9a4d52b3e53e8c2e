"""All HTTP-server settings, in one pydantic-settings class (env prefix ``BITDANCE_``).

This is the only place on the API side that reads the environment. ``bitdance serve`` flags are
generated from these fields (:mod:`server.cli`), so ``--max-queue 8`` and ``BITDANCE_MAX_QUEUE=8``
are the same knob; a flag wins over the environment. List-valued settings take comma-separated
strings (``BITDANCE_DEVICES=cuda:0,cuda:1``). The engine's knobs are not declared here: their fields are
generated from :class:`~bitdance_core.engine.engine_config.EngineConfig` (name, type, default, bounds, help), and
``worker_configs`` hands them back to the worker as one ``EngineConfig``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, create_model, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bitdance_core.cpu_threads import thread_env, usable_cpus
from bitdance_core.engine.engine_config import ENV_PREFIX, from_settings, knobs
from bitdance_core.engine.protocol import WorkerConfig

logger = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|auto)$")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _WorkerSettings(BaseSettings):
    """The model and worker fields of :class:`Settings` (declared first: the flags keep this order)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- model and workers -------------------------------------------------------------------
    model: str | None = Field(
        None, description="Checkpoint directory (official BitDance layout), or a class-conditional BitDance_*.pt "
        "file (ImageNet). Default: the embedded demo model."
    )
    vae: str | None = Field(None, description="Class-conditional models: the autoencoder .pt (default: ae_d16c32.pt, "
                                              "or the only ae*.pt, beside the model file).")
    model_args: str | None = Field(None, description="Class-conditional models: architecture JSON, for files whose "
                                                     "name, args and tensor shapes cannot tell it.")
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="One model worker per entry: 'cpu', 'cuda', 'cuda:N', comma-separated "
        "(e.g. 'cuda:0,cuda:1' or 'cpu,cpu'); 'auto' = every GPU listed by `nvidia-smi -L`, else cpu.",
    )
    worker_target: str = Field(
        "bitdance_core.worker.worker:worker_main",
        description="Import path 'module:function' of the worker main, called as fn(WorkerConfig, inbox, "
        "outbox) in a spawned process (tests point it at a fake worker).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Compute dtype; default: the device policy (float32 on CPU, bfloat16 on CUDA)."
    )
    quantize: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="Weight-only quantisation of the prior's linear layers at load: int8 (CPU and CUDA), fp8 (CUDA "
        "compute capability >= 8.9); a pre-quantised --model (`bitdance quantize`) loads as stored.",
    )
    attention_backend: Literal["auto", "sdpa", "xformers"] = Field(
        "auto", description="Attention kernels in the worker."
    )


def _engine_fields() -> dict[str, Any]:
    """One settings field per engine knob, as ``EngineConfig`` declares it (name, type, default, bounds, help)."""
    out: dict[str, Any] = {}
    for k in knobs():
        annotation = k.type
        if k.choices:  # str -> Literal[...] (so --help and argparse show and check them)
            annotation = Literal[k.choices]  # type: ignore[valid-type]
        out[k.setting] = (annotation, Field(k.default, ge=k.ge, description=k.help))
    return out


# the engine knobs follow the model and worker fields (flag and env.example order); their declaration is
# EngineConfig's (bitdance_core/engine/engine_config.py), never repeated here
_EngineSettings = create_model("_EngineSettings", __base__=_WorkerSettings, **_engine_fields())


class Settings(_EngineSettings):  # type: ignore[misc,valid-type]
    """Settings of ``bitdance serve``. Every field is also a ``BITDANCE_<NAME>`` variable and a flag; the
    engine's knobs come from :class:`~bitdance_core.engine.engine_config.EngineConfig`."""

    sizes: Annotated[list[str], NoDecode] | None = Field(
        None,
        description="Allowed sizes as 'WxH', comma-separated; default: the checkpoint's size policy.",
    )
    warmup: bool = Field(True, description="Warm the worker up (compile / first step) before it is ready.")
    threads: int | None = Field(
        None,
        ge=1,
        description="Torch intra-op threads per CPU worker; default: the CPUs this process may use "
        "(sched_getaffinity, cgroup cpu.max quota) divided among the CPU workers.",
    )
    interop_threads: int = Field(1, ge=1, description="Torch inter-op threads per CPU worker.")
    omp_wait_policy: Literal["passive", "active", "default"] = Field(
        "passive",
        description="OpenMP wait policy of CPU workers (OMP_WAIT_POLICY): 'passive' sleeps instead of "
        "spinning between parallel regions (see bench/bench_contention.py); 'default' leaves it unset.",
    )
    worker_hang_s: float = Field(
        120.0,
        gt=0,
        description="A ready worker silent (no heartbeat) this long with requests in flight is killed "
        "(SIGKILL) and restarted; its requests end 503 worker_hung.",
    )
    worker_ready_timeout_s: float = Field(
        900.0, gt=0, description="A worker not ready after this long is killed and restarted."
    )
    restart_backoff_s: float = Field(
        1.0, ge=0, description="First delay before restarting a dead worker (doubles while it keeps failing)."
    )
    keep_serving_on_load_error: bool = Field(
        False,
        description="A model that cannot load (no such path, a bad config or checkpoint) keeps the server up with "
        "/readyz 503 naming the error, instead of exiting non-zero; never a restart loop.",
    )

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 to listen on all).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    api_key: SecretStr | None = Field(
        None,
        description="If set, every API route needs 'Authorization: Bearer <key>' (/healthz, /readyz, "
        "/metrics, the web page and /docs stay open).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Allowed CORS origins, comma-separated ('*' for any); empty = CORS off."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (else 413).")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Per-request deadline; past it the request is cancelled (504 / error event)."
    )
    drain_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM: how long in-flight requests may run on before being cancelled."
    )
    job_ttl_s: float = Field(600.0, gt=0, description="How long a finished job's result stays available.")
    job_max_results: int = Field(256, ge=1, description="Most finished job results kept (oldest evicted first).")
    job_max_bytes: int = Field(
        256 * 2**20, ge=2**20, description="Most bytes of finished job results kept (oldest evicted first)."
    )
    stream_heartbeat_s: float = Field(15.0, gt=0, description="SSE keep-alive comment interval.")

    # --- several replicas (server/shared_queue.py) -----------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis/Valkey URL (redis://host:6379/0) of a queue shared by several replicas: jobs, events "
        "and results live there, any replica accepts, runs and answers. Unset: in memory, one replica.",
    )
    job_lease_s: float = Field(
        30.0,
        gt=0,
        description="With redis_url: a running job's lease, renewed by its replica; a job whose replica stops "
        "renewing is re-run elsewhere after this long.",
    )
    job_max_attempts: int = Field(
        3, ge=1, description="With redis_url: runs of one job (first + re-runs after a lost replica), then worker_died."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    access_log: bool = Field(False, description="Log every HTTP request (uvicorn access log).")
    a1111_api: bool = Field(
        False, description="Serve the AUTOMATIC1111-compatible routes (/sdapi/v1/txt2img, progress, interrupt, "
        "sd-models, options) for text-to-image models."
    )

    # --- binary tokenizer (POST /v1/tokenize, /v1/detokenize) ------------------------------------
    tokenizer_routes: bool = Field(
        False, description="Serve POST /v1/tokenize and /v1/detokenize with the model's autoencoder (loads its "
        "encoder too); always on when --model is a lone autoencoder file (*.safetensors, ae*.pt).",
    )
    ae_config: str | None = Field(
        None, description="A lone autoencoder --model: its JSON config ({ddconfig, gan_decoder}); default: "
        "<stem>_config.json, <stem>.json, ae_config.json or config.json beside it.",
    )

    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["bitdance"],
        description="Other names the OpenAI routes accept for the served model in 'model', comma-separated "
        "(e.g. 'bitdance,gpt-image-1' for clients that insist on a name).",
    )

    @field_validator("devices", "cors_origins", "sizes", "model_aliases", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one device is needed")
        for dev in value:
            if not _DEVICE_RE.match(dev):
                raise ValueError(f"unknown device {dev!r}: use cpu, cuda, cuda:N or auto")
        if "auto" in value and len(value) > 1:
            raise ValueError("'auto' cannot be combined with other devices")
        return value

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for size in value:
            if not _SIZE_RE.match(size):
                raise ValueError(f"size {size!r} is not 'WxH' (e.g. 1024x768)")
        return value

    # --- derived -------------------------------------------------------------------------------
    def resolved_devices(self) -> list[str]:
        """The device list with 'auto' expanded (``nvidia-smi -L``, else one cpu worker)."""
        if self.devices != ["auto"]:
            return list(self.devices)
        gpus = _list_gpus()
        return [f"cuda:{i}" for i in range(gpus)] if gpus else ["cpu"]

    def resolved_model_dir(self) -> str:
        if self.model:
            return os.path.abspath(self.model)
        from bitdance_core import default_model_dir  # torch-free by contract

        return default_model_dir()

    def tokenizer_enabled(self) -> bool:
        from bitdance_core.tokenize import is_autoencoder_file  # torch-free

        return self.tokenizer_routes or is_autoencoder_file(self.resolved_model_dir())

    def sizes_hw(self) -> tuple[tuple[int, int], ...] | None:
        if self.sizes is None:
            return None
        out = []
        for size in self.sizes:
            w, h = (int(v) for v in size.split("x"))
            out.append((h, w))
        return tuple(out)

    def worker_env(self, device: str) -> dict[str, str]:
        """Environment a worker process needs before torch loads (OpenMP reads it once, at start)."""
        return thread_env(self.omp_wait_policy) if device == "cpu" else {}

    def worker_configs(self) -> list[WorkerConfig]:
        devices = self.resolved_devices()
        n_cpu = sum(1 for d in devices if d == "cpu")
        threads = self.threads or (max(1, usable_cpus() // n_cpu) if n_cpu else None)  # bitdance_core.cpu_threads
        engine = from_settings(self)
        return [
            WorkerConfig(
                model_dir=self.resolved_model_dir(),
                vae=os.path.abspath(self.vae) if self.vae else None,
                model_args=os.path.abspath(self.model_args) if self.model_args else None,
                device=dev,
                dtype=self.dtype,
                quantize=self.quantize,
                attention_backend=self.attention_backend,
                engine=engine,
                sizes=self.sizes_hw(),
                warmup=self.warmup,
                worker_index=i,
                threads=threads if dev == "cpu" else None,
                interop_threads=self.interop_threads if dev == "cpu" else None,
                tokenizer=self.tokenizer_enabled(),
                ae_config=os.path.abspath(self.ae_config) if self.ae_config else None,
            )
            for i, dev in enumerate(devices)
        ]


def _list_gpus() -> int:
    """Number of GPUs ``nvidia-smi -L`` lists (0 without the tool or on any failure)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi -L failed (%s); using cpu", exc)
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
