"""How many CPUs this process may use, without importing torch (the model server's
supervisor sizes its worker pool with it)."""
from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (a
    Kubernetes CPU limit), which os.cpu_count() ignores; too many threads thrash."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
