"""``bitdance serve``: flags generated from :class:`server.settings.Settings`, then uvicorn.

Each settings field ``foo_bar`` is a flag ``--foo-bar`` (booleans: ``--foo-bar/--no-foo-bar``)
whose help is the field's description; flags override ``BITDANCE_*`` variables, which override
the defaults. A model that cannot load (no such path, a missing or invalid config, a checkpoint that fails strict
loading) is found before listening where possible (exit 2), else when the first worker fails to load it (exit 3),
with the loader's message on stderr; ``--keep-serving-on-load-error`` stays up instead, ``/readyz`` 503 naming the
error, and never restarts the worker. SIGTERM (or a first Ctrl-C) drains: new requests get 503, in-flight ones get
``drain_grace_s`` to finish, the workers get ``Shutdown``, and the process exits 0. A second
signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import typing
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from server.settings import Settings

logger = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    """The values of a ``Literal`` field (also inside ``X | None``), for ``--help`` and argparse's check."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return [str(v) for v in typing.get_args(arg)]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitdance serve",
        description="Serve BitDance over HTTP: a text-to-image checkpoint directory, or a class-conditional "
        "ImageNet BitDance_*.pt file (--model). Every flag is also a BITDANCE_<NAME> variable.",
    )
    for name, field in Settings.model_fields.items():
        env = Settings.model_config["env_prefix"] + name.upper()
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{field.description or ''} [env {env}; default {shown}]".replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            choices = _choices(field.annotation)
            parser.add_argument(
                _flag(name),
                dest=name,
                default=argparse.SUPPRESS,
                metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                choices=choices,
                help=help_text,
            )
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from flags (``argv``, default ``sys.argv[1:]``) over the environment."""
    args = build_parser().parse_args(argv)
    return Settings(**vars(args))


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of ``bitdance serve`` / ``python -m server``; returns the exit status."""
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            sys.stderr.write(f"bitdance serve: invalid setting {loc}: {err['msg']}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, load_error = _resolve_model(settings)
    if load_error is not None and not settings.keep_serving_on_load_error:
        sys.stderr.write(f"bitdance serve: cannot serve the model: {load_error}\n")
        return 2

    from server.app import create_app

    app = create_app(settings)
    app.state.pool.load_error = load_error
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    server = DrainingServer(config, app)
    if not settings.keep_serving_on_load_error:
        app.state.pool.on_load_error = server.stop_on_load_error
    logger.info(
        "serving %s on http://%s:%d (devices %s)",
        settings.resolved_model_dir(),
        settings.host,
        settings.port,
        ",".join(settings.resolved_devices()),
    )
    server.run()
    if server.load_error is not None:
        sys.stderr.write(f"bitdance serve: the model could not be loaded: {server.load_error}\n")
        return 3
    return 0 if server.started and not server.force_exit else 1


def _resolve_model(settings: Settings) -> tuple[Settings, str | None]:
    """``--model`` resolved (a directory holding one class-conditional ``.pt``: that file) and checked before the
    server listens: an error here is one no restart fixes."""
    from bitdance_core.loading.io import CheckpointError
    from bitdance_core.model_path import resolve_model_path

    try:
        model = resolve_model_path(settings.resolved_model_dir())
    except CheckpointError as exc:
        return settings, str(exc)
    return settings.model_copy(update={"model": model}), None


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with a drain before the usual graceful shutdown, and exit status 0."""

    def __init__(self, config: Any, app: Any) -> None:
        super().__init__(config)
        self.app = app
        self.load_error: str | None = None
        self._draining = False
        self._drain_task: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def stop_on_load_error(self, message: str) -> None:
        """The first load failed in a way no restart fixes: stop listening and exit non-zero."""
        self.load_error = message
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: not recorded in _captured_signals, so uvicorn does not re-raise it after a clean exit
        if not self._draining and self._loop is not None and not self.should_exit:
            self._draining = True
            logger.info("received %s: draining", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        logger.warning("second signal: exiting now")
        self.force_exit = True
        self.should_exit = True

    def _start_drain(self) -> None:
        from server.app import drain

        async def run() -> None:
            try:
                await drain(self.app)
            finally:
                self.should_exit = True

        self._drain_task = asyncio.ensure_future(run())
