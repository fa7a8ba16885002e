"""The weekly retrain's schedule: its cron trigger, the fire before a given time, and
the key that makes each fire happen once across replicas."""
from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def check_days(spec: str) -> str:
    """'tue', 'mon,thu', 'mon-fri'. Numbers are refused: APScheduler counts Monday as 0,
    so a crontab-minded '2' would silently mean Wednesday."""
    spec = spec.strip().lower()
    tokens = [t for part in spec.split(",") for t in part.split("-")]
    if not spec or any(t not in DAYS for t in tokens):
        raise ValueError(f"retrain_day {spec!r}: use day names ({', '.join(DAYS)}), e.g. 'tue' or "
                         "'mon,thu'; numbers are ambiguous (APScheduler's Monday is 0)")
    return spec


def parse_time(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", text or "")
    if not m or int(m[1]) > 23 or int(m[2]) > 59:
        raise ValueError(f"retrain_time {text!r}: use HH:MM, 24-hour clock, e.g. 09:00")
    return int(m[1]), int(m[2])


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone {name!r} is not an IANA zone name such as 'Europe/Paris'") from None


def weekly_trigger(settings) -> CronTrigger:
    hour, minute = parse_time(settings.retrain_time)
    return CronTrigger(day_of_week=check_days(settings.retrain_day), hour=hour, minute=minute,
                       timezone=zone(settings.timezone))


def previous_fire(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The last scheduled fire at or before ``now`` (APScheduler only looks forward)."""
    t = trigger.get_next_fire_time(None, now - timedelta(days=8))
    prev = None
    while t is not None and t <= now:
        prev = t
        t = trigger.get_next_fire_time(t, t + timedelta(seconds=1))
    return prev


def fires_between(trigger: CronTrigger, after: datetime, upto: datetime, limit: int = 1000) -> list[datetime]:
    """Scheduled fires in (after, upto], oldest first; at most ``limit`` (the newest)."""
    out: list[datetime] = []
    t = trigger.get_next_fire_time(None, after + timedelta(seconds=1))
    while t is not None and t <= upto:
        if t > after:
            out.append(t)
        t = trigger.get_next_fire_time(t, t + timedelta(seconds=1))
    return out[-limit:]


def fire_key(fire: datetime, days_spec: str) -> str:
    """ISO week of the fire in the schedule's zone ("2026-W48"); with several days a week,
    the day too ("2026-W48-thu")."""
    year, week, _ = fire.isocalendar()
    key = f"{year}-W{week:02d}"
    if "," in days_spec or "-" in days_spec:
        key += "-" + DAYS[fire.weekday()]
    return key


class WeeklySchedule:
    """The weekly retrain as configured: validated at construction, shared by the
    scheduler's jobs and (as ``next_fire``) by the service's status answers."""

    def __init__(self, settings, clock=time.time):
        self.trigger = weekly_trigger(settings)   # validates day names, time and zone up front
        self.days = check_days(settings.retrain_day)
        self.clock = clock

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), tz=self.trigger.timezone)

    def next_fire(self) -> datetime | None:
        return self.trigger.get_next_fire_time(None, self.now())
