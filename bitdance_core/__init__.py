"""BitDance inference core: model modules, sampler, single-request pipeline and batching engine.

Importing this package does not import torch; ``server/`` relies on that to use
``bitdance_core.engine.protocol`` from a torch-free process.
"""

from __future__ import annotations

__version__ = "0.1.0"


def default_model_dir() -> str:
    """The embedded demo checkpoint shipped in the package (official directory layout)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "assets" / "demo")
