"""APScheduler wiring: three jobs on a BackgroundScheduler, plus the start-up catch-up.

    sched = ctbot.wiring.build_deps(settings).scheduler
    sched.start()                                # catch-up, then the jobs run in threads
    ...
    sched.shutdown()

Job stores are in memory on purpose: the jobs are defined by code and settings, and
exactly-once per fire comes from Redis (scheduler/jobs.py), not from a shared job store.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from scheduler.data_watch import BUSY
from scheduler.fires import zone
from scheduler.jobs import Jobs

log = logging.getLogger("ctbot.scheduler")


class CtScheduler:
    def __init__(self, settings, jobs: Jobs, scheduler: BackgroundScheduler | None = None, *,
                 extra_jobs: list | None = None):
        """``extra_jobs``: (id, fn, seconds) run on an interval, such as the Slack outbox's
        drain, which the composition root hands in (the scheduler knows nothing of Slack)."""
        self.settings = settings
        self.jobs = jobs
        self.extra_jobs = list(extra_jobs or [])
        self.scheduler = scheduler or BackgroundScheduler(timezone=zone(settings.timezone))

    def add_jobs(self) -> None:
        s = self.settings
        common = dict(coalesce=True, max_instances=1, replace_existing=True)
        self.scheduler.add_job(self.jobs.weekly_retrain, self.jobs.trigger, id="weekly_retrain",
                               name=f"weekly retrain ({s.retrain_day} {s.retrain_time} {s.timezone})",
                               misfire_grace_time=s.misfire_grace_seconds, **common)
        # The watches also run once right at start-up: data that landed and runs that
        # ended while no scheduler was up are picked up without waiting an interval.
        now = datetime.now(self.scheduler.timezone)
        watch = s.data_watch_minutes * 60
        self.scheduler.add_job(self.jobs.data_watch, IntervalTrigger(seconds=watch), id="data_watch",
                               name="data watch", misfire_grace_time=max(1, int(watch)),
                               next_run_time=now, **common)
        self.scheduler.add_job(self.jobs.run_watch, IntervalTrigger(seconds=s.run_watch_seconds),
                               id="run_watch", name="run watch", next_run_time=now,
                               misfire_grace_time=max(1, int(s.run_watch_seconds)), **common)
        for job_id, fn, seconds in self.extra_jobs:
            self.scheduler.add_job(fn, IntervalTrigger(seconds=seconds), id=job_id, name=job_id.replace("_", " "),
                                   next_run_time=now, misfire_grace_time=max(1, int(seconds)), **common)

    def start(self, catch_up: bool = True) -> None:
        self.add_jobs()
        if catch_up:
            fire = self.jobs.catch_up()
            if fire:
                log.info("start-up catch-up of %s: %s", fire.key, fire.outcome)
        self.scheduler.start()

    def shutdown(self, wait: bool = True) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def next_retrain(self):
        return self.jobs.next_retrain()

    def run_data_watch_now(self, wait_seconds: float = 30.0):
        """One data-watch tick right now, outside the interval's once-per-slot claim (the
        demo and operators call it); its TickResult, or None when no data watch is set up.
        A tick already running (the scheduler's own, at start-up) is waited for first."""
        watch = self.jobs.data_watcher
        if watch is None:
            return None
        deadline = time.monotonic() + wait_seconds
        while True:
            result = watch.tick()
            if result.skip_reason != BUSY or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

    def data_watch_started(self) -> bool:
        """Has the start-up data-watch tick been dispatched (so the next is an interval away)?"""
        job = self.scheduler.get_job("data_watch")
        return job is None or job.next_run_time is None or \
            job.next_run_time.timestamp() > time.time() + self.settings.data_watch_minutes * 30
