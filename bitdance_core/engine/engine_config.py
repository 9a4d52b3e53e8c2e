"""The engine's knobs: each declared once, here, with its default, type, help, allowed values and name.

``EngineConfig`` is the only declaration of these knobs. Each field's metadata (see :func:`knob`) carries what
everything else derives from it: the worker's ``WorkerConfig`` carries an ``EngineConfig`` as is, and the
server's settings, ``bitdance serve`` flags, ``BITDANCE_*`` variables, ``deploy/env.example`` and the README
table are generated from :func:`knobs` (``server/settings.py``, ``server/knob_docs.py``); the fake test worker
reads the same ``EngineConfig``. A knob's *setting* name is the field name unless declared otherwise
(``max_waiting`` is ``--max-queue`` / ``BITDANCE_MAX_QUEUE``, the name clients already use).

Standard library only (the API process imports it).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any

CUDA_GRAPHS = ("auto", "on", "off")
PREVIEW_METHODS = ("auto", "full", "linear")
ENV_PREFIX = "BITDANCE_"


def knob(default: Any, help: str, *, choices: tuple[str, ...] | None = None, setting: str | None = None,
         ge: int | None = None, planned: bool = False) -> Any:
    """An ``EngineConfig`` field: its default and everything the settings, flags and docs need.

    ``help`` is the text of ``--help``, of ``deploy/env.example`` and of the README table; ``choices`` the
    allowed strings; ``setting`` the flag / variable name when it is not the field's; ``ge`` the least
    allowed value of an integer (``None`` stays allowed where the type has it); ``planned``: the memory plan measures
    the engine at this value, so ``bitdance plan`` takes it too."""
    return field(default=default, metadata={"help": help, "choices": choices, "setting": setting, "ge": ge,
                                            "planned": planned})


@dataclass(frozen=True)
class EngineConfig:
    max_batch_requests: int = knob(
        16, "Most requests batched together in one engine step, per worker (halved for a while after a step "
        "runs out of device memory).", ge=1)
    max_waiting: int = knob(
        64, "Requests allowed to wait per worker beyond the running batch; past that, new requests get 429 "
        "queue_full.", setting="max_queue", ge=0)
    max_prefill_rows: int | None = knob(
        32, "KV rows admitted (prefilled) per engine step: bounds the prefill's memory, which the memory plan "
        "measures at this value.", ge=1, planned=True)
    kv_budget_bytes: int | None = knob(
        None, "KV-cache budget per worker in bytes; unset: the memory plan on CUDA (`bitdance plan`: the GPU "
        "memory left after the weights and the measured peak of a max-batch step), 1 GiB on CPU.", ge=1)
    preview_every: int | None = knob(
        None, "Default autoregressive steps between streamed previews (0 = none); unset: about 8 per image.",
        ge=0)
    preview_method: str = knob(
        "auto", "How previews are drawn: full (the autoencoder decodes the partial grid), linear (a fitted "
        "per-token colour map, cheap), auto (full when its decodes add under 10% to a request, measured at start).",
        choices=PREVIEW_METHODS)
    prefix_cache_entries: int = knob(
        32, "Unconditional prefixes kept for reuse (one per size and negative prompt), least recently used out; "
        "0 = none kept.", ge=0, planned=True)
    profile: bool = knob(
        False, "Synchronise CUDA around each engine phase so the phase timings (metrics, logs) are exact; "
        "slows serving.")
    cuda_graphs: str = knob(
        "auto", "CUDA graphs for the head's sampler loop and the prior step: auto (on for CUDA), on, off. The "
        "warm-up captures those of the default step count at every batch bucket.", choices=CUDA_GRAPHS, planned=True)
    max_cuda_graphs: int = knob(
        16, "CUDA graphs captured while serving, beyond the warm-up's (other step counts), least recently used "
        "first out; 0 = those run without a graph.", ge=0)
    decode_batch: int = knob(
        1, "Requests whose final images are decoded together: bounds the decoder's full-size activations "
        "(the memory plan measures it at this value).", ge=1, planned=True)


DEFAULTS = EngineConfig()


@dataclass(frozen=True)
class Knob:
    """One engine knob as the settings, the flags and the docs see it (built from ``EngineConfig``'s fields)."""

    field: str  # the EngineConfig field
    setting: str  # the Settings field, flag --<setting with dashes> and variable BITDANCE_<SETTING>
    type: Any  # the field's type (``int | None``, ``str``, ``bool``)
    default: Any
    help: str
    choices: tuple[str, ...] | None
    ge: int | None
    planned: bool = False  # the memory plan measures the engine at this value (a `bitdance plan` flag too)

    @property
    def flag(self) -> str:
        return "--" + self.setting.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.setting.upper()


def knobs() -> tuple[Knob, ...]:
    """Every engine knob, in declaration order."""
    hints = typing.get_type_hints(EngineConfig)
    return tuple(Knob(f.name, f.metadata.get("setting") or f.name, hints[f.name], f.default, f.metadata["help"],
                      f.metadata.get("choices"), f.metadata.get("ge"), f.metadata.get("planned", False))
                 for f in fields(EngineConfig))


def plan_knobs() -> tuple[Knob, ...]:
    """The knobs the memory plan measures the engine at (``bitdance plan`` takes them as ``bitdance serve`` does)."""
    return tuple(k for k in knobs() if k.planned)


def from_settings(values: Any) -> EngineConfig:
    """The ``EngineConfig`` of an object holding each knob under its setting name (the server's settings)."""
    return EngineConfig(**{k.field: getattr(values, k.setting) for k in knobs()})
