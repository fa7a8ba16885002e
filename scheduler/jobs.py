"""The three scheduled jobs, each safe to run on several replicas at once.

APScheduler gives no cross-process guarantee (two schedulers sharing a job store ran
7 of 9 fires twice), so every fire first claims a Redis SET NX key: the ISO week for
the weekly retrain, the interval slot for the two watches. Whoever wins runs it.

A weekly fire is claimed as *owed* and is done only once its run is accepted or queued
(core/fires.py); a transient failure is retried from the run watch's tick, with backoff,
never by sleeping here.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import metrics
from core.fires import SETTLED_TTL, FireOutcome, FireRecord, Fires
from core.notify import SafeNotifier
from core.types import RunRecord
from scheduler.fires import WeeklySchedule, fire_key, fires_between, previous_fire

log = logging.getLogger("ctbot.scheduler")

FIRST_START = "scheduler:first_start"   # when a scheduler first ran against this Redis
WEEKLY_THROUGH = "fires:weekly:through"   # the latest scheduled weekly fire claimed (epoch seconds)
CLAIM_LOCK = "fires:weekly:claim"       # held while weekly fires are claimed (coalescing is all-or-none)
CLAIM_WAIT_SECONDS = 10.0
LEGACY_QUEUED = "queued:weekly"         # before fire records: the one weekly fire waiting for a run


@dataclass
class Fire:
    """What one weekly fire did."""
    key: str                       # "2026-W48" (the newest week when several are covered)
    outcome: str                   # launched | queued | retrying | error | duplicate | paused | busy
    run: RunRecord | None = None
    detail: str = ""
    covers: tuple = ()             # the weeks this fire's run stands for, oldest first


class Jobs:
    def __init__(self, settings, state, service, data_watch=None, notifier=None, *,
                 schedule: WeeklySchedule | None = None, clock=time.time):
        self.settings = settings
        self.state = state
        self.service = service
        self.data_watcher = data_watch
        self.notifier = SafeNotifier(notifier)
        self.clock = clock
        self.schedule = schedule or WeeklySchedule(settings, clock)
        self.trigger, self.days = self.schedule.trigger, self.schedule.days
        self._down_since = 0.0

    @property
    def fires(self) -> Fires:
        return Fires(self.service)

    def now(self) -> datetime:
        return self.schedule.now()

    def next_retrain(self) -> datetime | None:
        return self.schedule.next_fire()

    # ---- weekly retrain ------------------------------------------------------------------

    def weekly_retrain(self, fire_time: datetime | None = None) -> Fire | None:
        """Run by APScheduler at the fire time (or up to misfire_grace later): claim this
        week's fire (with any earlier weekly fire that failed) and try it."""
        fire = fire_time or previous_fire(self.trigger, self.now())
        if fire is None:
            return None
        return self._weekly([fire])

    def catch_up(self) -> Fire | None:
        """At start-up: every weekly fire since ctbot was installed that no scheduler
        claimed (none was up), and every weekly fire that failed, in one run whose reason
        names the weeks; unless schedule.catch_up is off. Claimed fires are skipped, so
        this happens once however many replicas start."""
        self._adopt_legacy_queue()
        self._retry_failed_new_data()
        now = self.now()
        prev = previous_fire(self.trigger, now)
        if prev is None or not self.settings.schedule.catch_up:
            return None
        # A fresh install has missed nothing: only fires after ctbot first ran count.
        if self.state.once(FIRST_START, 10 * 365 * 86400, value=str(self.clock())):
            self.state.once(WEEKLY_THROUGH, 10 * 365 * 86400, value=str(self.clock()))
        installed = float(self.state.marker(FIRST_START) or 0)
        through = self.state.marker(WEEKLY_THROUGH)
        # No watermark: installed by a ctbot from before fire records, which knew a fire
        # only by its claim, kept 21 days; older weeks than that are taken as having fired.
        since = float(through) if through else max(installed - 1, now.timestamp() - SETTLED_TTL)
        since = datetime.fromtimestamp(max(installed - 1, since), tz=self.trigger.timezone)
        missed = fires_between(self.trigger, since, prev)
        failed = self.fires.owed("weekly", "failed")
        if not missed and not failed:
            if prev.timestamp() < installed:
                return None
            return Fire(self._key(prev), "duplicate")
        fire = self._weekly(missed, coalesce=True)
        if fire and fire.outcome == "launched":
            log.info("caught up weekly retrain(s) %s in run %s", ", ".join(fire.covers), fire.run.run_id)
        return fire

    def _retry_failed_new_data(self) -> None:
        """New-data auto-retrains that failed get a fresh round of tries at start-up (failed
        weekly fires are folded into the weekly catch-up instead)."""
        for rec in self.fires.owed("new_data", "failed"):
            out = self.fires.attempt(rec.id, fresh=True)
            log.info("start-up retry of %s: %s", rec.id, out.outcome)

    def _adopt_legacy_queue(self) -> None:
        """A weekly fire queued by a ctbot from before fire records (one marker, one fire)
        joins the queue, so an upgrade does not drop it."""
        key = self.state.marker(LEGACY_QUEUED)
        if key:
            self.fires.enqueue(FireRecord(id=f"weekly:{key}", trigger="weekly", reason=f"weekly retrain {key}",
                                          dedupe_key=f"weekly:{key}", params=self._weekly_params()))
            self.state.forget(LEGACY_QUEUED)

    def _key(self, when: datetime) -> str:
        return fire_key(when.astimezone(self.trigger.timezone), self.days)

    def _weekly(self, times: list[datetime], coalesce: bool = False) -> Fire:
        """Claim the weekly fires at ``times`` that nobody claimed, together with the
        weekly fires that failed, as one fire (the newest) whose run covers them all;
        then try it."""
        lock, token = CLAIM_LOCK, uuid.uuid4().hex
        deadline = time.monotonic() + CLAIM_WAIT_SECONDS
        while not self.state.acquire_lock(lock, token, 60):
            if time.monotonic() > deadline:   # a scheduler stuck claiming: its claims stand
                return Fire(self._key(times[-1]) if times else "", "busy", detail="another scheduler is claiming")
            time.sleep(0.05)
        try:
            new = [t for t in times if not self.fires.exists(f"weekly:{self._key(t)}")]
            failed = self.fires.owed("weekly", "failed")
            if not new and not (coalesce and failed):
                key = self._key(times[-1])
                rec = self.fires.get(f"weekly:{key}")
                return Fire(key, "duplicate", detail=rec.state if rec else "")
            if not new:   # only failed fires: the newest week leads a fresh try
                failed.sort(key=lambda f: f.id)
                lead, members = failed[-1], failed[:-1]
                lead.covers = sorted({*lead.covers, *(c for m in members for c in (m.covers or [m.id]))})
                self._cover(lead, members)
            else:
                lead, members = self._lead(new, failed)
                if not self.fires.claim(lead, members):
                    return Fire(lead.id.partition(":")[2], "duplicate")
            if new:
                self.state.put_marker(WEEKLY_THROUGH, str(max(max(t.timestamp() for t in new),
                                                              float(self.state.marker(WEEKLY_THROUGH) or 0))),
                                      10 * 365 * 86400)
        finally:
            self.state.release_lock(lock, token)
        covers = tuple(c.partition(":")[2] for c in lead.covers) or (lead.id.partition(":")[2],)
        if len(covers) > 1:
            self._say(f"Catching up {len(covers)} weekly retrains ({', '.join(covers)}) in one run.")
        out = self.fires.attempt(lead.id, fresh=True)
        return self._as_fire(out, covers)

    def _lead(self, new: list[datetime], failed: list[FireRecord]) -> tuple[FireRecord, list[FireRecord]]:
        """The newest new fire leads; the older new ones and the failed ones are covered."""
        stamp = self.now().isoformat()
        recs = [FireRecord(id=f"weekly:{self._key(t)}", trigger="weekly", reason="", dedupe_key="",
                           params=dict(self._weekly_params()), scheduled=t.isoformat(), claimed_at=stamp)
                for t in new]
        members = failed + recs[:-1]
        lead = recs[-1]
        weeks = sorted({c for m in members for c in (m.covers or [m.id])} | {lead.id},
                       key=lambda i: i.partition(":")[2])
        lead.covers = weeks if len(weeks) > 1 else []
        keys = [w.partition(":")[2] for w in weeks]
        lead.reason = (f"weekly retrain {keys[0]}" if len(keys) == 1 else
                       f"weekly retrain {', '.join(keys)} ({len(keys)} weekly fires caught up in one run)")
        lead.dedupe_key = f"weekly:{lead.id.partition(':')[2]}"
        return lead, members

    def _weekly_params(self) -> dict:
        """Training parameters a weekly run gets: none, so the service picks schedule.mode with
        the guard rails (core/ct_policy.py) when the run starts."""
        return {}

    def _cover(self, lead: FireRecord, members: list[FireRecord]) -> None:
        for m in members:
            m.state, m.by = "covered", lead.id
            self.fires.save(m)
        keys = [c.partition(":")[2] for c in lead.covers]
        if len(keys) > 1:
            lead.reason = f"weekly retrain {', '.join(keys)} ({len(keys)} weekly fires caught up in one run)"
        self.fires.save(lead)

    @staticmethod
    def _as_fire(out: FireOutcome, covers: tuple) -> Fire:
        return Fire(out.id.partition(":")[2], out.outcome, out.run, out.detail, covers)

    # ---- the two watches --------------------------------------------------------------

    def _claim_slot(self, job: str, every_seconds: float) -> bool:
        slot = int(self.clock() // every_seconds)
        return self.state.once(f"fire:{job}:{slot}", max(2 * every_seconds, 1))

    def data_watch(self):
        """One data-watch tick per interval slot across replicas; returns its TickResult."""
        if self.data_watcher is None or not self._claim_slot(
                "data_watch", self.settings.data_watch_minutes * 60):
            return None
        return self.data_watcher.tick()

    def run_watch(self) -> list[RunRecord]:
        """Refresh every active run: progress in Slack, the final report, the lock TTL."""
        if not self._claim_slot("run_watch", self.settings.run_watch_seconds):
            return []
        out = []
        try:
            for run_id in self.state.active_run_ids():
                try:
                    out.append(self.service.refresh(run_id))
                except (RedisConnectionError, RedisTimeoutError):
                    raise
                except Exception as e:
                    metrics.dependency_error(e)
                    log.exception("refreshing %s failed", run_id)
            self.fires.tick()
            self.service.expire_approvals()
        except (RedisConnectionError, RedisTimeoutError) as e:
            metrics.dependency_error("redis")
            self._outage(f"{type(e).__name__}: {e}")
            return out
        self._outage(None)
        return out

    def _outage(self, error: str | None) -> None:
        """One log line when Redis becomes unreachable and one when it is back, not a
        traceback every tick."""
        if error and not self._down_since:
            self._down_since = self.clock()
            log.error("run watch: the state store is unreachable (%s); retrying quietly", error)
        elif not error and self._down_since:
            log.warning("run watch: the state store is back after %.0f s", self.clock() - self._down_since)
            self._down_since = 0.0

    def _say(self, text: str) -> None:
        self.notifier.say(text)
