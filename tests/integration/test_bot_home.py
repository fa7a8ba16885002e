"""The App Home tab that acts, over signed HTTP against the Slack stand-in: what an
approver and a user on no list see, each button doing (or refusing) exactly what the
channel's does, *Roll back to this* moving the alias once on a double click, the form
from *Train…*, `/ct history`, and every viewer's Home republished after a change."""
from __future__ import annotations

import json
import urllib.parse

import pytest

from bot import ids
from bot.blocks.forms import field_block
from bot.homes import HomeTab
from core.config import AccessSection
from steps import deploy, layout
from tests.recording import finish_run
from tests.slack_helpers import ALICE, BOB, message_text, post, put_training_data, start_bot, write_step

MODEL = "mnist-arcface"


@pytest.fixture
def bot(tmp_path, redis_url):
    """Alice is on every list, Bob on none."""
    b = start_bot(tmp_path, redis_url, access=AccessSection(train=[ALICE], deploy=[ALICE], rollback=[ALICE],
                                                            cancel=[ALICE], schedule=[ALICE], approve=[ALICE]))
    b.settings.deploy.require_approval = True
    put_training_data(b.store)
    yield b
    b.close()


def published_run(bot, version: int) -> str:
    run = bot.service.request_training("t", {}, ALICE)
    finish_run(bot.store, bot.runner, run.run_id, decision="hold", top1=0.98 + version / 1000)
    bot.service.refresh(run.run_id)
    deploy.publish(bot.store, MODEL, layout.candidate_prefix(run.run_id), run_id=run.run_id, by=ALICE,
                   metrics={"top1": 0.98 + version / 1000})
    return run.run_id


def awaiting_approval(bot, by=BOB) -> str:
    run = bot.service.request_training("t", {}, by)
    report = finish_run(bot.store, bot.runner, run.run_id, decision="deploy", top1=0.995, awaiting_approval=True)
    prod = deploy.read_alias(bot.store, MODEL)     # what evaluate compared against: the approval's expectation
    report["production"] = {"version": prod["version"], "top1": prod["top1"]} if prod else None
    bot.store.put_json(layout.report_key(run.run_id), report)
    assert bot.service.refresh(run.run_id).approval == "pending"
    return run.run_id


@pytest.fixture
def world(bot):
    """v1 then v2 in production, a run waiting for approval, and an active run."""
    first, second = published_run(bot, 1), published_run(bot, 2)
    waiting = awaiting_approval(bot)
    active = bot.service.request_training("t", {"epochs": 2}, ALICE).run_id
    write_step(bot.store, active, "ingest", "done", 0.3)
    write_step(bot.store, active, "train", "running", epoch=1, epochs=2)
    return {"first": first, "second": second, "waiting": waiting, "active": active}


def home(bot, user) -> dict:
    HomeTab(bot.service, bot.client, bot.settings).publish(user)
    return bot.standin.home_views[user]


def home_buttons(view) -> dict:
    """(action_id, value) -> button, for every button on the Home (actions and accessories)."""
    out = {}
    for b in view["blocks"]:
        for e in (b.get("elements") or []) + ([b["accessory"]] if b.get("accessory") else []):
            if e.get("type") == "button":
                out[(e["action_id"], e.get("value"))] = e
    return out


def published(bot, user) -> int:
    return len([c for c in bot.standin.calls("views.publish") if c.args["user_id"] == user and not c.error])


def click_home(bot, user, action_id, value=None, *, payload_of=None) -> str:
    """Click a button on ``user``'s Home (or on ``payload_of``'s, as if the view were
    stale); returns the notice the click left on the clicker's Home."""
    before = published(bot, user)
    if payload_of is None:
        out = bot.standin.click_view(bot.url, user, action_id, value=value)
        assert out["status"] == 200
    else:
        payload = bot.standin.view_action_payload(payload_of, action_id, value=value)
        payload["user"] = {"id": user, "team_id": "T0CTBOT00"}
        assert post(bot.url, "payload=" + urllib.parse.quote(json.dumps(payload)))[0] == 200
    bot.standin.wait_for("views.publish", before + 1, where=lambda a: a["user_id"] == user)
    view = bot.standin.home_views[user]
    return message_text({"blocks": view["blocks"][1:2]}).strip()


