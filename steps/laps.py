"""Where a step's seconds go: named sections, timed one after another.

    laps = Laps()
    fetch(); laps("fetch")
    embed(); laps("gallery")
    summary["timings"] = laps.seconds    # {"fetch": 0.1, "gallery": 0.4}

The step summaries carry them, so a slow run's report and bench/bench_ct.py say which
part of a step was slow, not only that the step was.
"""
from __future__ import annotations

import time


class Laps:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        """Record the time since the previous lap (or the start) under name (added to, if repeated)."""
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now
