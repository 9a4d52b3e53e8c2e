"""The package tree is the architecture: the import-linter contracts in pyproject.toml hold (no import cycle at any
depth of ``bitdance_core`` or ``server``, the layers, independent families, a torch-free API process), and they
break when a circle comes back (the engine reaching into a family again, even through a lazy import)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(LINT, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "4 kept" in r.stdout


def test_a_circle_that_comes_back_breaks_them(tmp_path):
    """A copy of the tree with the old engine -> family dispatch (a lazy import inside a function): broken."""
    for pkg in ("bitdance_core", "server"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("assets", "static", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    engine = tmp_path / "bitdance_core" / "engine" / "engine.py"
    engine.write_text(engine.read_text() + "\n\ndef _family_class(model):\n"
                      "    from ..families.registry import family_class\n\n    return family_class(model)\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "No import cycles between sibling modules or packages (at every depth) BROKEN" in r.stdout
    assert "bitdance_core.engine.engine -> bitdance_core.families.registry" in r.stdout
