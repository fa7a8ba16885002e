"""The data-watch tick's policy: threshold, alert, auto-retrain, crash safety."""
from __future__ import annotations

import threading

import pytest

from core.config import Settings
from core.fires import Fires
from core.state import StateStore
from scheduler.data_watch import DataWatch
from tests.recording import RecordingNotifier, RecordingRunner, finish_run, make_service


def settings_for(bucket, **kw):
    return Settings(store=f"s3://{bucket}/", data_sweep_minutes=60, **kw)


@pytest.fixture
def state(redis_url):
    return StateStore.from_url(redis_url)


@pytest.fixture
def parts(state, s3_store):
    s3_store.put_bytes("data/2026-11-01/seed.npz", b"seed")
    return state, s3_store, RecordingRunner(), RecordingNotifier()


def watch_for(settings, state, store, runner, notifier):
    service = make_service(settings, state, store, runner, notifier)
    return DataWatch(settings, state, store, service, notifier), service


def test_first_tick_is_a_baseline(parts, bucket):
    state, store, runner, notifier = parts
    watch, _ = watch_for(settings_for(bucket), state, store, runner, notifier)
    res = watch.tick()
    assert res.action == "baseline" and not res.run and "1 object(s)" in res.skip_reason
    assert res.cursor["key"] == "data/2026-11-01/seed.npz"
    res = watch.tick()
    assert (res.action, res.skip_reason, res.listed) == ("skip", "no new objects", 0)
    assert notifier.calls == [] and runner.submits == []


def test_below_threshold_waits_then_alerts_once(parts, bucket):
    state, store, runner, notifier = parts
    watch, _ = watch_for(settings_for(bucket, new_data_threshold=3), state, store, runner, notifier)
    watch.tick()
    store.put_bytes("data/2026-11-22/3/a.png", b"aa")
    store.put_bytes("data/2026-11-22/3/b.png", b"bbb")
    res = watch.tick()
    assert not res.run and res.skip_reason == "2 new object(s), below the threshold of 3"
    assert len(res.new.keys) == 2 and notifier.calls == []
    assert state.pending()["objects"] == 2
    store.put_bytes("data/2026-11-23/7/c.png", b"c")
    res = watch.tick()
    assert res.action == "alert" and res.listed == 1  # only the new key was listed
    found, alert_id = notifier.named("new_data")[0]
    assert alert_id == res.alert_id and alert_id.startswith("nd-")
    assert found.keys == ["data/2026-11-22/3/a.png", "data/2026-11-22/3/b.png",
                          "data/2026-11-23/7/c.png"]  # oldest first
    assert found.total_bytes == 6 and found.counts == {"3": 2, "7": 1}
    assert found.fingerprint.startswith("sha256:")
    assert state.pending()["objects"] == 3
    assert state.read_audit(1)[0]["action"] == "new_data_alert"
    assert watch.tick().skip_reason == "no new objects"
    assert len(notifier.named("new_data")) == 1 and runner.submits == []


def test_auto_retrain_starts_one_run(parts, bucket):
    state, store, runner, notifier = parts
    watch, service = watch_for(settings_for(bucket, auto_retrain=True), state, store, runner, notifier)
    watch.tick()
    store.put_bytes("data/2026-11-22/x.npz", b"x")
    res = watch.tick()
    assert res.run and res.action == "run" and res.run_id == runner.launched()[0]
    run = service.get_run(res.run_id)
    assert run.trigger == "new_data" and run.requested_by == "scheduler"
    assert store.uri("data/2026-11-22/x.npz") in run.data_uris
    assert notifier.named("new_data") == []


def test_new_data_during_a_run_waits_for_it(parts, bucket):
    state, store, runner, notifier = parts
    watch, service = watch_for(settings_for(bucket, auto_retrain=True), state, store, runner, notifier)
    watch.tick()
    active = service.request_training("manual", {}, "U1")
    store.put_bytes("data/2026-11-22/y.npz", b"y")
    res = watch.tick()
    assert not res.run and active.run_id in res.skip_reason and "1 new object(s) wait" in res.skip_reason
    assert len(runner.submits) == 1
    assert watch.tick().skip_reason == "no new objects"   # the fire owns them now, queued
    finish_run(store, runner, active.run_id)
    service.refresh(active.run_id)
    started = Fires(service).tick()    # the run watch's tick: the queued fire gets its run
    assert [f.outcome for f in started] == ["launched"]
    assert store.uri("data/2026-11-22/y.npz") in started[0].run.data_uris
    assert len(runner.submits) == 2


def test_auto_retrain_is_off_while_the_schedule_is_paused(parts, bucket):
    state, store, runner, notifier = parts
    watch, _ = watch_for(settings_for(bucket, auto_retrain=True), state, store, runner, notifier)
    watch.tick()
    state.set_schedule_paused(True)
    store.put_bytes("data/2026-11-22/z.npz", b"z")
    res = watch.tick()
    assert res.action == "alert" and runner.submits == []
    assert "paused" in notifier.named("say")[0][0]


class CrashOnce(StateStore):
    """A process that dies after posting the alert, before committing the cursor."""
    crashed = False

    def commit_watch(self, *a, **kw):
        if not self.crashed:
            self.crashed = True
            raise SystemExit("killed")
        return super().commit_watch(*a, **kw)


