"""Which mode an automatic run takes, and how long each mode is expected to take.

Pure functions over the recent run records, so the rules are tested without a scheduler.

Guard rails (docs/continuous-training.md): a refresh never changes the weights, so it
cannot go on forever:
  * after ``max_in_a_row`` refreshes in a row, the next automatic run is warm;
  * a refresh held by the gate (or failed) makes the next automatic run warm;
  * a warm run held by the gate (or failed) makes the next automatic run full.
A mode that reuses production's weights falls back to full while there is none.
"""
from __future__ import annotations

import statistics

from core.types import RunRecord

MODES = ("full", "warm", "refresh")
AUTOMATIC_TRIGGERS = ("new_data", "weekly")
_ESCALATE = {"refresh": "warm", "warm": "full"}


def run_mode(run: RunRecord) -> str:
    return str((run.params or {}).get("mode") or "full")


def _held(run: RunRecord) -> bool:
    return run.state == "failed" or (run.state == "succeeded" and run.decision == "hold")


def choose_mode(wanted: str, recent: list[RunRecord], *, max_refresh_in_a_row: int = 5,
                has_production: bool = True) -> tuple[str, str]:
    """(mode, why) for the next automatic run. ``recent``: runs newest first; runs still
    going or canceled are passed over."""
    if wanted not in MODES:
        raise ValueError(f"unknown mode {wanted!r}: use one of {', '.join(MODES)}")
    if wanted != "full" and not has_production:
        return "full", f"{wanted} needs a production model and there is none yet"
    done = [r for r in recent if r.state in ("succeeded", "failed")]
    mode, why = wanted, f"the configured mode is {wanted}"
    last = done[0] if done else None
    if last is not None and _held(last) and run_mode(last) in _ESCALATE:
        step = _ESCALATE[run_mode(last)]
        if MODES.index(step) < MODES.index(mode):   # only ever towards more training
            outcome = "failed" if last.state == "failed" else "was held by the gate"
            return step, f"the last {run_mode(last)} run `{last.run_id}` {outcome}"
    if mode == "refresh":
        streak = 0
        for r in done:
            if run_mode(r) != "refresh":
                break
            streak += 1
        if streak >= max_refresh_in_a_row:
            return "warm", (f"{streak} refreshes in a row reached refresh.max_in_a_row "
                            f"({max_refresh_in_a_row}): the weights are trained again")
    return mode, why


def run_seconds(run: RunRecord) -> float | None:
    if run.state != "succeeded" or not run.started_at or not run.finished_at:
        return None
    return max(0.0, run.finished_at - run.started_at)


def expected_seconds(recent: list[RunRecord], mode: str, last: int = 5) -> float | None:
    """The median duration of the last ``last`` succeeded runs of that mode (None: none yet)."""
    times = [t for r in recent if run_mode(r) == mode and (t := run_seconds(r)) is not None][:last]
    return statistics.median(times) if times else None


def last_full(recent: list[RunRecord], before: str = "") -> RunRecord | None:
    """The newest succeeded full run (other than ``before``), the yardstick of time saved."""
    return next((r for r in recent if r.run_id != before and run_mode(r) == "full"
                 and run_seconds(r) is not None), None)
