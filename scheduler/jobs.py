"""The three scheduled jobs, each safe to run on several replicas at once.

APScheduler gives no cross-process guarantee (two schedulers sharing a job store ran
7 of 9 fires twice), so every fire first claims a Redis SET NX key: the ISO week for
the weekly retrain, the interval slot for the two watches. Whoever wins runs it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from core.errors import Conflict, ServiceError
from core.notify import SafeNotifier
from core.types import RunRecord
from scheduler.fires import WeeklySchedule, fire_key, previous_fire

log = logging.getLogger("ctbot.scheduler")

WEEKLY_FIRE_TTL = 21 * 24 * 3600


@dataclass
class Fire:
    """What one weekly fire did."""
    key: str                       # "2026-W48"
    outcome: str                   # launched | duplicate | paused | conflict | error
    run: RunRecord | None = None
    detail: str = ""


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

    def now(self) -> datetime:
        return self.schedule.now()

    def next_retrain(self) -> datetime | None:
        return self.schedule.next_fire()

    # ---- weekly retrain ------------------------------------------------------------------

    def weekly_retrain(self, fire_time: datetime | None = None) -> Fire | None:
        """Run by APScheduler at the fire time (or up to misfire_grace later), and by
        catch_up() for a fire missed while no scheduler was up."""
        fire = fire_time or previous_fire(self.trigger, self.now())
        if fire is None:
            return None
        key = fire_key(fire.astimezone(self.trigger.timezone), self.days)
        claim = json.dumps({"scheduled": fire.isoformat(), "claimed_at": self.now().isoformat()})
        if not self.state.once(f"fire:weekly:{key}", WEEKLY_FIRE_TTL, value=claim):
            return Fire(key, "duplicate")
        if self.state.schedule_paused():
            # The fire is spent: resuming later in the week does not start it late.
            self.state.audit("weekly_skipped", "scheduler", fire=key, reason="schedule paused")
            return Fire(key, "paused")
        try:
            run = self.service.request_training(f"weekly retrain {key}", {}, "scheduler",
                                                trigger="weekly", dedupe_key=f"weekly:{key}")
        except Conflict as e:
            self.state.audit("weekly_skipped", "scheduler", fire=key, reason=str(e))
            self._say(f"Weekly retrain {key} skipped: {e}")
            return Fire(key, "conflict", detail=str(e))
        except ServiceError as e:
            self.state.audit("weekly_failed", "scheduler", fire=key, reason=str(e))
            self._say(f"Weekly retrain {key} could not start: {e}")
            return Fire(key, "error", detail=str(e))
        return Fire(key, "launched", run)

    def catch_up(self) -> Fire | None:
        """At start-up: fire the latest scheduled retrain if it was missed (no replica was
        up) and it is at most misfire_grace_seconds old. Its fire key makes this a no-op
        when it did fire."""
        now = self.now()
        prev = previous_fire(self.trigger, now)
        if prev is None or (now - prev).total_seconds() > self.settings.misfire_grace_seconds:
            return None
        fire = self.weekly_retrain(prev)
        if fire and fire.outcome == "launched":
            log.info("caught up the missed weekly retrain %s", fire.key)
        return fire

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
        for run_id in self.state.active_run_ids():
            try:
                out.append(self.service.refresh(run_id))
            except Exception:
                log.exception("refreshing %s failed", run_id)
        return out

    def _say(self, text: str) -> None:
        self.notifier.say(text)
