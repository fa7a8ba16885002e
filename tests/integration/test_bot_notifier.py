"""The Slack outbox and its deliverer against the Slack stand-in: one message per run updated in place, the
report, details and confusion matrix in its thread, throttling and HTTP 429."""
from __future__ import annotations

import time

import pytest

from bot import ids
from core.types import RunRecord
from devkit.standin import SlackStandin
from steps import layout
from tests.slack_helpers import (
    ALICE,
    BOT_TOKEN,
    buttons,
    message_text,
    png_bytes,
    put_training_data,
    report,
    start_bot,
    write_step,
)


@pytest.fixture
def standin(tmp_path):
    with SlackStandin(bot_token=BOT_TOKEN, files_dir=tmp_path / "files") as s:
        yield s


def a_run(**kw) -> RunRecord:
    base = dict(run_id="r-20261122-0912-ab12", model="mnist-arcface", trigger="weekly",
                reason="weekly retrain 2026-W47", requested_by="scheduler", state="running", started_at=time.time())
    return RunRecord(**{**base, **kw})


def test_full_run_flow_through_the_service(tmp_path, redis_url):
    """Start, progress, finish: what a channel sees for one run, driven by the real service."""
    bot = start_bot(tmp_path, redis_url)
    try:
        put_training_data(bot.store)
        run = bot.service.request_training("/ct train by <@U0ALICE01>", {"epochs": 2}, ALICE)
        ch, ts = run.slack_channel, run.slack_ts
        posted = bot.standin.calls("chat.postMessage")
        assert len(posted) == 1 and posted[0].args["channel"] == "#ct"
        assert "▫️ *ingest*" in message_text(posted[0].args)

        write_step(bot.store, run.run_id, "ingest", "done", 0.4)
        write_step(bot.store, run.run_id, "validate", "done", 0.1)
        write_step(bot.store, run.run_id, "train", "running", epoch=1, epochs=2, loss=0.52)
        bot.service.refresh(run.run_id)
        update = bot.standin.wait_for("chat.update")[-1]
        assert update.args["ts"] == ts
        progress = message_text(update.args)
        assert "✅ *ingest*" in progress and "⏳ *train* · epoch 1/2" in progress and "▫️ *embed*" in progress

        rep = report(run.run_id, warnings=["class 7 has 3% fewer images"])
        bot.store.put_json(layout.report_key(run.run_id), rep)
        png = png_bytes()
        bot.store.put_bytes(layout.confusion_png_key(run.run_id), png)
        for step in layout.STEPS:
            write_step(bot.store, run.run_id, step, "done", 1.0)
        bot.runner.status[run.run_id] = "succeeded"
        bot.service.refresh(run.run_id)

        # The message now holds the final report...
        msg = bot.standin.message(ch, ts)
        final = message_text(msg.to_payload())
        assert "deployed as v4" in final and "+0.22 pp vs production v3" in final
        assert set(buttons(msg.blocks)) == {ids.ROLLBACK, ids.VIEW_RUN, ids.RETRAIN}
        # ...and its thread the details and the confusion matrix.
        thread = bot.standin.thread(ch, ts)
        assert "Per-class kNN top-1" in message_text(thread[0].to_payload())
        assert "class 7 has 3% fewer images" in message_text(thread[0].to_payload())
        files = [f for m in thread for f in m.files]
        assert len(files) == 1 and files[0]["name"] == f"confusion-{run.run_id}.png"
        # files_upload_v2 = three calls, in order.
        names = [c.method for c in bot.standin.calls() if c.method in
                 ("files.getUploadURLExternal", "upload", "files.completeUploadExternal")]
        assert names == ["files.getUploadURLExternal", "upload", "files.completeUploadExternal"]
        complete = bot.standin.calls("files.completeUploadExternal")[0].args
        assert complete["channel_id"] == ch and complete["thread_ts"] == ts
        (uploaded,) = bot.standin.uploaded().values()
        assert uploaded["bytes"] == png and open(uploaded["path"], "rb").read() == png
        # Still one top-level message for the run.
        assert [m.ts for m in bot.standin.messages(ch)] == [ts]
        # Every post and update of it carried its ctbot_run event, saying what it showed.
        sent = [c.args for c in bot.standin.calls() if c.method in ("chat.postMessage", "chat.update")
                and (c.args.get("ts") == ts or not c.args.get("thread_ts")) and c.status == 200]
        assert len(sent) >= 3 and all(a["metadata"]["event_type"] == "ctbot_run" for a in sent)
        payloads = [a["metadata"]["event_payload"] for a in sent]
        assert {p["run_id"] for p in payloads} == {run.run_id} and payloads[0]["status"] == "running"
        assert payloads[0]["requested_by"] == ALICE and "top1" not in payloads[0] and "version" not in payloads[0]
        assert {k: payloads[-1][k] for k in ("status", "top1", "decision", "version")} == \
            {"status": "succeeded", "top1": 0.9812, "decision": "deploy", "version": 4}
        assert bot.standin.message(ch, ts).metadata == sent[-1]["metadata"]
        history = bot.client.conversations_history(channel=ch, include_all_metadata=True)["messages"]
        assert next(m for m in history if m["ts"] == ts)["metadata"]["event_payload"]["status"] == "succeeded"
        transcript = bot.standin.transcript()
        assert f"Run {run.run_id}: 🚀 deployed as v4" in transcript and "[Roll back](confirm)" in transcript
        assert f"[file: Confusion matrix, run {run.run_id}] {uploaded['path']}" in transcript
    finally:
        bot.close()


