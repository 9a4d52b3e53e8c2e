"""bitdance-serve HTTP front end (FastAPI + uvicorn).

This package never imports torch, directly or indirectly: the model runs in worker processes
spawned by :mod:`server.worker_pool`, and the only module of ``bitdance_core`` used here is the
torch-free message contract ``bitdance_core.engine.protocol`` (plus ``default_model_dir``).
Importing ``server`` itself imports nothing heavy; build an app with ``server.app.create_app``
or run ``server.cli.serve_main``.
"""

from __future__ import annotations
