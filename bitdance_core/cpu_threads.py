"""The CPU thread policy: one for the server's CPU workers and for ``bitdance generate``.

* intra-op threads: the CPUs this process may really use (its affinity mask, capped by a cgroup ``cpu.max`` quota),
  divided among the CPU workers that share them; ``os.cpu_count()`` counts the host's and oversubscribes a
  container or a ``taskset``;
* ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep between parallel regions instead of spinning, which is what
  keeps a busy neighbour (another torch process, the API process) from multiplying the step time
  (``bench/bench_contention.py``). OpenMP reads it once, when torch loads it: it is put into the environment before
  ``import torch`` (a worker's environment, or the CLI's before its first torch import);
* one inter-op thread (the engine has no independent ops to overlap).

Torch-free at import: the API process uses :func:`usable_cpus` and :func:`thread_env`.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

WAIT_POLICIES = ("passive", "active", "default")
DEFAULT_WAIT_POLICY = "passive"
DEFAULT_INTEROP_THREADS = 1


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota
    (rounded down, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def _cgroup_quota(root: str) -> float | None:
    """``quota / period`` from ``cpu.max`` of this process's cgroup (v2), or None when unlimited."""
    paths = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    paths.append(os.path.join(root, line.strip()[3:].lstrip("/"), "cpu.max"))
    except OSError:
        pass
    paths.append(os.path.join(root, "cpu.max"))
    try:  # cgroup v1
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    for path in paths:
        try:
            with open(path) as f:
                quota, period = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        if quota == "max":
            return None
        return int(quota) / int(period)
    return None


def thread_env(wait_policy: str = DEFAULT_WAIT_POLICY) -> dict[str, str]:
    """The environment OpenMP must see when torch loads (``default``: leave it alone)."""
    if wait_policy not in WAIT_POLICIES:
        raise ValueError(f"OpenMP wait policy must be one of {WAIT_POLICIES}, got {wait_policy!r}")
    return {} if wait_policy == "default" else {"OMP_WAIT_POLICY": wait_policy.upper()}


def default_threads(share: int = 1) -> int:
    """Intra-op threads of one of ``share`` CPU workers sharing the usable CPUs."""
    return max(1, usable_cpus() // max(1, share))


def apply_thread_policy(threads: int | None = None, interop_threads: int | None = DEFAULT_INTEROP_THREADS,
                        wait_policy: str | None = DEFAULT_WAIT_POLICY, share: int = 1) -> int:
    """Apply the policy to this process and return its intra-op thread count.

    ``threads`` None: :func:`default_threads`; ``wait_policy`` None: the environment is already set (a worker,
    whose parent put :func:`thread_env` into it). Call it before anything imports torch when you want the wait
    policy to apply; called later it says so in the log and still sets the thread counts.
    """
    env = thread_env(wait_policy) if wait_policy is not None else {}
    pending = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if pending and "torch" in sys.modules:
        logger.warning("torch is loaded already: %s no longer applies to OpenMP in this process",
                       ", ".join(f"{k}={v}" for k, v in pending.items()))
    os.environ.update(env)
    import torch

    n = threads or default_threads(share)
    torch.set_num_threads(n)
    if interop_threads:
        try:
            torch.set_num_interop_threads(interop_threads)
        except RuntimeError:  # set once per process, before any inter-op work (in-process benchmarks)
            if torch.get_num_interop_threads() != interop_threads:
                logger.warning("inter-op threads already fixed; keeping %d", torch.get_num_interop_threads())
    return n
