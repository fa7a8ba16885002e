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

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import metrics
from core.errors import Conflict, ServiceError
from core.notify import SafeNotifier
from core.types import RunRecord
from scheduler.fires import WeeklySchedule, fire_key, previous_fire

log = logging.getLogger("ctbot.scheduler")

WEEKLY_FIRE_TTL = 21 * 24 * 3600
FIRST_START = "scheduler:first_start"   # when a scheduler first ran against this Redis
QUEUED_WEEKLY = "queued:weekly"   # the fire key of a weekly retrain waiting for the active run


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
        self._down_since = 0.0

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
            # Queued, not lost: the run watch starts it once the active run has ended.
            self.state.put_marker(QUEUED_WEEKLY, key, WEEKLY_FIRE_TTL)
            blocker = getattr(e, "run", None)
            behind = f"run `{blocker.run_id}`" if blocker else "the active run"
            self.state.audit("weekly_queued", "scheduler", fire=key, behind=getattr(blocker, "run_id", None))
            self._say(f"Weekly retrain {key} is queued behind {behind}; it starts when that run ends.")
            return Fire(key, "queued", detail=str(e))
        except ServiceError as e:
            self.state.audit("weekly_failed", "scheduler", fire=key, reason=str(e))
            self._say(f"Weekly retrain {key} could not start: {e}")
            return Fire(key, "error", detail=str(e))
        return Fire(key, "launched", run)

    def catch_up(self) -> Fire | None:
        """At start-up: fire the latest scheduled retrain if it was missed (no replica was
        up), however late, unless schedule.catch_up is off. Its fire key makes this a
        no-op when it did fire, so it happens once."""
        now = self.now()
        prev = previous_fire(self.trigger, now)
        if prev is None or not self.settings.schedule.catch_up:
            return None
        # A fresh install has missed nothing: only fires after ctbot first ran count.
        self.state.once(FIRST_START, 10 * 365 * 86400, value=str(self.clock()))
        if prev.timestamp() < float(self.state.marker(FIRST_START) or 0):
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
        try:
            for run_id in self.state.active_run_ids():
                try:
                    out.append(self.service.refresh(run_id))
                except (RedisConnectionError, RedisTimeoutError):
                    raise
                except Exception as e:
                    metrics.dependency_error(e)
                    log.exception("refreshing %s failed", run_id)
            self._start_queued_weekly()
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

    def _start_queued_weekly(self) -> None:
        key = self.state.marker(QUEUED_WEEKLY)
        if not key or self.service.active_run() is not None:
            return
        if self.state.schedule_paused():
            return   # it starts when the schedule is resumed
        try:
            run = self.service.request_training(f"weekly retrain {key} (queued)", {}, "scheduler",
                                                trigger="weekly", dedupe_key=f"weekly:{key}")
        except Conflict:
            return   # someone started a run in between: wait for that one
        except ServiceError as e:
            self.state.forget(QUEUED_WEEKLY)
            self._say(f"Queued weekly retrain {key} could not start: {e}")
            return
        self.state.forget(QUEUED_WEEKLY)
        self.state.audit("weekly_dequeued", "scheduler", fire=key, run_id=run.run_id)

    def _say(self, text: str) -> None:
        self.notifier.say(text)
