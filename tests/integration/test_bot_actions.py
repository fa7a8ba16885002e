"""Buttons on alerts, run messages and reports, clicked over signed HTTP."""
from __future__ import annotations

import json
import urllib.parse

from bot import ids
from core.types import NewData
from steps import deploy
from tests.recording import finish_run
from tests.slack_helpers import ALICE, BOB, buttons, message_text, post


def latest(bot, ts):
    return bot.standin.message(bot.channel, ts)


def wait_update(bot, ts, count=1):
    return bot.standin.wait_for("chat.update", count, where=lambda a: a.get("ts") == ts)


def post_alert(bot, alert_id="alert-1") -> str:
    found = NewData(keys=["data/new-0.npz", "data/new-1.npz"], total_bytes=4096, fingerprint="sha256:feed")
    bot.notifier.new_data(found, alert_id)
    return bot.standin.messages(bot.channel)[-1].ts


def start_run(bot, user=ALICE) -> str:
    run = bot.service.request_training("test run", {"epochs": 2}, user)
    return run.run_id


def finished_report(bot, run_id, **kw) -> str:
    """Finish ``run_id`` as a pipeline would, let the service notice; returns the message ts."""
    finish_run(bot.store, bot.runner, run_id, **kw)
    bot.service.refresh(run_id)
    return bot.service.get_run(run_id).slack_ts


def test_retrain_now_starts_one_run_even_when_clicked_twice(bot):
    ts = post_alert(bot, "alert-42")
    b = buttons(latest(bot, ts).blocks)
    assert set(b) == {ids.REFRESH_NEW_DATA, ids.RETRAIN_NEW_DATA, ids.DISMISS_ALERT}
    # Two people click before the message changes (both payloads carry the buttons).
    p1 = bot.standin.action_payload(bot.channel, ts, ids.RETRAIN_NEW_DATA, user=ALICE)
    p2 = bot.standin.action_payload(bot.channel, ts, ids.RETRAIN_NEW_DATA, user=BOB)
    for p in (p1, p2):
        status, raw = post(bot.url, "payload=" + urllib.parse.quote(json.dumps(p)))
        assert status == 200 and raw == ""            # empty ack: nothing to say privately
    wait_update(bot, ts, 1)
    rids = [p["response_url"].rsplit("/", 1)[1] for p in (p1, p2)]
    bot.standin.wait_for("response", where=lambda a: a["rid"] in rids)
    told = [message_text(r) for rid in rids for r in bot.standin.responses(rid)]
    assert len(told) == 1 and "Already done:" in told[0]      # the later clicker learns why
    assert len(bot.runner.submits) == 1
    run = bot.service.get_run(bot.runner.submits[0]["run_id"])
    assert run.trigger == "new_data" and "alert-42" in run.reason
    msg = latest(bot, ts)
    assert buttons(msg.blocks) == {}                  # no second click possible
    assert f"started run `{run.run_id}` from this alert" in message_text(msg.to_payload())


def test_refresh_gallery_starts_a_refresh_run_and_the_alert_says_what_each_mode_takes(bot):
    # a finished full run, published: production exists, and full has a duration to show
    run_id = start_run(bot)
    finished_report(bot, run_id)
    deploy.publish(bot.store, bot.settings.model_name, f"runs/{run_id}/candidate/", run_id=run_id, by=ALICE)
    full = bot.service.get_run(run_id)
    took = round(full.finished_at - full.started_at)
    ts = post_alert(bot, "alert-51")
    b = buttons(latest(bot, ts).blocks)
    assert b[ids.REFRESH_NEW_DATA]["text"]["text"] == "Refresh gallery (no run yet)"
    assert b[ids.RETRAIN_NEW_DATA]["text"]["text"] == f"Retrain (~{took}s)"
    assert "median of the last runs of that mode" in message_text(latest(bot, ts).to_payload())
    bot.click(ts, ids.REFRESH_NEW_DATA, user=BOB)
    wait_update(bot, ts)
    run = bot.service.get_run(bot.runner.submits[-1]["run_id"])
    assert run.params["mode"] == "refresh" and run.trigger == "new_data" and "refresh gallery" in run.reason
    assert bot.runner.submits[-1]["params"]["mode"] == "refresh"
    assert f"started run `{run.run_id}` from this alert (refresh gallery)" in message_text(latest(bot, ts).to_payload())
    # its report says what was reused and the time against the last full run
    finish_run(bot.store, bot.runner, run.run_id, version=2)
    bot.store.put_json(f"runs/{run.run_id}/candidate/lineage.json", {
        "mode": "refresh", "weights_from": 1, "added_images": 400,
        "added_objects": ["s3://b/data/new-0.npz", "s3://b/data/new-1.npz"]})
    from pipelines.report import finalize_run
    finalize_run(bot.store, run.run_id, model=bot.settings.model_name)
    bot.service.refresh(run.run_id)
    final = bot.service.get_run(run.run_id)
    bot.standin.wait_for("chat.update", where=lambda a: a.get("ts") == final.slack_ts and "took" in json.dumps(a))
    text = message_text(bot.standin.message(bot.channel, final.slack_ts).to_payload())
    assert "mode *refresh* · weights from v1 · +400 gallery images from 2 object(s): `new-0.npz`, `new-1.npz`" in text
    assert f"less than the last full run `{run_id}`" in text


