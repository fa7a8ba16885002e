"""SlackNotifier against the Slack stand-in: one message per run updated in place, the
report, details and confusion matrix in its thread, throttling and HTTP 429."""
from __future__ import annotations

import time

import pytest
from slack_sdk import WebClient

from bot import ids
from bot.notifier import SlackNotifier
from core.config import Settings
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


def notifier_for(standin, **kw) -> SlackNotifier:
    client = WebClient(token=BOT_TOKEN, base_url=standin.api_url)
    return SlackNotifier(client, "#ct", Settings(), **kw)


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
        transcript = bot.standin.transcript()
        assert f"Run {run.run_id}: 🚀 deployed as v4" in transcript and "[Roll back](confirm)" in transcript
        assert f"[file: Confusion matrix, run {run.run_id}] {uploaded['path']}" in transcript
    finally:
        bot.close()


def test_progress_is_throttled_but_the_end_always_shows(standin):
    n = notifier_for(standin, min_update_seconds=3600)
    run = a_run()
    ch, ts = n.run_started(run)
    run.slack_channel, run.slack_ts = ch, ts
    for epoch in range(1, 6):
        n.run_progress(run, {"train": {"state": "running", "summary": {"epoch": epoch, "epochs": 5}}})
    assert standin.calls("chat.update") == []                   # throttled while active
    run.state = "canceled"
    n.run_progress(run, {"train": {"state": "failed"}})        # an ended run always shows
    assert len(standin.calls("chat.update")) == 1
    n.run_finished(run, {"run_id": run.run_id, "status": "canceled"}, None)
    assert len(standin.calls("chat.update")) == 2
    assert standin.calls("files.getUploadURLExternal") == []     # no image, no upload


def test_unthrottled_progress_updates_each_time(standin):
    n = notifier_for(standin, min_update_seconds=0)
    run = a_run()
    run.slack_channel, run.slack_ts = n.run_started(run)
    for epoch in (1, 2, 3):
        n.run_progress(run, {"train": {"state": "running", "summary": {"epoch": epoch, "epochs": 3}}})
    texts = [message_text(c.args) for c in standin.calls("chat.update")]
    assert len(texts) == 3
    assert [f"epoch {e}/3" in t for e, t in zip((1, 2, 3), texts, strict=True)] == [True] * 3


def test_rate_limited_update_is_retried_after_retry_after(standin):
    n = notifier_for(standin, min_update_seconds=0)
    run = a_run()
    run.slack_channel, run.slack_ts = n.run_started(run)
    standin.fail_next("chat.update", status=429, retry_after=1)
    t0 = time.monotonic()
    n.run_progress(run, {"ingest": {"state": "done"}})
    waited = time.monotonic() - t0
    calls = standin.calls("chat.update")
    assert [c.status for c in calls] == [429, 200]
    assert waited >= 1.0                                           # it honoured Retry-After
    assert "✅ *ingest*" in message_text(standin.message("ct", run.slack_ts).to_payload())


def test_lost_message_is_posted_again(standin):
    n = notifier_for(standin)
    run = a_run(slack_channel=standin.channel_id("ct"), slack_ts="1700000000.000001")   # never existed
    n.run_finished(run, report(run.run_id), None)
    assert [c.error for c in standin.calls("chat.update")] == ["message_not_found"]
    (msg,) = standin.messages("ct")
    assert "deployed as v4" in message_text(msg.to_payload()) and len(msg.replies) == 1


def test_new_data_alert_and_say(standin):
    from core.types import NewData
    n = notifier_for(standin)
    n.new_data(NewData(keys=["data/a.npz"], total_bytes=10, fingerprint="sha256:1"), "alert-9")
    n.say("<@U0BOB0001> paused the weekly retrain.")
    alert, line = standin.messages("ct")
    assert buttons(alert.blocks)[ids.RETRAIN_NEW_DATA]["value"] == "alert-9"
    assert line.text == "<@U0BOB0001> paused the weekly retrain."
    assert "@bob paused the weekly retrain." in standin.transcript()


def test_huge_report_is_fitted_not_rejected(standin):
    """Slack rejects > 50 blocks or long texts (the stand-in too): the notifier must fit them."""
    n = notifier_for(standin)
    run = a_run(reason="r" * 10000)
    rep = report(run.run_id, warnings=["w" * 1000] * 300, reason="because " * 3000)
    rep["metrics"]["per_class"] = {str(i): 0.9 for i in range(1000)}
    n.run_finished(run, rep, png_bytes())
    assert all(not c.error for c in standin.calls())
    (msg,) = standin.messages("ct")
    assert len(msg.replies) == 2                                  # details + the image
