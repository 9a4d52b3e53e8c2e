"""Entry point of a spawned model-worker process (runs in the *child*).

The API process must never import torch, so it cannot resolve ``worker_target`` itself (the real
worker module imports torch at import time). It spawns this trampoline instead, which imports the
target in the child, sets up logging, ignores SIGINT / SIGTERM (sent to the whole process group by
Ctrl-C or ``timeout``; the API process decides when the worker stops), starts a parent-death
watch (a worker orphaned by a kill -9 of the API process exits instead of holding the device),
then calls ``target(config, inbox, outbox)``.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def resolve_target(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"worker target {target!r} is not 'module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent_pid:
            logger.error("API process %d is gone; worker exiting", parent_pid)
            os._exit(3)


def run_worker(
    target: str, log_level: str, parent_pid: int, config: Any, inbox: Any, outbox: Any, env: dict | None = None
) -> None:
    os.environ.update(env or {})  # before the target imports torch (OpenMP reads OMP_* once)
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s %(levelname)s [worker {getattr(config, 'worker_index', '?')}] %(name)s: %(message)s",
    )
    # NOTE: Ctrl-C / a group-wide SIGTERM reach the worker too; the API process owns its lifecycle
    # (Shutdown message, then kill) so a drain can still use it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    fn = resolve_target(target)
    fn(config, inbox, outbox)
