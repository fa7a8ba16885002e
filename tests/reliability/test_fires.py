"""Weekly and new-data fires under faults: a fire is done only once its run is accepted
or queued, whatever the store, the runner or a second scheduler does meanwhile.

Each scheduler replica here is the real thing built by ctbot.wiring (its own Redis
connection, service, outbox and Slack delivery) against the world's redis-server, the
local S3 server behind the fault proxy, the Slack stand-in and the KFP API stand-in
through the real kfp client. Time is injected (the replicas share a clock the test
moves), so retries with backoff are driven by moving the clock, never by sleeping.
"""
from __future__ import annotations

import threading
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from core.config import Settings
from core.state import StateStore
from ctbot.wiring import build_deps
from devkit.kfp_standin import KfpStandin
from scheduler.jobs import FIRST_START, WEEKLY_THROUGH
from steps.storage import open_store, s3_client
from tests.helpers import Clock
from tests.helpers import wait_until as wait
from tests.reliability.conftest import seed_data
from tests.slack_helpers import BOT_TOKEN

pytestmark = pytest.mark.timeout(600)

PARIS = ZoneInfo("Europe/Paris")
TUE_W48 = datetime(2026, 11, 24, 9, 0, 1, tzinfo=PARIS)     # just after the 2026-W48 fire
KFP_RUNS = r"^/apis/v2beta1/runs$"


@pytest.fixture
def kfp():
    s = KfpStandin().start()
    yield s
    s.stop()


def replica(world, kfp, clock, installed: datetime = datetime(2026, 11, 23, tzinfo=PARIS), **kw):
    """One scheduler process's parts, as ctbot.wiring builds them; ctbot was installed at
    ``installed`` (fires before that are not missed ones)."""
    settings = Settings(store=f"s3://{world.bucket}/", redis_url=world.redis.url, runner="kfp",
                        kfp_host=kfp.url, kfp_retries=0, slack_bot_token=BOT_TOKEN,
                        slack_api_url=world.standin.api_url, slack_min_update_seconds=0,
                        retrain_day="tue", retrain_time="09:00", timezone="Europe/Paris",
                        run_watch_seconds=5, data_watch_minutes=10, deploy_floor=0.3, **kw)
    state = StateStore.from_url(world.redis.url)
    if state.once(FIRST_START, 3600, value=str(installed.timestamp())):
        state.once(WEEKLY_THROUGH, 3600, value=str(installed.timestamp()))   # as a new install records it
    store = open_store(f"s3://{world.bucket}/", client=s3_client(world.proxy.url))
    return build_deps(settings, state=state, store=store, clock=clock)


def tick(deps, clock, seconds: float = 5.0):
    """The run watch's next tick on this replica (its interval slot moved on)."""
    clock.advance(seconds)
    return deps.jobs.run_watch()


def kfp_runs(kfp) -> int:
    return sum(1 for c in kfp.calls("POST", KFP_RUNS) if c.status == 200)


def accepted_runs(deps) -> list:
    """Runs the runner accepted; a submit that failed leaves a run record failed with
    "submit failed" (what /ct runs shows), which the fire's retry does not reuse."""
    runs = deps.state.list_runs(20)
    assert all(r.error.startswith("submit failed") for r in runs if r.state == "failed" and not r.external_id)
    return [r for r in runs if r.external_id]


def channel_texts(world) -> list[str]:
    return [m.text + " " + str(m.blocks) for m in world.standin.messages(world.channel)]


def test_a_store_error_at_the_weekly_fire_is_retried_into_exactly_one_run(world, kfp, ledger):
    """The finding: the fire was claimed before its run started; a store error then lost
    the week (catch-up answered "duplicate"). Now the claim owes a run until it starts."""
    seed_data(world.store)
    clock = Clock(TUE_W48)
    a = replica(world, kfp, clock)
    mark = ledger.mark()

    world.proxy.fail_next(6, status=503)      # every try boto makes of the listing (1 + 5 retries)
    ledger.fault("S3 503 x6 while the weekly fire lists the training data")
    fire = a.jobs.weekly_retrain()
    assert fire.outcome == "retrying" and fire.key == "2026-W48", fire
    assert a.state.list_runs(5) == [] and kfp_runs(kfp) == 0

    # That scheduler goes away; another one starts. Its catch-up does not run the owed
    # fire a second time, and does not forget it either: the run watch retries it when due.
    b = replica(world, kfp, clock)
    assert b.jobs.catch_up().outcome == "duplicate"
    tick(b, clock, 5)
    assert b.state.list_runs(5) == [], "not due yet: the first retry is 30 s after the failure"
    tick(b, clock, 30)
    [run] = b.state.list_runs(5)
    assert (run.trigger, run.reason, run.state) == ("weekly", "weekly retrain 2026-W48", "running")
    assert kfp_runs(kfp) == 1

    # Later fires of the same week, catch-ups and ticks on both replicas: still one run.
    clock.advance(3600)
    assert a.jobs.weekly_retrain().outcome == "duplicate"
    assert a.jobs.catch_up().outcome == "duplicate" and b.jobs.catch_up().outcome == "duplicate"
    tick(a, clock)
    tick(b, clock)
    assert len(b.state.list_runs(5)) == 1 and kfp_runs(kfp) == 1
    audit = [e["action"] for e in b.state.read_audit(20)]
    assert "fire_retrying" in audit and "fire_started" in audit
    ledger.survived_since(mark)