class Clock:
    def __init__(self):
        self.t = time.time()

    def __call__(self):
        return self.t


@pytest.fixture
def world(tmp_path, redis_url, standin):
    """The outbox and its Slack deliverer, on real Redis, a real store and the stand-in."""
    from bot.notifier import SlackDelivery
    from bot.slack_client import slack_client
    from core.outbox import Outbox, OutboxNotifier
    from core.state import StateStore
    from steps.storage import open_store

    def make(min_update_seconds=0.0):
        clock = Clock()
        state = StateStore.from_url(redis_url)
        store = open_store(str(tmp_path / "store"))
        outbox = Outbox(state, clock)
        client = slack_client(BOT_TOKEN, standin.api_url)   # as wiring builds it: 429s waited out
        delivery = SlackDelivery(client, "#ct", state, store, outbox, min_update_seconds=min_update_seconds)
        return type("World", (), dict(clock=clock, state=state, store=store, outbox=outbox,
                                      delivery=delivery, notifier=OutboxNotifier(outbox, delivery)))
    return make


def started(w, **kw):
    run = a_run(**kw)
    w.state.create_run(run)
    w.notifier.run_started(run)
    return w.state.get_run(run.run_id)


def finish(w, run, state="succeeded"):
    w.notifier.run_finished(run)
    run = w.state.update_run(run.run_id, state=state, finished_at=time.time())
    w.notifier.run_progress(run)
    return run


def test_progress_is_throttled_deferred_and_sent_with_the_latest_state(world, standin):
    w = world(min_update_seconds=3600)
    run = started(w)
    assert len(standin.calls("chat.postMessage")) == 1
    for epoch in range(1, 6):
        write_step(w.store, run.run_id, "train", "running", epoch=epoch, epochs=5)
        w.notifier.run_progress(run)
    assert standin.calls("chat.update") == []                  # throttled while active...
    assert w.outbox.pending_runs() == [run.run_id]              # ...but deferred, not dropped
    w.state.r.delete(w.state.k("slack", "throttle", run.run_id))   # the throttle window passes
    w.clock.t += 3600
    w.delivery.drain()
    (update,) = standin.calls("chat.update")
    assert "epoch 5/5" in message_text(update.args)             # the latest state, once
    assert w.outbox.pending_runs() == []


def test_the_throttle_is_shared_by_replicas(world, standin):
    a, b = world(min_update_seconds=3600), world(min_update_seconds=3600)
    run = started(a)
    a.state.r.delete(a.state.k("slack", "throttle", run.run_id))   # the post's own window has passed
    write_step(a.store, run.run_id, "ingest", "done", 0.1)
    a.notifier.run_progress(run)     # an update goes out...
    b.notifier.run_progress(run)     # ...and the other replica's waits its turn
    assert len(standin.calls("chat.update")) == 1


def test_unthrottled_progress_updates_each_epoch(world, standin):
    w = world(min_update_seconds=0)
    run = started(w)
    for epoch in (1, 2, 3):
        write_step(w.store, run.run_id, "train", "running", epoch=epoch, epochs=3)
        w.notifier.run_progress(run)
    texts = [message_text(c.args) for c in standin.calls("chat.update")]
    assert len(texts) == 3
    assert [f"epoch {e}/3" in t for e, t in zip((1, 2, 3), texts, strict=True)] == [True] * 3


def test_rate_limited_update_is_retried_after_retry_after(world, standin):
    w = world()
    run = started(w)
    standin.fail_next("chat.update", status=429, retry_after=1)
    write_step(w.store, run.run_id, "ingest", "done", 0.1)
    t0 = time.monotonic()
    w.notifier.run_progress(run)
    waited = time.monotonic() - t0
    assert [c.status for c in standin.calls("chat.update")] == [429, 200]
    assert waited >= 1.0                                           # it honoured Retry-After
    assert "✅ *ingest*" in message_text(standin.message("ct", run.slack_ts).to_payload())


def test_a_500_on_the_final_report_is_retried_until_delivered(world, standin):
    w = world()
    run = started(w)
    w.store.put_json(layout.report_key(run.run_id), report(run.run_id))
    w.store.put_bytes(layout.confusion_png_key(run.run_id), png_bytes())
    standin.fail_next("chat.update", status=500, times=2)
    run = finish(w, run)
    assert w.outbox.pending_runs() == [run.run_id]       # owed, not forgotten
    for _ in range(3):
        w.clock.t += 300
        w.delivery.drain()
    msg = standin.message("ct", run.slack_ts)
    assert "deployed as v4" in message_text(msg.to_payload())
    assert len(msg.replies) == 2                          # details and the image, once each
    assert w.outbox.pending_runs() == [] and w.outbox.failures() == []


