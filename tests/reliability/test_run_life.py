"""SIGKILL at every point of a run's life, plus Redis restarted, S3 5xx bursts and Slack
429/500 bursts, on one real run (kfp.local through the LocalRunner): the run is reported
exactly once, with its details and confusion matrix, in one message; the command that
started it is answered; production holds an untorn package. Like Dagster's
test_sensor_failure_recovery: each crash point is a named place the process dies at."""
from __future__ import annotations

import time

import pytest

from steps import layout
from steps.deploy import read_alias, verify_package
from tests.helpers import wait_until as wait
from tests.reliability.conftest import seed_data

pytestmark = pytest.mark.timeout(600)


def run_messages(world, run_id: str) -> list:
    """Top-level messages that are this run's (by the metadata every run message carries)."""
    key = f"run-{run_id}"
    return [m for m in world.standin.messages(world.channel)
            if (m.metadata.get("event_payload") or {}).get("key") == key]


def test_a_run_survives_a_crash_at_every_point_of_its_life(world, ledger):
    seed_data(world.store)
    state = world.state()
    mark = ledger.mark()

    # 1. Killed right after the ack: the command was recorded before the ack promised anything.
    bot = world.bot(crash_at="after_ack")
    status, ack, rurl, _ = bot.slash("train epochs=2 batch_size=64")
    assert status == 200 and "Starting a training run" in ack
    bot.wait_dead(10, "after the ack")
    ledger.fault("SIGKILL after the ack, before the job ran")

    # 2. The restarted bot resumes it and dies after the run record, before submit.
    bot = world.bot(crash_at="after_run_record")
    bot.wait_dead(60, "after the run record")
    ledger.fault("SIGKILL after the run record, before submit")
    (run_id,) = [r.run_id for r in state.list_runs(5)]
    assert state.get_run(run_id).state == "queued"

    # 3. Resumed again: the same run (same id) is submitted, once; the user hears of it.
    bot = world.bot(crash_at="report_before_post")
    wait(lambda: state.get_run(run_id).external_id, 60, "the run to be submitted")
    rid = rurl.rsplit("/", 1)[1]
    world.standin.wait_for("response", where=lambda a: a["rid"] == rid, timeout=30)
    assert [r.run_id for r in state.list_runs(5)] == [run_id]

    # 4. Mid-training: Slack and S3 misbehave, Redis restarts, the bot is killed.
    wait(lambda: (world.store.get_json(layout.step_key(run_id, "train")) or {}).get("state") == "running",
         240, "training to start")
    world.standin.fail_next("chat.update", status=429, retry_after=1, times=2)
    ledger.fault("Slack 429 x2 on chat.update")
    world.standin.fail_next("chat.update", status=500)
    ledger.fault("Slack 500 on chat.update")
    world.proxy.fail_next(3, status=503)
    ledger.fault("S3 503 x3")
    time.sleep(3)
    world.redis.kill()              # the bot keeps running through the outage...
    time.sleep(2)
    world.redis.start()             # ...and picks up again when Redis is back
    ledger.fault("Redis restarted mid-run")
    time.sleep(2)
    bot.kill()
    ledger.fault("SIGKILL mid-training")

    # 5. The pipeline (a separate process) finishes; the new bot dies on the finish.
    bot = world.bot(crash_at="report_before_post")
    bot.wait_dead(300, "after report.json, before the post")
    ledger.fault("SIGKILL after report.json, before the post")
    assert world.store.get_json(layout.report_key(run_id)) is not None

    # 6. During the final Slack calls: after the report's chat.update, then after the details.
    bot = world.bot(crash_at="final_slack_call")
    bot.wait_dead(120, "during the final Slack call")
    ledger.fault("SIGKILL during the final Slack call")
    world.standin.fail_next("chat.postMessage", status=500, after_effect=True)   # posted; the reply is lost
    ledger.fault("Slack 500 after the effect on chat.postMessage (lost reply)")
    bot = world.bot(crash_at="after_details_post")
    bot.wait_dead(120, "after the details were posted")
    ledger.fault("SIGKILL after the thread details were posted")
    world.standin.fail_next("files.completeUploadExternal", status=429, retry_after=1)
    ledger.fault("Slack 429 on files.completeUploadExternal")

    # 7. A clean bot finishes the delivery.
    bot = world.bot()
    run = wait(lambda: (r := state.get_run(run_id)) and not r.active and r, 120, "the run to end")
    assert run.state == "succeeded", run.error

    def delivered():
        msgs = run_messages(world, run_id)
        if len(msgs) != 1:
            return None
        thread = world.standin.thread(world.channel, msgs[0].ts)
        files = [f for m in thread for f in m.files]
        return (msgs, thread, files) if files else None
    msgs, thread, files = wait(delivered, 120, "the report, its details and its image")
    (msg,) = msgs
    text = " ".join([msg.text] + [str(b) for b in msg.blocks])
    assert "deployed as v1" in text or "held" in text
    details = [m for m in thread if (m.metadata.get("event_payload") or {}).get("key") == f"details-{run_id}"]
    confusion = [f for f in files if f.get("title") == f"Confusion matrix, run {run_id}"]
    ledger.lost += sum(n == 0 for n in (len(msgs), len(details), len(confusion)))
    ledger.duplicated += sum(max(0, n - 1) for n in (len(msgs), len(details), len(confusion)))
    assert (len(msgs), len(details), len(confusion)) == (1, 1, 1)
    # The command was answered (once it had a run to name), and only one run exists.
    answers = world.standin.responses(rid)
    ledger.lost += not answers
    assert any(run_id in str(a) for a in answers)
    assert [r.run_id for r in state.list_runs(5)] == [run_id]
    # Production is an untorn package, if the run deployed.
    alias = read_alias(world.store, "mnist-arcface")
    if run.decision == "deploy":
        assert alias["version"] == 1 and verify_package(world.store, "mnist-arcface", 1)
    assert state.r.zcard(state.k("outbox", "runs")) == 0          # nothing still owed to Slack
    ledger.survived_since(mark)
