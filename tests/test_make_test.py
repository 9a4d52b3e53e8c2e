"""``make test`` installs what its tests need where it can (root + apt: Debian chromium + chromium-driver) and ends
with ONE line naming every skipped test group and what would run it (tests/conftest.py)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")


def _fake_bin(tmp_path: Path, uid: int) -> tuple[Path, Path]:
    """A PATH with only a fake ``id`` and ``apt-get`` (which records its arguments): no chromium on it."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    return bin_dir, log


@pytest.mark.skipif(MAKE is None, reason="needs make")
@pytest.mark.parametrize("uid", [0, 1000])
def test_test_deps_installs_chromium_as_root_only(tmp_path: Path, uid: int) -> None:
    bin_dir, log = _fake_bin(tmp_path, uid)
    r = subprocess.run([MAKE, "-s", "-C", str(REPO), "test-deps"], env={"PATH": str(bin_dir)}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    if uid == 0:
        assert calls == ["update -qq", "install -y -qq --no-install-recommends chromium chromium-driver"], calls
    else:
        assert calls == []  # no root: nothing installed; the skip line says what is missing


def test_the_run_ends_with_one_line_naming_each_skipped_group(tmp_path: Path) -> None:
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.filterwarnings('ignore')\n"
        "@pytest.mark.browser\n@pytest.mark.skipif(True, reason='chromium missing')\n"
        "@pytest.mark.parametrize('i', [1, 2])\ndef test_page(i): pass\n"
        "@pytest.mark.skipif(True, reason='needs tiktoken (pip install tiktoken)')\ndef test_vocab(): pass\n"
        "def test_ok(): pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert r.returncode == 0 and "1 passed, 3 skipped" in lines[-2], r.stdout
    last = lines[-1]
    assert last.startswith("SKIPPED GROUPS: ") and last.count("test_x") == 2, last
    assert "test_x (2 tests): needs Debian chromium + chromium-driver" in last and "apt-get install chromium" in last
    assert "test_x (1 test): needs tiktoken (pip install tiktoken)" in last


def _is_slow_mark(node: ast.AST) -> bool:
    """``pytest.mark.slow`` (or a call of it), as a decorator or in ``pytestmark``."""
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, ast.Attribute) and node.attr == "slow" and ast.unparse(node.value) == "pytest.mark"


def fast_tests(source: str) -> list[str]:
    """The test functions of a module that ``-m "not slow"`` runs (module ``pytestmark``, decorators)."""
    tree = ast.parse(source)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in stmt.targets):
            marks = stmt.value.elts if isinstance(stmt.value, ast.List | ast.Tuple) else [stmt.value]
            if any(_is_slow_mark(m) for m in marks):
                return []
    funcs = [f for f in tree.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    for cls in (c for c in tree.body if isinstance(c, ast.ClassDef) and c.name.startswith("Test")):
        funcs += [f for f in cls.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    return [f.name for f in funcs if f.name.startswith("test") and not any(map(_is_slow_mark, f.decorator_list))]


def test_fast_tests_finds_the_slow_marks() -> None:
    assert fast_tests("import pytest\npytestmark = [pytest.mark.browser, pytest.mark.slow]\ndef test_a(): pass\n") == []
    assert fast_tests("import pytest\n@pytest.mark.slow\ndef test_a(): pass\n@pytest.mark.slow()\ndef test_b(): pass\n"
                      "@pytest.mark.gpu\ndef test_c(): pass\nclass TestD:\n    def test_e(self): pass\n"
                      "def helper(): pass\n") == ["test_c", "test_e"]


# modules whose every test needs a whole end-to-end set-up, and the fast module that covers the same code
END_TO_END_ONLY = {
    "test_replicas.py": "test_shared_queue.py (the Redis queue, leases and events against a real redis-server)",
    "test_imagenet_browser.py": "test_browser.py (the page) and test_imagenet_server.py (class-conditional HTTP)",
    "test_server_real.py": "test_server_fake.py (the same HTTP surface, worker pool and fault paths on the fake "
                           "worker), test_tokenize_server.py and test_browser.py (a real worker over HTTP)",
}


def test_make_test_fast_covers_every_test_module() -> None:
    """``make test-fast`` (``-m "not slow"``) runs at least one test of every tests/test_*.py: ``slow`` marks the
    long end-to-end tests of a module, never all of it (except END_TO_END_ONLY, whose fast stand-ins must be fast)."""
    tests = {p.name: fast_tests(p.read_text()) for p in sorted((REPO / "tests").glob("test_*.py"))}
    all_slow = [name for name, fast in tests.items() if not fast and name not in END_TO_END_ONLY]
    assert all_slow == [], f"every test of these modules is marked slow: {all_slow}"
    for name, stand_in in END_TO_END_ONLY.items():
        assert not tests[name] and tests[stand_in.split()[0]], (name, stand_in)
