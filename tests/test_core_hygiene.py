"""Source-level rules for ``bitdance_core``: torch-free entry points, lazy optional imports, no prints, no
autocast, no global seeding."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bitdance_core"
SOURCES = sorted(p for p in PKG.rglob("*.py") if "assets" not in p.parts)
TORCH_FREE = [
    "bitdance_core",
    "bitdance_core.engine.protocol",
    "bitdance_core.engine.scheduler",
    "bitdance_core.resolutions",
    "bitdance_core.families.text_to_image.config",
    "bitdance_core.tokenize",  # the tokenizer routes' checks, in the API process
]


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _tree(p: Path) -> ast.Module:
    return ast.parse(p.read_text(), filename=str(p))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _module_level_imports(tree: ast.Module):
    """Import statements not inside a function (module body, including under if/try/with at top level)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""]


def test_sources_found():
    assert len(SOURCES) > 10
    assert PKG / "models" / "attention.py" in SOURCES


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_imports(module):
    code = (
        f"import sys, {module}; bad = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"importing {module} imported {r.stdout.strip()} {r.stderr[-500:]}"


def test_no_top_level_flash_attn_or_xformers():
    offenders = []
    for p in SOURCES:
        tree = _tree(p)
        for node in _module_level_imports(tree):
            for name in _imported_names(node):
                if name.split(".")[0] in ("flash_attn", "xformers"):
                    offenders.append(f"{_rel(p)}:{node.lineno} imports {name} at module level")
        for node in ast.walk(tree):  # flash_attn is never imported; xformers only lazily, in attention.py
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported_names(node):
                    root = name.split(".")[0]
                    if root == "flash_attn" or (root == "xformers" and p.name != "attention.py"):
                        offenders.append(f"{_rel(p)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)


def _print_allowed() -> set[str]:
    allowed = {"bitdance_core/cli.py"}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return allowed
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ignores = cfg.get("tool", {}).get("ruff", {}).get("lint", {}).get("per-file-ignores", {})
    allowed |= {pattern for pattern, rules in ignores.items() if "T20" in rules or "T201" in rules}
    return allowed


def test_no_print_in_library_code():
    allowed = _print_allowed()
    offenders = []
    for p in SOURCES:
        rel = _rel(p)
        if any(Path(rel).match(pattern) for pattern in allowed):
            continue
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, "print() in library code: " + ", ".join(offenders)


def test_no_autocast():
    offenders = []
    for p in SOURCES:
        for node in ast.walk(_tree(p)):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
            if "autocast" in name:
                offenders.append(f"{_rel(p)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and any("autocast" in a.name for a in node.names):
                offenders.append(f"{_rel(p)}:{node.lineno}")
    assert not offenders, "autocast used: " + ", ".join(offenders)


GLOBAL_SEEDERS = {
    "torch.manual_seed",
    "torch.seed",
    "torch.random.manual_seed",
    "torch.random.seed",
    "torch.cuda.manual_seed",
    "torch.cuda.manual_seed_all",
    "torch.cuda.seed",
    "torch.cuda.seed_all",
    "random.seed",
    "np.random.seed",
    "numpy.random.seed",
    "set_seed",
    "transformers.set_seed",
    "seed_everything",
}


def test_no_global_seeding():
    offenders = []
    for p in SOURCES:
        rel = _rel(p)
        if Path(rel).match("bitdance_core/demo/train*.py"):
            continue
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in GLOBAL_SEEDERS or name.endswith(".set_seed"):
                    offenders.append(f"{rel}:{node.lineno} {name}()")
            if isinstance(node, ast.ImportFrom) and any(a.name in ("set_seed", "manual_seed") for a in node.names):
                offenders.append(f"{rel}:{node.lineno} imports {[a.name for a in node.names]}")
    assert not offenders, "global RNG seeding: " + ", ".join(offenders)
