"""APScheduler wiring: three jobs on a BackgroundScheduler, plus the start-up catch-up.

    service, sched = build(settings, notifier)   # in an entry point
    sched.start()                                # catch-up, then the jobs run in threads
    ...
    sched.shutdown()

Job stores are in memory on purpose: the jobs are defined by code and settings, and
exactly-once per fire comes from Redis (scheduler/jobs.py), not from a shared job store.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from scheduler.fires import zone
from scheduler.jobs import Jobs

log = logging.getLogger("ctbot.scheduler")


class CtScheduler:
    def __init__(self, settings, jobs: Jobs, scheduler: BackgroundScheduler | None = None):
        self.settings = settings
        self.jobs = jobs
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


def build(settings, notifier=None, *, state=None, store=None, runner=None, clock=time.time):
    """The training service and a scheduler around it, from settings. Network clients
    are created here, in the entry point, never at import time."""
    from core.service import TrainingService
    from core.state import StateStore
    from scheduler.data_watch import DataWatch
    from steps.storage import open_store

    if state is None:
        if not settings.redis_url:
            raise ValueError("REDIS_URL is not set: the scheduler keeps its state in Redis")
        state = StateStore.from_url(settings.redis_url)
    store = store or open_store(settings.store)
    if runner is None:
        from pipelines.runners import get_runner
        runner = get_runner(settings)
    service = TrainingService(settings, state, store, runner, notifier, clock=clock)
    watch = DataWatch(settings, state, store, service, notifier, clock=clock)
    jobs = Jobs(settings, state, service, watch, notifier, clock=clock)
    service.next_retrain_fn = jobs.next_retrain
    return service, CtScheduler(settings, jobs)


def main() -> None:
    """A scheduler process without Slack (python -m scheduler): runs, alerts go to the log."""
    from core.config import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _, sched = build(Settings.from_env())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sched.start()
    log.info("scheduler started; next weekly retrain %s", sched.next_retrain())
    stop.wait()
    sched.shutdown()