def weekly_fire_meets_a_failed_submit(world, kfp, ledger, *, window_minutes: float, outcome: str):
    """W48's fire on a replica whose runner's first submit gets a 503; (clock, replica, ledger mark)."""
    seed_data(world.store)
    clock = Clock(TUE_W48)
    deps = replica(world, kfp, clock, schedule={"retry_window_minutes": window_minutes})
    mark = ledger.mark()
    kfp.fail("POST", KFP_RUNS, status=503, times=1)
    ledger.fault(f"KFP API 503 on the weekly fire's run submit (retry window {window_minutes} min)")
    assert deps.jobs.weekly_retrain().outcome == outcome
    return clock, deps, mark


def test_a_runner_submit_failure_is_retried_then_announced_with_a_retry_button(world, kfp, ledger):
    clock, a, mark = weekly_fire_meets_a_failed_submit(world, kfp, ledger, window_minutes=2, outcome="retrying")
    # One failed submit: retried 30 s later, into one KFP run.
    tick(a, clock, 31)
    fire = a.jobs.fires.get("weekly:2026-W48")
    assert fire.state == "started" and kfp_runs(kfp) == 1
    assert a.state.get_run(fire.run_id).state == "running"
    a.service.cancel(fire.run_id, by="U0ALICE01")

    # The next week the API stays down past the retry window: the fire is announced
    # with a Retry button, and nothing runs twice.
    clock.t = TUE_W48.timestamp() + 7 * 86400
    kfp.fail("POST", KFP_RUNS, status=503, times=3)
    ledger.fault("KFP API 503 x3 across the next weekly fire's retry window")
    assert a.jobs.weekly_retrain().outcome == "retrying"          # t+0: retry at +30 s
    tick(a, clock, 31)                                             # t+31: retry at +91 s
    tick(a, clock, 61)                                             # t+92: past the 2-min window
    fire = a.jobs.fires.get("weekly:2026-W49")
    assert fire.state == "failed" and fire.attempts == 3 and "503" in fire.error
    assert kfp_runs(kfp) == 1 and len(accepted_runs(a)) == 1
    [announced] = [m for m in world.standin.messages(world.channel) if "Weekly retrain 2026-W49 could not start" in m.text]
    assert "tried 3 times" in announced.text
    assert [e.get("action_id") for b in announced.blocks for e in b.get("elements") or []
            if e.get("type") == "button"] == ["ct_retry_fire"]

    # The start-up catch-up of another replica retries it (the API is back): one run.
    b = replica(world, kfp, clock)
    caught = b.jobs.catch_up()
    assert caught.outcome == "launched" and caught.key == "2026-W49"
    assert kfp_runs(kfp) == 2 and len(accepted_runs(b)) == 2
    assert b.jobs.fires.get("weekly:2026-W49").state == "started"
    ledger.survived_since(mark)


def test_the_retry_button_goes_through_the_fires_claims(world, kfp, ledger):
    """A signed click on Retry, twice, by two people, at a real `ctbot serve`: one run."""
    clock, a, mark = weekly_fire_meets_a_failed_submit(world, kfp, ledger, window_minutes=0, outcome="error")
    [msg] = [m for m in world.standin.messages(world.channel) if "could not start" in m.text]

    bot = world.bot(CT_RUNNER="kfp", CT_KFP_HOST=kfp.url, CT_KFP_RETRIES="0", CT_SCHEDULE__CATCH_UP="false")
    first = world.standin.action_payload(world.channel, msg.ts, "ct_retry_fire", user="U0ALICE01")
    second = world.standin.action_payload(world.channel, msg.ts, "ct_retry_fire", user="U0BOB0001")
    assert bot.click(first)[0] == 200 and bot.click(second)[0] == 200
    wait(lambda: a.jobs.fires.get("weekly:2026-W48").state == "started", 60, "the retried fire to start")
    wait(lambda: "retried it: run" in world.standin.message(world.channel, msg.ts).text + str(
        world.standin.message(world.channel, msg.ts).blocks), 60, "the Retry message to say so")
    assert kfp_runs(kfp) == 1 and len(accepted_runs(a)) == 1
    ledger.survived_since(mark)


