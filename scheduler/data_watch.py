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

from core import metrics
from core.fires import FireRecord, Fires
from core.notify import SafeNotifier
from core.types import NewData
from scheduler.watcher import BucketWatcher, Scan, new_data

log = logging.getLogger("ctbot.scheduler.data_watch")

ALERT_TTL = 7 * 24 * 3600
BUSY = "another data-watch tick is running"
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


@dataclass
class Decision:
    """What a tick decided, before anything is done about it."""
    action: str                    # baseline | skip | run | alert
    reason: str | None = None      # why nothing is started or posted
    found: NewData | None = None
    todo: dict | None = None       # every object not yet handled
    waiting: dict | None = None    # what stays waiting when the cursor is committed
    note: str = ""                 # told to the channel beside the alert


def decide(scan: Scan, *, prefix: str, threshold: int, auto_retrain: bool, paused: bool) -> Decision:
    """A pure decision from a scan, like a dagster sensor's: run, alert or skip (with a
    reason). The new cursor is the scan's own. ``auto_retrain``: ct.on_new_data starts
    runs (its mode, and the guard rails, are the service's: core/ct_policy.py)."""
    if scan.mode == "baseline":
        return Decision("baseline", f"first tick: the {scan.listed} object(s) already under "
                                    f"`{prefix}` count as seen", waiting={})
    todo = {**scan.waiting, **scan.found}
    if not todo:
        return Decision("skip", "no new objects", waiting={})
    found = new_data(todo)
    if len(todo) < threshold:
        return Decision("skip", f"{len(todo)} new object(s), below the threshold of {threshold}",
                        found, todo, waiting=todo)
    if auto_retrain and not paused:
        return Decision("run", None, found, todo, waiting={})
    return Decision("alert", None, found, todo, waiting={},
                    note="auto-retrain is paused with the schedule" if auto_retrain else "")


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
        self.notifier = SafeNotifier(notifier)
        self.clock = clock
        self.watcher = watcher or BucketWatcher(
            state, store, settings.data_prefix, clock=clock,
            sweep_seconds=settings.data_sweep_minutes * 60)

    def tick(self, sweep: bool | None = None) -> TickResult:
        lock = f"watch:{self.watcher.prefix}"
        token = uuid.uuid4().hex
        if not self.state.acquire_lock(lock, token, TICK_LOCK_TTL):
            return TickResult(False, BUSY, None, self.watcher.cursor())
        try:
            return self._tick(sweep)
        finally:
            self.state.release_lock(lock, token)

    def _tick(self, sweep: bool | None) -> TickResult:
        scan = self.watcher.scan(sweep)
        metrics.data_watch_tick(scan.found if scan.mode != "baseline" else {}, self.clock())
        d = decide(scan, prefix=self.watcher.prefix,
                   threshold=max(1, int(self.settings.new_data_threshold)),
                   auto_retrain=self.settings.on_new_data != "alert" and self.service is not None,
                   paused=self.state.schedule_paused())
        return self.apply(scan, d)

    def apply(self, scan: Scan, d: Decision) -> TickResult:
        """Carry out a decision: the run or alert is recorded before the cursor moves."""
        base = dict(mode=scan.mode, listed=scan.listed)
        if d.action in ("baseline", "skip"):
            self.watcher.commit(scan, waiting=d.waiting)
            return TickResult(False, d.reason, d.found, scan.cursor, action=d.action, **base)
        found, note = d.found, d.note
        if d.action == "run":
            # A fire like the weekly one (core/fires.py): once claimed it is retried, queued
            # or announced with a Retry button, so the cursor may move on past its objects.
            fire = Fires(self.service).fire(FireRecord(
                id=f"new_data:{alert_id_for(found.fingerprint)}", trigger="new_data",
                reason=f"new data: {len(found.keys)} object(s), {human_bytes(found.total_bytes)}",
                dedupe_key=f"new_data:{found.fingerprint}", params=self.fire_params()))
            self.watcher.commit(scan, waiting={})
            run_id = fire.run.run_id if fire.run else (fire.record.run_id if fire.record else "")
            if run_id:
                return TickResult(True, None, found, scan.cursor, action="run", run_id=run_id, **base)
            return TickResult(False, f"{len(d.todo)} new object(s) wait: {fire.detail or fire.outcome}",
                              found, scan.cursor, action="run", **base)
        if note:
            self.notifier.say(f"New data: {note}.")
        alert_id = self._alert(found)
        self.watcher.commit(scan, waiting={})
        return TickResult(False, None, found, scan.cursor, action="alert", alert_id=alert_id, **base)

    def fire_params(self) -> dict:
        """Training parameters an automatic new-data run gets: none, so the service picks
        ct.on_new_data's mode with the guard rails (core/ct_policy.py) when the run starts."""
        return {}

    def _alert(self, found: NewData) -> str:
        """Post the alert once per data fingerprint; a failed post is retried next tick."""
        alert_id = alert_id_for(found.fingerprint)
        summary = json.dumps({"objects": len(found.keys), "bytes": found.total_bytes,
                              "fingerprint": found.fingerprint, "at": self.clock()})
        if self.state.once(f"dedupe:alert:{alert_id}", ALERT_TTL, value=summary):
            self.state.audit("new_data_alert", "scheduler", alert_id=alert_id,
                             objects=len(found.keys), bytes=found.total_bytes)
            try:
                if self.notifier:   # the raw call: a failure must un-record the alert
                    self.notifier.inner.new_data(found, alert_id)
            except Exception:
                self.state.forget(f"dedupe:alert:{alert_id}")
                log.exception("posting new-data alert %s failed", alert_id)
                raise
        return alert_id