def test_an_approver_and_a_user_on_no_list_see_different_buttons(bot, world):
    alice, bob = home(bot, ALICE), home(bot, BOB)
    text = message_text(alice)
    assert "*v2* · :large_green_circle: *production*" in text and f"run `{world['first']}`" in text
    assert f"*Active run* `{world['active']}`" in text and "now *train* epoch 1/2" in text
    assert f"*Waiting for approval*: run `{world['waiting']}`" in text
    assert set(home_buttons(alice)) == {
        (ids.HOME_TRAIN, "form"), (ids.CANCEL_RUN, world["active"]), (ids.APPROVE_DEPLOY, world["waiting"]),
        (ids.REJECT_DEPLOY, world["waiting"]), (ids.HOME_ROLLBACK_TO, "1:2"), (ids.HOME_PAUSE, "pause")}
    assert home_buttons(bob) == {}
    assert message_text(bob).count("*v1*") == 1                  # Bob reads the same Home, without buttons
    assert len(alice["blocks"]) <= 100


def test_roll_back_to_this_moves_the_alias_once_on_a_double_click(bot, world):
    home(bot, ALICE)
    view_id = bot.standin.home_views[ALICE]["id"]
    first = bot.standin.view_action_payload(ALICE, ids.HOME_ROLLBACK_TO, value="1:2")
    second = bot.standin.view_action_payload(ALICE, ids.HOME_ROLLBACK_TO, value="1:2", view_id=view_id)
    for p in (first, second):
        assert post(bot.url, "payload=" + urllib.parse.quote(json.dumps(p)))[0] == 200
    bot.standin.wait_for("views.publish", 3, where=lambda a: a["user_id"] == ALICE)
    history = deploy.read_alias(bot.store, MODEL)["history"]
    assert [h["version"] for h in history] == [1, 2, 1] and history[-1]["by"] == ALICE
    assert [e["action"] for e in bot.state.read_audit(50)].count("rollback") == 1
    notice = message_text({"blocks": bot.standin.home_views[ALICE]["blocks"][1:2]})
    assert "rolled production back from v2 to v1" in notice or "Already done" in notice


def test_a_stale_roll_back_to_this_changes_nothing(bot, world):
    home(bot, ALICE)
    deploy.publish(bot.store, MODEL, layout.candidate_prefix(world["second"]), run_id=world["second"], by=ALICE)  # v3
    notice = click_home(bot, ALICE, ids.HOME_ROLLBACK_TO, "1:2")
    assert "Production is now v3, not v2; nothing rolled back" in notice
    assert deploy.read_alias(bot.store, MODEL)["version"] == 3


def test_refused_on_the_home_as_in_the_channel(bot, world):
    """Bob has no buttons; a stale view that still shows them gets the channel's refusal."""
    home(bot, ALICE)
    home(bot, BOB)
    channel = bot.click(bot.service.get_run(world["waiting"]).slack_ts, ids.APPROVE_DEPLOY, user=BOB)
    bot.standin.wait_for("response", where=lambda a: a["rid"] == channel.rid)
    in_channel = message_text(bot.standin.responses(channel.rid)[-1])
    on_home = click_home(bot, BOB, ids.APPROVE_DEPLOY, world["waiting"], payload_of=ALICE)
    assert "You may not approve deploys or read the audit: only <@U0ALICE01> may." in in_channel
    assert "You may not approve deploys or read the audit: only <@U0ALICE01> may." in on_home
    assert click_home(bot, BOB, ids.HOME_ROLLBACK_TO, "1:2", payload_of=ALICE).startswith(
        ":warning: You may not roll production back")
    assert deploy.read_alias(bot.store, MODEL)["version"] == 2
    assert bot.service.get_run(world["waiting"]).approval == "pending"


