"""The engine knobs' block of ``deploy/env.example`` and their table in ``README.md``, generated.

Both are rendered from :func:`bitdance_core.engine.engine_config.knobs` (the one declaration) and stand between
``BEGIN`` / ``END`` marker lines; ``python -m server.knob_docs`` rewrites them, ``--check`` exits 1 when either is
stale (``tests/test_knobs.py`` runs the check). Standard library only.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from bitdance_core.engine.engine_config import Knob, knobs

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
README = ROOT / "README.md"
BEGIN = "BEGIN engine knobs"
END = "END engine knobs"
NOTE = "(generated from EngineConfig by `python -m server.knob_docs`: edit them there)"
WIDTH = 100


def env_value(value: object) -> str:
    """A default as an env file writes it (``None``: empty, booleans lower case)."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _env_entry(k: Knob) -> list[str]:
    text = textwrap.wrap(k.help, WIDTH - 2, break_on_hyphens=False)
    return [*("# " + line for line in text), f"# {k.env}={env_value(k.default)}"]


def env_block() -> list[str]:
    lines = [f"# --- {BEGIN} {NOTE}", ""]
    for k in knobs():
        lines += [*_env_entry(k), ""]
    return [*lines, f"# --- {END}"]


def readme_block() -> list[str]:
    lines = [f"<!-- {BEGIN} {NOTE} -->", "| flag | variable | default | meaning |", "|---|---|---|---|"]
    for k in knobs():
        default = "unset" if k.default is None else f"`{env_value(k.default)}`"
        lines.append(f"| `{k.flag}` | `{k.env}` | {default} | {k.help.replace('|', '/')} |")
    return [*lines, f"<!-- {END} -->"]


def splice(text: str, block: list[str]) -> str:
    """``text`` with the lines from the one holding BEGIN to the one holding END replaced by ``block``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if BEGIN in line)
    end = next(i for i, line in enumerate(lines) if END in line and i > start)
    return "\n".join([*lines[:start], *block, *lines[end + 1:]]) + "\n"


def stale() -> list[Path]:
    """The generated files whose engine block differs from the declaration."""
    out = []
    for path, block in ((ENV_EXAMPLE, env_block()), (README, readme_block())):
        text = path.read_text()
        if splice(text, block) != text:
            out.append(path)
    return out


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = stale()
        for path in bad:
            sys.stderr.write(f"{path}: the engine knobs differ from EngineConfig; run python -m server.knob_docs\n")
        return 1 if bad else 0
    for path, block in ((ENV_EXAMPLE, env_block()), (README, readme_block())):
        path.write_text(splice(path.read_text(), block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