def test_dismiss_updates_the_alert_and_is_audited(bot):
    ts = post_alert(bot, "alert-7")
    assert bot.click(ts, ids.DISMISS_ALERT, user=BOB).status == 200
    wait_update(bot, ts)
    text = message_text(latest(bot, ts).to_payload())
    assert f"Dismissed by <@{BOB}>" in text and buttons(latest(bot, ts).blocks) == {}
    entry = bot.state.read_audit(1)[0]
    assert entry["action"] == "alert_dismissed" and entry["who"] == BOB and entry["alert_id"] == "alert-7"
    assert bot.runner.submits == []


def test_promote_anyway_on_a_held_report(bot):
    run_id = start_run(bot)
    ts = finished_report(bot, run_id, decision="hold", version=None, top1=0.965)
    b = buttons(latest(bot, ts).blocks)
    assert b[ids.PROMOTE]["confirm"]["title"]["text"] == "Promote a held model?"
    bot.click(ts, ids.PROMOTE, user=BOB)
    wait_update(bot, ts, 2)                           # the final report, then the promotion
    msg = latest(bot, ts)
    assert f"<@{BOB}> promoted this run to production as *v1*" in message_text(msg.to_payload())
    assert ids.PROMOTE not in buttons(msg.blocks) and ids.VIEW_RUN in buttons(msg.blocks)
    assert deploy.read_alias(bot.store, bot.settings.model_name)["version"] == 1
    assert any(e["action"] == "promote" and e["who"] == BOB for e in bot.state.read_audit(5))


def test_promote_refused_goes_only_to_the_clicker(bot):
    run_id = start_run(bot)
    ts = finished_report(bot, run_id, decision="hold", version=None, candidate=False)
    reply = bot.click(ts, ids.PROMOTE)
    bot.standin.wait_for("response", where=lambda a: a["rid"] == reply.rid)
    post_ = bot.standin.responses(reply.rid)[0]
    assert post_["response_type"] == "ephemeral" and post_["replace_original"] is False
    assert "has no model package" in message_text(post_)
    assert ids.PROMOTE in buttons(latest(bot, ts).blocks)          # message untouched


def test_roll_back_button_and_a_stale_one(bot):
    model = bot.settings.model_name
    first = start_run(bot)
    finished_report(bot, first, decision="deploy", version=1)
    deploy.publish(bot.store, model, f"runs/{first}/candidate/", run_id=first, by=ALICE)
    second = start_run(bot)
    ts2 = finished_report(bot, second, decision="deploy", version=2)
    deploy.publish(bot.store, model, f"runs/{second}/candidate/", run_id=second, by=ALICE)
    rb = buttons(latest(bot, ts2).blocks)[ids.ROLLBACK]
    assert rb["value"] == "2" and rb["style"] == "danger" and rb["confirm"]["confirm"]["text"] == "Roll back"

    bot.click(ts2, ids.ROLLBACK, user=BOB)
    wait_update(bot, ts2, 2)
    assert deploy.read_alias(bot.store, model)["version"] == 1
    assert "rolled production back from v2 to v1" in message_text(latest(bot, ts2).to_payload())

    # The first run's report still offers "Roll back" from v1, but production is v1 now: a
    # second rollback from an old message must not undo something else.
    ts1 = bot.service.get_run(first).slack_ts
    deploy.publish(bot.store, model, f"runs/{second}/candidate/", run_id=second, by=ALICE)   # v3
    reply = bot.click(ts1, ids.ROLLBACK)
    bot.standin.wait_for("response", where=lambda a: a["rid"] == reply.rid)
    assert "Production is now v3, not v1; nothing rolled back" in message_text(bot.standin.responses(reply.rid)[0])
    assert deploy.read_alias(bot.store, model)["version"] == 3


def test_view_run_answers_privately_with_details(bot):
    run_id = start_run(bot)
    ts = bot.service.get_run(run_id).slack_ts
    reply = bot.click(ts, ids.VIEW_RUN, user=BOB)
    bot.standin.wait_for("response", where=lambda a: a["rid"] == reply.rid)
    post_ = bot.standin.responses(reply.rid)[0]
    assert post_["response_type"] == "ephemeral" and post_["replace_original"] is False
    text = message_text(post_)
    assert f"Run {run_id}" in text and "running" in text and "`epochs=2`" in text
    assert bot.standin.ephemerals(BOB)


def test_retrain_reuses_the_runs_parameters(bot):
    run_id = start_run(bot)
    ts = finished_report(bot, run_id, decision="deploy", version=1)
    reply = bot.click(ts, ids.RETRAIN, user=BOB)
    bot.standin.wait_for("response", where=lambda a: a["rid"] == reply.rid)
    assert len(bot.runner.submits) == 2
    again = bot.runner.submits[1]
    assert again["params"]["epochs"] == 2 and again["requested_by"] == BOB
    assert f"with the parameters of `{run_id}`" in message_text(bot.standin.responses(reply.rid)[0])


def test_cancel_button_on_a_running_message(bot):
    run_id = start_run(bot)
    ts = bot.service.get_run(run_id).slack_ts
    assert buttons(latest(bot, ts).blocks)[ids.CANCEL_RUN]["confirm"]
    bot.click(ts, ids.CANCEL_RUN, user=BOB)
    wait_update(bot, ts)
    assert bot.service.get_run(run_id).state == "canceled" and bot.runner.cancels == [run_id]
    msg = latest(bot, ts)
    assert ids.CANCEL_RUN not in buttons(msg.blocks) and "canceled" in message_text(msg.to_payload())
