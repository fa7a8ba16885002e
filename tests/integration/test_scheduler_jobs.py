"""Scheduled jobs across replicas (several scheduler objects, one real redis-server),
the start-up catch-up driven by an injected clock, and the APScheduler wiring."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from core.config import Settings
from core.state import StateStore
from ctbot.wiring import build_deps
from scheduler.app import CtScheduler
from scheduler.jobs import FIRST_START, WEEKLY_THROUGH
from tests.helpers import Clock
from tests.recording import RecordingNotifier, RecordingRunner, finish_run

PARIS = ZoneInfo("Europe/Paris")
TUE_0900 = datetime(2026, 11, 24, 9, 0, tzinfo=PARIS)     # ISO week 2026-W48


@pytest.fixture
def settings(bucket):
    return Settings(store=f"s3://{bucket}/", retrain_day="tue", retrain_time="09:00",
                    timezone="Europe/Paris", misfire_grace_seconds=6 * 3600,
                    data_watch_minutes=10, run_watch_seconds=5)


@pytest.fixture
def runner():
    return RecordingRunner()   # shared by every replica: it counts launches


@pytest.fixture
def data(s3_store):
    s3_store.put_bytes("data/2026-11-01/a.npz", b"a")


def replica(settings, redis_url, store, runner, clock, notifier=None, installed=datetime(2026, 11, 1, tzinfo=PARIS)):
    """One scheduler process: its own Redis connection, service and jobs; ctbot has been
    installed since ``installed`` (fires before that are not missed ones)."""
    state = StateStore.from_url(redis_url)
    if state.once(FIRST_START, 3600, value=str(installed.timestamp())):
        state.once(WEEKLY_THROUGH, 3600, value=str(installed.timestamp()))   # as a new install records it
    from ctbot.wiring import build_deps
    return build_deps(settings, state=StateStore.from_url(redis_url), store=store, runner=runner,
                      notifier=notifier, clock=clock).jobs


def test_two_replicas_launch_each_weekly_fire_once(settings, redis_url, s3_store, runner, data):
    clock = Clock(TUE_0900)
    a, b = (replica(settings, redis_url, s3_store, runner, clock) for _ in range(2))
    for week in range(3):
        clock.t = TUE_0900.timestamp() + week * 7 * 86400 + 0.5
        results, barrier = [], threading.Barrier(2)

        def fire(jobs, barrier=barrier, results=results):
            barrier.wait()
            results.append(jobs.weekly_retrain())

        threads = [threading.Thread(target=fire, args=(j,)) for j in (a, b)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(f.outcome for f in results) == ["duplicate", "launched"]
        launched = next(f for f in results if f.outcome == "launched")
        assert launched.key == f"2026-W{48 + week}"
        assert launched.run.trigger == "weekly" and launched.run.reason == f"weekly retrain {launched.key}"
        assert launched.run.requested_by == "scheduler"
        finish_run(s3_store, runner, launched.run.run_id)
        a.run_watch()
        # a late re-fire of the same week (misfire grace, a third replica) is still a duplicate
        assert b.weekly_retrain().outcome == "duplicate"
    assert len(runner.submits) == 3


def test_a_missed_tuesday_is_caught_up_once(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 24, 13, 0, tzinfo=PARIS))  # up again 4 h after the fire
    a, b = (replica(settings, redis_url, s3_store, runner, clock) for _ in range(2))
    fire = a.catch_up()
    assert fire.outcome == "launched" and fire.key == "2026-W48"
    # every fire since install (1 Nov) was missed: one run covers them all and says so
    assert fire.covers == ("2026-W45", "2026-W46", "2026-W47", "2026-W48")
    assert fire.run.reason.startswith("weekly retrain 2026-W45, 2026-W46, 2026-W47, 2026-W48")
    assert b.catch_up().outcome == "duplicate"
    assert a.catch_up().outcome == "duplicate"
    assert len(runner.submits) == 1
    claim = a.state.marker("fire:weekly:2026-W48")
    assert '"scheduled": "2026-11-24T09:00:00+01:00"' in claim


def test_a_missed_fire_is_caught_up_once_however_late(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 27, 10, 0, tzinfo=PARIS))  # Friday: three days late
    jobs = replica(settings, redis_url, s3_store, runner, clock)
    fire = jobs.catch_up()
    assert fire.outcome == "launched" and fire.key == "2026-W48"
    again = replica(settings, redis_url, s3_store, runner, clock)   # another replica, or a restart
    assert again.catch_up().outcome == "duplicate"
    assert len(runner.submits) == 1


def test_catch_up_can_be_turned_off(settings, redis_url, s3_store, runner, data):
    settings.schedule.catch_up = False
    clock = Clock(datetime(2026, 11, 25, 10, 0, tzinfo=PARIS))
    assert replica(settings, redis_url, s3_store, runner, clock).catch_up() is None
    assert runner.submits == []


def test_a_fresh_install_catches_up_nothing(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 27, 10, 0, tzinfo=PARIS))
    jobs = replica(settings, redis_url, s3_store, runner, clock, installed=datetime(2026, 11, 26, tzinfo=PARIS))
    assert jobs.catch_up() is None and runner.submits == []


def test_no_catch_up_before_the_first_fire(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 24, 8, 0, tzinfo=PARIS))      # before this week's fire...
    jobs = replica(settings, redis_url, s3_store, runner, clock)
    fire = jobs.catch_up()                                          # ...last week's is caught up
    assert fire.key == "2026-W47"
    assert replica(settings, redis_url, s3_store, runner, clock).catch_up().outcome == "duplicate"


def test_a_fire_that_happened_is_not_caught_up_again(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 24, 9, 0, 1, tzinfo=PARIS))
    jobs = replica(settings, redis_url, s3_store, runner, clock)
    assert jobs.weekly_retrain().outcome == "launched"
    clock.set(datetime(2026, 11, 24, 10, 30, tzinfo=PARIS))     # restart an hour later
    restarted = replica(settings, redis_url, s3_store, runner, clock)
    assert restarted.catch_up().outcome == "duplicate"
    assert len(runner.submits) == 1


def test_a_paused_schedule_skips_the_fire_for_good(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 24, 9, 0, 1, tzinfo=PARIS))
    jobs = replica(settings, redis_url, s3_store, runner, clock)
    jobs.service.set_schedule_paused(True, "U1")
    assert jobs.weekly_retrain().outcome == "paused"
    entry = jobs.state.read_audit(1)[0]
    assert entry["action"] == "weekly_skipped" and entry["reason"] == "schedule paused"
    jobs.service.set_schedule_paused(False, "U1")
    clock.set(datetime(2026, 11, 24, 11, 0, tzinfo=PARIS))
    assert jobs.catch_up().outcome == "duplicate"   # resuming does not start it late
    assert runner.submits == []
    clock.set(datetime(2026, 12, 1, 9, 0, 1, tzinfo=PARIS))
    assert jobs.weekly_retrain().outcome == "launched"


def test_a_weekly_fire_during_an_active_run_is_queued_and_announced(settings, redis_url, s3_store, runner, data):
    notifier = RecordingNotifier()
    clock = Clock(datetime(2026, 11, 24, 9, 0, 1, tzinfo=PARIS))
    jobs = replica(settings, redis_url, s3_store, runner, clock, notifier)
    active = jobs.service.request_training("manual", {}, "U1")
    fire = jobs.weekly_retrain()
    assert fire.outcome == "queued" and active.run_id in fire.detail
    said = notifier.named("say")[-1][0]
    assert said.startswith("Weekly retrain 2026-W48 is queued behind run `") and active.run_id in said
    jobs.run_watch()                                   # the active run still runs: it waits
    assert len(runner.submits) == 1
    finish_run(s3_store, runner, active.run_id)
    clock.set(datetime(2026, 11, 24, 9, 30, tzinfo=PARIS))
    jobs.run_watch()                                   # it ended: the queued fire starts
    assert len(runner.submits) == 2
    queued = jobs.service.get_run(runner.submits[1]["run_id"])
    assert queued.trigger == "weekly" and "2026-W48" in queued.reason
    clock.set(datetime(2026, 11, 24, 10, 0, tzinfo=PARIS))
    jobs.run_watch()
    assert len(runner.submits) == 2                    # once


def test_weekly_fire_without_data_says_why(settings, redis_url, s3_store, runner):
    notifier = RecordingNotifier()
    jobs = replica(settings, redis_url, s3_store, runner, Clock(TUE_0900), notifier)
    fire = jobs.weekly_retrain()
    assert fire.outcome == "error" and "No training data" in fire.detail
    fire_id, text = notifier.named("fire_failed")[-1]   # announced with a Retry button
    assert fire_id == "weekly:2026-W48" and "could not start: No training data" in text


def test_watch_jobs_run_once_per_interval_across_replicas(settings, redis_url, s3_store, runner, data):
    clock = Clock(TUE_0900)
    a, b = (replica(settings, redis_url, s3_store, runner, clock) for _ in range(2))
    first = a.data_watch()
    assert first is not None and first.action == "baseline"
    assert b.data_watch() is None                 # same 10-minute slot
    clock.t += 600
    assert b.data_watch().skip_reason == "no new objects"
    assert a.data_watch() is None

    run = a.service.request_training("manual", {}, "U1")
    finish_run(s3_store, runner, run.run_id)
    clock.t += 5
    refreshed = b.run_watch()
    assert [r.state for r in refreshed] == ["succeeded"]
    assert a.run_watch() == []                    # same 5-second slot
    assert a.state.get_run(run.run_id).state == "succeeded"


def test_next_retrain(settings, redis_url, s3_store, runner):
    jobs = replica(settings, redis_url, s3_store, runner,
                   Clock(datetime(2026, 11, 25, 12, 0, tzinfo=PARIS)))
    assert jobs.next_retrain() == datetime(2026, 12, 1, 9, 0, tzinfo=PARIS)
    assert jobs.service.status()["next_retrain"] == datetime(2026, 12, 1, 9, 0, tzinfo=PARIS)


def test_apscheduler_wiring(settings, redis_url, s3_store, runner):
    jobs = replica(settings, redis_url, s3_store, runner, time.time)
    sched = CtScheduler(settings, jobs)
    sched.start(catch_up=False)
    try:
        by_id = {j.id: j for j in sched.scheduler.get_jobs()}
        assert set(by_id) == {"weekly_retrain", "data_watch", "run_watch"}
        weekly = by_id["weekly_retrain"]
        assert isinstance(weekly.trigger, CronTrigger)
        fields = {f.name: str(f) for f in weekly.trigger.fields}
        assert (fields["day_of_week"], fields["hour"], fields["minute"]) == ("tue", "9", "0")
        assert weekly.next_run_time.strftime("%a %H:%M") == "Tue 09:00"
        assert str(weekly.next_run_time.tzinfo) == "Europe/Paris"
        assert weekly.misfire_grace_time == 6 * 3600
        for job in by_id.values():
            assert job.coalesce is True and job.max_instances == 1
        assert by_id["data_watch"].trigger.interval.total_seconds() == 600
        assert by_id["run_watch"].trigger.interval.total_seconds() == 5
        # the data watch also ran once at start-up: its baseline cursor is there
        deadline = time.monotonic() + 20
        while jobs.state.get_cursor("data/") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert jobs.state.get_cursor("data/") is not None
    finally:
        sched.shutdown()
    assert not sched.scheduler.running


def test_the_running_scheduler_follows_runs_to_the_end(bucket, redis_url, s3_store, runner, data):
    settings = Settings(store=f"s3://{bucket}/", run_watch_seconds=0.2, data_watch_minutes=60)
    notifier = RecordingNotifier()
    deps = build_deps(settings, notifier=notifier, state=StateStore.from_url(redis_url),
                      store=s3_store, runner=runner)
    service, sched = deps.service, deps.scheduler
    run = service.request_training("manual", {}, "U1")
    finish_run(s3_store, runner, run.run_id)
    sched.start(catch_up=False)
    try:
        deadline = time.monotonic() + 20
        while service.get_run(run.run_id).active and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched.shutdown()
    assert service.get_run(run.run_id).state == "succeeded"
    assert len(notifier.named("run_finished")) == 1


def test_start_catches_up_a_missed_fire(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 24, 12, 0, tzinfo=PARIS))
    jobs = replica(settings, redis_url, s3_store, runner, clock)
    sched = CtScheduler(settings, jobs, BackgroundScheduler(timezone=PARIS))
    sched.start()
    sched.shutdown()
    assert [s["run_id"] for s in runner.submits] and jobs.state.marker("fire:weekly:2026-W48")


def test_bad_schedule_settings_fail_at_start(settings, redis_url, s3_store, runner):
    settings.retrain_day = "2"
    with pytest.raises(ValueError, match="day names"):
        replica(settings, redis_url, s3_store, runner, time.time)


def test_the_weekly_run_takes_schedule_mode_under_the_guard_rails(bucket, redis_url, s3_store, runner, data):
    """schedule.mode: refresh; full while there is no production model, then refresh."""
    from steps import deploy

    settings = Settings(store=f"s3://{bucket}/", retrain_day="tue", retrain_time="09:00",
                        timezone="Europe/Paris", schedule={"mode": "refresh"})
    clock = Clock(TUE_0900)
    jobs = replica(settings, redis_url, s3_store, runner, clock)
    first = jobs.weekly_retrain().run
    assert first.params["mode"] == "full" and "refresh needs a production model" in first.reason
    finish_run(s3_store, runner, first.run_id)
    jobs.run_watch()
    deploy.publish(s3_store, settings.model_name, f"runs/{first.run_id}/candidate/", run_id=first.run_id,
                   by="scheduler")
    clock.t = TUE_0900.timestamp() + 7 * 86400 + 0.5
    second = jobs.weekly_retrain().run
    assert second.params["mode"] == "refresh"
    assert second.reason == "weekly retrain 2026-W49; mode refresh: the configured mode is refresh"
    assert [s["params"]["mode"] for s in runner.submits] == ["full", "refresh"]

def test_a_failed_fire_is_folded_into_the_next_catch_up(settings, redis_url, s3_store, runner):
    """W47 failed (no data: a refusal, announced at once); the scheduler is then down over
    W48. Once data is there, the start-up catch-up runs both weeks in one run."""
    notifier = RecordingNotifier()
    clock = Clock(datetime(2026, 11, 17, 9, 0, 1, tzinfo=PARIS))
    jobs = replica(settings, redis_url, s3_store, runner, clock, notifier,
                   installed=datetime(2026, 11, 16, tzinfo=PARIS))
    assert jobs.weekly_retrain().outcome == "error"
    assert [f.id for f in jobs.fires.owed("weekly", "failed")] == ["weekly:2026-W47"]
    s3_store.put_bytes("data/2026-11-20/a.npz", b"a")
    clock.set(datetime(2026, 11, 25, 8, 0, tzinfo=PARIS))
    fire = replica(settings, redis_url, s3_store, runner, clock, notifier).catch_up()
    assert fire.outcome == "launched" and fire.covers == ("2026-W47", "2026-W48")
    assert "2026-W47, 2026-W48" in fire.run.reason and len(runner.submits) == 1
    assert jobs.fires.get("weekly:2026-W47").state == "covered" and jobs.fires.owed("weekly", "failed") == []


def test_a_weekly_fire_queued_by_an_older_ctbot_is_kept(settings, redis_url, s3_store, runner, data):
    clock = Clock(datetime(2026, 11, 24, 10, 0, tzinfo=PARIS))
    jobs = replica(settings, redis_url, s3_store, runner, clock)
    jobs.state.forget(WEEKLY_THROUGH)    # an older ctbot kept no watermark
    for week, day in (("2026-W46", 10), ("2026-W47", 17), ("2026-W48", 24)):   # the old claims, 21 days each
        jobs.state.once(f"fire:weekly:{week}", 21 * 86400,
                        value=json.dumps({"scheduled": f"2026-11-{day}T09:00:00+01:00"}))
    jobs.state.put_marker("queued:weekly", "2026-W48", 3600)     # what the old run watch waited on
    assert jobs.catch_up().outcome == "duplicate"
    assert jobs.fires.queue() == ["weekly:2026-W48"] and jobs.state.marker("queued:weekly") is None
    clock.t += 5
    jobs.run_watch()
    assert [s["run_id"] for s in runner.submits] and jobs.fires.queue() == []
    assert jobs.service.get_run(runner.submits[0]["run_id"]).reason == "weekly retrain 2026-W48"
