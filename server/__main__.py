"""``python -m server [flags]``: the same as ``bitdance serve [flags]``."""

from __future__ import annotations

from server.cli import serve_main

if __name__ == "__main__":  # NOTE: the guard matters, worker processes re-import this as __mp_main__
    raise SystemExit(serve_main())
