"""Named crash points for the fault-injection suite (tests/reliability), as Dagster's
sensor tests kill their daemon at named points.

``CT_CRASH_AT=<name>`` makes the process group that reaches ``crash_point(name)`` die by
SIGKILL on the spot, the way a node failure would; unset (always, outside those tests)
it costs one dictionary lookup. ``CT_CRASH_AT`` may list several names, comma-separated.
"""
from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    wanted = os.environ.get("CT_CRASH_AT")
    if wanted and name in wanted.split(","):
        os.killpg(os.getpgid(0), signal.SIGKILL)