def test_a_lost_reply_to_the_first_post_does_not_make_a_second_message(world, standin):
    w = world()
    standin.fail_next("chat.postMessage", status=500, after_effect=True)   # posted; the reply is lost
    run = started(w)
    assert not run.slack_ts and w.outbox.pending_runs() == [run.run_id]
    w.clock.t += 60
    w.delivery.drain()
    (msg,) = standin.messages("ct")
    assert w.state.get_run(run.run_id).slack_ts == msg.ts
    assert [c.status for c in standin.calls("chat.postMessage")] == [500]   # found, not posted again


def test_a_second_poster_waits_for_the_first(world, standin):
    w = world()
    run = a_run()
    w.state.create_run(run)
    w.state.r.set(w.state.k("slack", "post", run.run_id), "1", ex=60)   # another replica is posting
    w.notifier.run_started(run)
    assert standin.calls("chat.postMessage") == [] and w.outbox.pending_runs() == [run.run_id]


def test_lost_message_is_posted_again(world, standin):
    w = world()
    run = a_run(slack_channel=standin.channel_id("ct"), slack_ts="1700000000.000001")   # never existed
    w.state.create_run(run)
    w.store.put_json(layout.report_key(run.run_id), report(run.run_id))
    finish(w, run)
    assert [c.error for c in standin.calls("chat.update")] == ["message_not_found"]
    (msg,) = standin.messages("ct")
    assert "deployed as v4" in message_text(msg.to_payload()) and len(msg.replies) == 1


def test_undeliverable_is_given_up_only_after_a_day_and_surfaced(world, standin):
    w = world()
    standin.outage(status=500)
    w.notifier.say("hello")
    tries = []
    for _ in range(30):          # 30 drains 5 minutes apart: 2.5 h, far past the old 8-try budget
        w.clock.t += 300
        w.delivery.drain()
        tries.append(len([c for c in standin.calls() if c.status == 500]))
    assert w.outbox.failures() == [] and w.outbox.pending_count() == 1    # still owed, still tried
    assert tries == list(range(2, 32))                                    # a try every 5 minutes at most
    w.clock.t += 24 * 3600                                                # past outbox.give_up_hours
    w.delivery.drain()
    assert standin.messages("ct") == [] and w.outbox.pending_count() == 0
    (failure,) = w.outbox.failures()
    assert "500" in failure["error"] and failure["detail"] == "hello"
    from bot import blocks
    shown = message_text(blocks.status_message({"undelivered": w.outbox.failures(3)}))   # /ct status shows it
    assert "Not delivered to Slack" in shown and failure["what"] in shown and "hello" in shown


def test_an_outage_pauses_every_delivery_and_then_sends_all_owed_in_order(world, standin):
    w = world()
    first = started(w)                               # posted before Slack went away
    standin.outage(status=503)
    w.notifier.say("one")
    second = started(w, run_id="r-20261122-0913-cd34")
    w.notifier.say("two")
    w.store.put_json(layout.report_key(first.run_id), report(first.run_id))
    first = finish(w, first)
    assert w.outbox.pending_count() == 4 and w.outbox.paused()
    for _ in range(12):                              # an hour of trying: one probe per pause, not one per message
        w.clock.t += 300
        w.delivery.drain()
    down = [c for c in standin.calls() if c.status == 503]
    assert len(down) == 13 and w.outbox.failures() == []
    standin.end_outage()
    w.clock.t += 300
    w.delivery.drain()
    assert w.outbox.pending_count() == 0 and not w.outbox.paused()
    posted = standin.messages("ct")                  # in the order owed, each once
    assert len(posted) == 4 and posted[0].ts == first.slack_ts
    assert posted[1].text == "one" and second.run_id in message_text(posted[2].to_payload())
    assert posted[3].text == "two"
    assert "deployed as v4" in message_text(standin.message("ct", first.slack_ts).to_payload())


def test_new_data_alert_and_say_once_each(world, standin):
    from core.types import NewData
    w = world()
    found = NewData(keys=["data/a.npz"], total_bytes=10, fingerprint="sha256:1")
    w.notifier.new_data(found, "alert-9")
    w.notifier.new_data(found, "alert-9")          # the same alert again: one message
    w.notifier.say("<@U0BOB0001> paused the weekly retrain.")
    w.delivery.drain()
    alert, line = standin.messages("ct")
    assert buttons(alert.blocks)[ids.RETRAIN_NEW_DATA]["value"] == "alert-9"
    assert line.text == "<@U0BOB0001> paused the weekly retrain."
    assert "@bob paused the weekly retrain." in standin.transcript()


def test_a_deferred_run_does_not_reset_the_outage_backoff(world, standin):
    w = world()
    run = a_run()
    w.state.create_run(run)
    w.notifier.run_finished(run)          # owed first, but held until its record says final
    standin.outage(status=500)
    w.notifier.say("x")
    w.clock.t += 300
    w.delivery.drain()                    # the run is deferred again, "x" fails again
    assert w.outbox.slack_outage()["failures"] == "2" and w.outbox.paused()
