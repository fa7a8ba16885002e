"""The data-watch tick: detect new objects, then decide, like a dagster sensor tick:
start a run, post an alert, or skip with a reason, and return the new cursor.

Order matters for crash safety: the run or alert is recorded first, the cursor is
committed after. A crash in between means the same objects are found again next
tick; their fingerprint is the dedupe key, so the alert or run is not repeated.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

from core.errors import Conflict, ServiceError
from core.types import NewData
from scheduler.watcher import BucketWatcher, new_data
from scheduler.notify import say_safely

log = logging.getLogger("ctbot.scheduler.data_watch")

ALERT_TTL = 7 * 24 * 3600
TICK_LOCK_TTL = 15 * 60


@dataclass
class TickResult:
    run: bool                      # a training run was requested (or already existed for this data)
    skip_reason: str | None        # why nothing was started or posted
    new: NewData | None            # everything found and not yet handled (incl. waiting objects)
    cursor: dict | None            # the cursor after this tick
    action: str = "skip"           # run | alert | skip | baseline
    mode: str = ""                 # baseline | fast | sweep
    listed: int = 0                # objects the listing returned: what the tick cost
    run_id: str | None = None
    alert_id: str | None = None


def alert_id_for(fp: str) -> str:
    return "nd-" + fp.removeprefix("sha256:")[:16]


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class DataWatch:
    def __init__(self, settings, state, store, service=None, notifier=None, *, clock=time.time,
                 watcher: BucketWatcher | None = None):
        self.settings = settings
        self.state = state
        self.service = service
        self.notifier = notifier
        self.clock = clock
        self.watcher = watcher or BucketWatcher(
            state, store, settings.data_prefix, clock=clock,
            sweep_seconds=settings.data_sweep_minutes * 60)

    def tick(self, sweep: bool | None = None) -> TickResult:
        lock = f"watch:{self.watcher.prefix}"
        token = uuid.uuid4().hex
        if not self.state.acquire_lock(lock, token, TICK_LOCK_TTL):
            return TickResult(False, "another data-watch tick is running", None, self.watcher.cursor())
        try:
            return self._tick(sweep)
        finally:
            self.state.release_lock(lock, token)

    def _tick(self, sweep: bool | None) -> TickResult:
        scan = self.watcher.scan(sweep)
        base = dict(mode=scan.mode, listed=scan.listed)
        if scan.mode == "baseline":
            self.watcher.commit(scan, waiting={})
            return TickResult(False, f"first tick: the {scan.listed} object(s) already under "
                              f"`{self.watcher.prefix}` count as seen", None, scan.cursor,
                              action="baseline", **base)
        todo = {**scan.waiting, **scan.found}
        if not todo:
            self.watcher.commit(scan, waiting={})
            return TickResult(False, "no new objects", None, scan.cursor, **base)
        found = new_data(todo)
        threshold = max(1, int(self.settings.new_data_threshold))
        if len(todo) < threshold:
            self.watcher.commit(scan, waiting=todo)
            return TickResult(False, f"{len(todo)} new object(s), below the threshold of {threshold}",
                              found, scan.cursor, **base)

        if self.settings.auto_retrain and self.service is not None:
            if self.state.schedule_paused():
                note = "auto-retrain is paused with the schedule"
            else:
                try:
                    run = self.service.request_training(
                        f"new data: {len(todo)} object(s), {human_bytes(found.total_bytes)}", {},
                        "scheduler", trigger="new_data", dedupe_key=f"new_data:{found.fingerprint}")
                except Conflict as e:
                    # Keep them waiting: the next tick after the active run ends retrains.
                    self.watcher.commit(scan, waiting=todo)
                    return TickResult(False, f"{len(todo)} new object(s) wait: {e}", found,
                                      scan.cursor, **base)
                except ServiceError as e:
                    log.warning("auto-retrain failed: %s", e)
                    note = f"auto-retrain could not start: {e}"
                else:
                    self.watcher.commit(scan, waiting={})
                    return TickResult(True, None, found, scan.cursor, action="run",
                                      run_id=run.run_id, **base)
            self._say(f"New data: {note}.")

        alert_id = alert_id_for(found.fingerprint)
        summary = json.dumps({"objects": len(found.keys), "bytes": found.total_bytes,
                              "fingerprint": found.fingerprint, "at": self.clock()})
        if self.state.once(f"dedupe:alert:{alert_id}", ALERT_TTL, value=summary):
            self.state.audit("new_data_alert", "scheduler", alert_id=alert_id,
                             objects=len(found.keys), bytes=found.total_bytes)
            if self.notifier is not None:
                try:
                    self.notifier.new_data(found, alert_id)
                except Exception:
                    # Un-record it so the next tick posts it again.
                    self.state.forget(f"dedupe:alert:{alert_id}")
                    log.exception("posting new-data alert %s failed", alert_id)
                    raise
        self.watcher.commit(scan, waiting={})
        return TickResult(False, None, found, scan.cursor, action="alert", alert_id=alert_id, **base)

    def _say(self, text: str) -> None:
        say_safely(self.notifier, text)
