"""Named crash points for the fault-injection suite (tests/reliability), as Dagster's
sensor tests kill their daemon at named points.

``CT_CRASH_AT=<name>`` makes the process group that reaches ``crash_point(name)`` die by
SIGKILL on the spot, the way a node failure would; unset (always, outside those tests)
it costs one dictionary lookup. ``CT_CRASH_AT`` may list several names, comma-separated.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def crash_point(name: str) -> None:
    wanted = os.environ.get("CT_CRASH_AT")
    if wanted and name in wanted.split(","):
        os.killpg(os.getpgid(0), signal.SIGKILL)


def pause_point(name: str, timeout: float = 600.0) -> None:
    """``CT_PAUSE_AT=<name>:<file>`` holds the process at ``pause_point(name)`` until
    ``<file>`` exists (or ``timeout`` passes), so a test can act at exactly that point
    (a rollback between evaluate and deploy). Unset, it costs one dictionary lookup."""
    wanted = os.environ.get("CT_PAUSE_AT")
    if not wanted:
        return
    for item in wanted.split(","):
        point, _, flag = item.partition(":")
        if point == name and flag:
            Path(flag + ".reached").touch()    # the test waits for this, then acts
            deadline = time.monotonic() + timeout
            while not os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.05)