def test_three_missed_weeks_are_caught_up_in_one_run_that_names_them(world, kfp, ledger):
    seed_data(world.store)
    clock = Clock(datetime(2026, 11, 24, 12, 0, tzinfo=PARIS))    # W48's Tuesday, 3 h after its fire
    installed = datetime(2026, 11, 9, tzinfo=PARIS)               # before the W46 fire (10 Nov)
    a, b = (replica(world, kfp, clock, installed=installed) for _ in range(2))
    fire = a.jobs.catch_up()
    assert fire.outcome == "launched" and fire.covers == ("2026-W46", "2026-W47", "2026-W48")
    assert b.jobs.catch_up().outcome == "duplicate"
    [run] = a.state.list_runs(5)
    assert "2026-W46, 2026-W47, 2026-W48" in run.reason and kfp_runs(kfp) == 1
    # The channel is told which weeks the one run covers, and the run's own message says it.
    wait(lambda: any("2026-W46, 2026-W47, 2026-W48" in t and run.run_id in t for t in channel_texts(world)),
         30, "the run's message naming the weeks")
    assert any(t.startswith("Catching up 3 weekly retrains (2026-W46, 2026-W47, 2026-W48)")
               for t in channel_texts(world))
    # Each covered week is recorded as covered by the run's fire; nothing is left owed.
    for week in ("2026-W46", "2026-W47"):
        assert a.jobs.fires.get(f"weekly:{week}").by == "weekly:2026-W48"
    assert a.jobs.fires.owed("weekly", "failed") == [] and a.jobs.fires.queue() == []
    clock.advance(7 * 86400)   # a week later, restarted: only the new week is missed
    fire = replica(world, kfp, clock, installed=installed).jobs.catch_up()
    assert fire.covers == ("2026-W49",) and fire.outcome in ("launched", "queued")


def test_fires_behind_an_active_run_queue_and_start_in_order(world, kfp, ledger):
    seed_data(world.store)
    clock = Clock(TUE_W48)
    a = replica(world, kfp, clock, auto_retrain=True)
    watch = a.jobs.data_watcher
    watch.tick()                                                   # the data watch's baseline
    active = a.service.request_training("manual", {}, "U0ALICE01")
    assert a.jobs.weekly_retrain().outcome == "queued"
    world.store.put_bytes("data/batch-0002.npz", world.store.get_bytes("data/batch-0001.npz"))
    res = watch.tick()
    assert not res.run and "wait" in res.skip_reason
    assert [i.partition(":")[0] for i in a.jobs.fires.queue()] == ["weekly", "new_data"]
    assert any("queued behind run" in t and "and 1 queued fire(s)" in t for t in channel_texts(world))

    tick(a, clock)                                                 # the active run still runs
    assert len(a.state.list_runs(5)) == 1
    a.service.cancel(active.run_id, by="U0ALICE01")
    tick(a, clock)
    second = a.service.active_run()
    assert second.trigger == "weekly" and [i.partition(":")[0] for i in a.jobs.fires.queue()] == ["new_data"]
    tick(a, clock)
    assert a.service.active_run().run_id == second.run_id         # the next one waits its turn
    a.service.cancel(second.run_id, by="U0ALICE01")
    tick(a, clock)
    third = a.service.active_run()
    assert third.trigger == "new_data" and a.jobs.fires.queue() == []
    assert [r.trigger for r in reversed(a.state.list_runs(5))] == ["manual", "weekly", "new_data"]
    assert kfp_runs(kfp) == 3


def test_two_schedulers_racing_start_one_run_per_fire(world, kfp, ledger):
    seed_data(world.store)
    clock = Clock(TUE_W48)
    a, b = (replica(world, kfp, clock) for _ in range(2))
    mark = ledger.mark()

    def race(fn_a, fn_b):
        results, barrier = [None, None], threading.Barrier(2)

        def go(i, fn):
            barrier.wait()
            results[i] = fn()

        threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate((fn_a, fn_b))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return results

    for week in range(3):
        clock.t = TUE_W48.timestamp() + week * 7 * 86400
        if week == 1:   # this week's first try meets a store error; both replicas then retry at once
            world.proxy.fail_next(6, status=503)
            ledger.fault("S3 503 x6 at a weekly fire raced by two schedulers")
        outcomes = sorted(f.outcome for f in race(a.jobs.weekly_retrain, b.jobs.weekly_retrain))
        if week == 1:
            assert outcomes == ["duplicate", "retrying"]
            clock.advance(31)
            retried = race(a.jobs.fires.tick, b.jobs.fires.tick)
            assert sorted(o.outcome for out in retried for o in out) in (["launched"], ["busy", "launched"],
                                                                         ["duplicate", "launched"])
        else:
            assert outcomes == ["duplicate", "launched"]
        runs = a.state.list_runs(10)
        assert len(runs) == week + 1 and kfp_runs(kfp) == week + 1
        assert runs[0].reason == f"weekly retrain 2026-W{48 + week}"
        a.service.cancel(runs[0].run_id, by="U0ALICE01")
    ledger.survived_since(mark)