def test_approve_cancel_and_pause_from_the_home(bot, world):
    home(bot, ALICE)
    assert "You approved it: v3 is production." in click_home(bot, ALICE, ids.APPROVE_DEPLOY, world["waiting"])
    assert deploy.read_alias(bot.store, MODEL)["version"] == 3
    assert f"You canceled run {world['active']}." in click_home(bot, ALICE, ids.CANCEL_RUN, world["active"])
    assert bot.service.get_run(world["active"]).state == "canceled"
    assert "You paused the weekly retrain." in click_home(bot, ALICE, ids.HOME_PAUSE, "pause")
    assert bot.state.schedule_paused()
    view = bot.standin.home_views[ALICE]
    assert (ids.HOME_RESUME, "resume") in home_buttons(view) and (ids.CANCEL_RUN, world["active"]) not in \
        home_buttons(view)
    assert "You resumed the weekly retrain." in click_home(bot, ALICE, ids.HOME_RESUME, "resume")
    assert not bot.state.schedule_paused()


def test_train_opens_the_form_and_its_run_is_told_on_the_home(bot):
    home(bot, ALICE)
    out = bot.standin.click_view(bot.url, ALICE, ids.HOME_TRAIN, value="form")
    (call,) = bot.standin.wait_for("views.open", where=lambda a: a["trigger_id"] == out["trigger_id"])
    (modal,) = bot.standin.modals(ALICE)
    assert modal["view"]["callback_id"] == ids.TRAIN_FORM
    before = published(bot, ALICE)
    assert bot.standin.submit_view(bot.url, modal["id"], {field_block("epochs"): "2"})["errors"] == {}
    bot.standin.wait_for("views.publish", before + 1, where=lambda a: a["user_id"] == ALICE)
    (submit,) = bot.runner.submits
    assert submit["params"]["epochs"] == 2
    assert f"Started run `{submit['run_id']}`" in message_text({"blocks": bot.standin.home_views[ALICE]["blocks"]})


def test_every_viewers_home_is_republished_after_a_change_within_the_limit(bot, world):
    tab = HomeTab(bot.service, bot.client, bot.settings)
    home(bot, ALICE)
    home(bot, BOB)
    bot.state.r.delete(bot.state.k("home", "stale"))
    assert tab.flush() == 0                                    # nothing changed
    write_step(bot.store, world["active"], "train", "running", epoch=2, epochs=2)
    bot.service.refresh(world["active"])                       # progress: the notifier marks Homes stale
    assert tab.flush() == 2
    assert "epoch 2/2" in message_text(bot.standin.home_views[BOB])
    bot.service.set_schedule_paused(True, by=ALICE)
    assert tab.flush() == 0                                    # within home_refresh_seconds: later
    bot.state.r.delete(bot.state.k("home", "flushing"))        # the interval has passed
    assert tab.flush() == 2 and "*paused*" in message_text(bot.standin.home_views[ALICE])


def test_history_command(bot, world):
    reply = bot.slash("history 5", user=BOB)
    text = message_text(bot.responses(reply)[-1])
    assert "Model history: the last 2 version(s)" in text
    assert "*v2* · :large_green_circle: *production*" in text and f"run `{world['second']}`" in text
    assert "deployed by <@U0ALICE01>" in text


def test_chromium_renders_the_home_tab(bot, world, tmp_path):
    from PIL import Image, ImageStat

    from tests.integration.test_slack_page import browse
    home(bot, ALICE)
    click_home(bot, ALICE, ids.HOME_PAUSE, "pause")
    page = bot.standin.save_view_html(tmp_path / "site" / "home.html", home_of=ALICE)
    shot = tmp_path / "site" / "home.png"
    browse(page, tmp_path, f"--screenshot={shot}")
    dom = browse(page, tmp_path, "--dump-dom").stdout
    assert 'class="tab active">Home<' in dom and "as @alice sees it" in dom
    for label in ("Train…", "Cancel", "Approve", "Reject", "Roll back to this", "Resume"):
        assert f">{label}<" in dom, label
    assert "You paused the weekly retrain." in dom and "Model history" in dom
    img = Image.open(shot).convert("RGB")
    assert max(ImageStat.Stat(img).stddev) > 20
