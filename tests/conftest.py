"""Shared pytest set-up.

* OpenMP waits passively in the test process too (``bitdance_core.cpu_threads``, set before anything loads torch):
  on a busy machine a spinning OpenMP multiplies the time of every in-process generation. Thread counts stay
  torch's own, so results do not move.
* In-process CLI runs apply the CPU thread policy (``torch.set_num_threads``); each test gets the session's thread
  count back, so one test's ``--threads`` does not slow or change the next.
* Under pytest-xdist (``make test`` runs ``-n 2``) each worker process gets its share of the usable CPUs as
  OpenMP threads (``OMP_NUM_THREADS``, set before torch loads): two workers with two threads each would
  oversubscribe two cores. Servers and CLI runs the tests start apply their own thread policy, as in production.
* Under pytest-xdist the heaviest modules (``HEAVY_FIRST``, measured) are handed out first: with ``--dist
  loadfile`` a module runs on one worker, and a heavy module started last would run alone at the end.
* The run ends with ONE line naming every group of skipped tests and what would run it (``make test`` installs
  what it can, e.g. Debian chromium as root).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from bitdance_core.cpu_threads import thread_env, usable_cpus

for _key, _value in thread_env().items():
    os.environ.setdefault(_key, _value)
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // _XDIST_WORKERS)))

# what runs a skipped group, by marker (other skips name it in their reason)
HOW_BY_MARKER = {
    "browser": "Debian chromium + chromium-driver (`make test` installs them as root: apt-get install chromium "
               "chromium-driver)",
    "gpu": "a CUDA device",
}
SKIPPED = pytest.StashKey[dict]()
# the modules with the most CPU time in `make test` (measured 2026-12-05), heaviest first
HEAVY_FIRST = (
    "test_bf16.py", "test_cuda_tier.py", "test_memory_plan.py", "test_imagenet_engine.py", "test_server_openapi.py",
    "test_replicas.py", "test_server_real.py", "test_a1111.py", "test_diffusers_layout.py", "test_engine.py",
    "test_core_loading.py", "test_quantize_plan.py", "test_gpu_check.py", "test_browser.py", "test_demo_model.py",
    "test_imagenet_golden.py", "test_faults.py",
)
# the same for `make test-fast` (-m "not slow"; measured 2026-12-05)
HEAVY_FIRST_FAST = (
    "test_server_fake.py", "test_engine.py", "test_browser.py", "test_cuda_tier.py",
    "test_memory_plan.py", "test_imagenet_engine.py", "test_imagenet_golden.py", "test_retry_after.py",
    "test_demo_train.py", "test_shared_queue.py", "test_diffusers_layout.py", "test_imagenet_cli.py",
    "test_runner.py", "test_demo_model.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Under xdist: heaviest modules first (every worker sorts alike; the run needs --no-loadscope-reorder)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    order = HEAVY_FIRST_FAST if config.getoption("markexpr", "") == "not slow" else HEAVY_FIRST
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].rsplit("/", 1)[-1], len(rank)))


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


def skipped_groups(reports: list) -> dict[str, tuple[set[str], int]]:
    """what would run them -> (test modules, number of tests), from pytest's skip reports."""
    groups: dict[str, tuple[set[str], int]] = {}
    for rep in reports:
        marker = next((m for m in HOW_BY_MARKER if m in getattr(rep, "keywords", {})), None)
        if marker is not None:
            how = HOW_BY_MARKER[marker]
        else:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            how = reason.removeprefix("Skipped: ")
        module = rep.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        mods, n = groups.get(how, (set(), 0))
        groups[how] = (mods | {module}, n + 1)
    return groups


def skip_line(groups: dict[str, tuple[set[str], int]]) -> str | None:
    if not groups:
        return None
    parts = [f"{', '.join(sorted(mods))} ({n} test{'s' * (n != 1)}): needs {how.removeprefix('needs ')}"
             for how, (mods, n) in sorted(groups.items(), key=lambda kv: -kv[1][1])]
    return "SKIPPED GROUPS: " + "; ".join(parts)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    config.stash[SKIPPED] = skipped_groups(terminalreporter.stats.get("skipped", []))


def pytest_unconfigure(config) -> None:
    """After pytest's own summary line: the last line of the run."""
    line = skip_line(config.stash.get(SKIPPED, {}))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if line is not None and reporter is not None:
        reporter.write_line(line, yellow=True)
