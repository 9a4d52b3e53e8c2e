"""``make test`` installs what its tests need where it can (root + apt: Debian chromium + chromium-driver) and ends
with ONE line naming every skipped test group and what would run it (tests/conftest.py)."""

from __future__ import annotations

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