def test_a_crash_before_the_cursor_commit_does_not_repeat_the_alert(redis_url, bucket, s3_store):
    base = StateStore.from_url(redis_url)
    notifier = RecordingNotifier()
    settings = settings_for(bucket)
    DataWatch(settings, base, s3_store, None, notifier).tick()  # baseline
    s3_store.put_bytes("data/2026-11-22/q.npz", b"q")
    crashy = CrashOnce(base.r)
    with pytest.raises(SystemExit):
        DataWatch(settings, crashy, s3_store, None, notifier).tick()
    assert len(notifier.named("new_data")) == 1
    res = DataWatch(settings, base, s3_store, None, notifier).tick()  # restarted process
    assert res.action == "alert" and res.new.keys == ["data/2026-11-22/q.npz"]
    assert len(notifier.named("new_data")) == 1, "same fingerprint: no second alert"
    assert base.pending()["objects"] == 1, "and counted once"
    assert DataWatch(settings, base, s3_store, None, notifier).tick().skip_reason == "no new objects"


def test_a_crash_before_commit_does_not_start_a_second_run(redis_url, bucket, s3_store):
    base = StateStore.from_url(redis_url)
    runner = RecordingRunner()
    settings = settings_for(bucket, auto_retrain=True)
    s3_store.put_bytes("data/a.npz", b"a")
    DataWatch(settings, base, s3_store, make_service(settings, base, s3_store, runner)).tick()
    s3_store.put_bytes("data/b.npz", b"b")
    crashy = CrashOnce(base.r)
    with pytest.raises(SystemExit):
        DataWatch(settings, crashy, s3_store, make_service(settings, crashy, s3_store, runner)).tick()
    res = DataWatch(settings, base, s3_store, make_service(settings, base, s3_store, runner)).tick()
    assert res.run and len(runner.submits) == 1 and res.run_id == runner.launched()[0]


def test_concurrent_ticks_do_not_overlap(parts, bucket):
    state, store, runner, notifier = parts
    settings = settings_for(bucket)
    watch, _ = watch_for(settings, state, store, runner, notifier)
    watch.tick()
    store.put_bytes("data/2026-11-22/r.npz", b"r")
    results, barrier = [], threading.Barrier(2)

    def go():
        w = DataWatch(settings, StateStore(state.r), store, None, notifier)
        barrier.wait()
        results.append(w.tick())

    threads = [threading.Thread(target=go) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(notifier.named("new_data")) == 1
    assert state.pending()["objects"] == 1
    assert sorted(r.action for r in results) == ["alert", "skip"]


def test_on_new_data_picks_the_mode_by_the_guard_rails(parts, bucket):
    """ct.on_new_data: refresh, through real ticks, runs and the service: full while there is
    no production model, then refreshes, warm after refresh.max_in_a_row of them, full after
    a held warm, warm after a held refresh; each run's reason says why."""
    from steps import deploy

    state, store, runner, notifier = parts
    settings = settings_for(bucket, ct={"on_new_data": "refresh", "refresh": {"max_in_a_row": 2}})
    watch, service = watch_for(settings, state, store, runner, notifier)
    watch.tick()
    seen = []

    def next_run(i: int, decision: str = "deploy"):
        store.put_bytes(f"data/2026-12-0{i}/batch.npz", f"batch {i}".encode())
        res = watch.tick()
        assert res.run, res.skip_reason
        run = service.get_run(res.run_id)
        finish_run(store, runner, run.run_id, decision=decision)
        service.refresh(run.run_id)
        if decision == "deploy":
            deploy.publish(store, settings.model_name, f"runs/{run.run_id}/candidate/",
                           run_id=run.run_id, by="scheduler")
        seen.append(run.params["mode"])
        return run

    first = next_run(1)
    assert first.params["mode"] == "full" and "refresh needs a production model" in first.reason
    second = next_run(2)
    assert second.params["mode"] == "refresh" and "mode refresh: the configured mode is refresh" in second.reason
    next_run(3)
    warm = next_run(4, decision="hold")
    assert warm.params["mode"] == "warm" and "2 refreshes in a row reached refresh.max_in_a_row (2)" in warm.reason
    full = next_run(5)
    assert full.params["mode"] == "full" and f"the last warm run `{warm.run_id}` was held by the gate" in full.reason
    held = next_run(6, decision="hold")
    after = next_run(7)
    assert (held.params["mode"], after.params["mode"]) == ("refresh", "warm")
    assert f"the last refresh run `{held.run_id}` was held by the gate" in after.reason
    assert seen == ["full", "refresh", "refresh", "warm", "full", "refresh", "warm"]
    assert [s["params"]["mode"] for s in runner.submits] == seen     # what the pipeline was given

def test_an_auto_retrain_that_failed_is_retried_at_start_up(parts, bucket, redis_url):
    """The runner refuses the submit past the retry window: the fire is announced with a
    Retry button; the next start-up's catch-up retries it, into one run."""
    from ctbot.wiring import build_deps

    state, store, _, notifier = parts
    settings = settings_for(bucket, auto_retrain=True, schedule={"retry_window_minutes": 0})
    broken = RecordingRunner(fail_with="KFP API answered 503")
    watch, service = watch_for(settings, state, store, broken, notifier)
    watch.tick()
    store.put_bytes("data/2026-11-22/w.npz", b"w")
    res = watch.tick()
    assert not res.run and "503" in res.skip_reason
    [(fire_id, text)] = notifier.named("fire_failed")
    assert fire_id.startswith("new_data:nd-") and "could not start" in text

    runner = RecordingRunner()
    jobs = build_deps(settings, state=state, store=store, runner=runner, notifier=notifier).jobs
    jobs.catch_up()
    assert len(runner.submits) == 1 and Fires(service).get(fire_id).state == "started"
    jobs.catch_up()                                     # another start-up: nothing owed any more
    assert len(runner.submits) == 1
