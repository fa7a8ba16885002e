"""Who may act, over signed HTTP as Slack sends it: for every action an allowed user, a
user-group member, a refused user, a foreign workspace and a channel that is not allowed;
approvals (approve, reject, self-approval, stale, expiry, double click); the audit.
Refusals must change nothing: the registry, Redis and the Slack stand-in say so."""
from __future__ import annotations

import time

import pytest

from bot import ids
from steps import layout
from steps.deploy import publish, read_alias
from tests.helpers import wait_until as _wait
from tests.recording import finish_run
from tests.slack_helpers import ALICE, buttons, message_text, put_training_data, start_bot

ADMIN, OPS, MALLORY = "U0ADMIN01", "U0OPS0001", "U0MALLORY"
TEAM, FOREIGN = "T0CTBOT00", "T0EVIL000"
ACCESS = {"train": ["*"], "deploy": [ADMIN, "S0MLOPS"], "rollback": ["S0MLOPS"], "cancel": ["S0MLOPS"],
          "schedule": ["S0MLOPS"], "approve": ["S0MLOPS", ALICE], "team_id": TEAM}


@pytest.fixture
def bot(tmp_path, redis_url, s3_store):
    b = start_bot(tmp_path, redis_url, store=s3_store, usergroups={"S0MLOPS": [OPS]}, channels=("ct", "random"),
                  access=dict(ACCESS))
    b.settings.access.channels = [b.channel]
    try:
        yield b
    finally:
        b.close()


def answer(bot, reply) -> str:
    if "…" not in reply.text:
        return reply.text          # answered in the ack
    return message_text(bot.responses(reply)[-1])


def refused(bot, text: str) -> None:
    last = bot.state.read_audit(1)[0]
    assert last["action"] == "refused" and last["outcome"] == "refused", last
    assert "Nothing was changed" in text or "not available" in text or "workspace" in text, text


def held(bot, run_id_hint: str = "") -> str:
    put_training_data(bot.store)
    run = bot.service.request_training("t", {}, ALICE)
    finish_run(bot.store, bot.runner, run.run_id, decision="hold", top1=0.95)
    bot.service.refresh(run.run_id)
    return run.run_id


@pytest.mark.parametrize("who, allowed", [(ADMIN, True), (OPS, True), (MALLORY, False)])
def test_deploy_by_list_group_and_stranger(bot, who, allowed):
    run_id = held(bot)
    text = answer(bot, bot.slash(f"deploy {run_id}", user=who))
    if allowed:
        assert "Promoted run" in text and read_alias(bot.store, "mnist-arcface")["version"] == 1
    else:
        refused(bot, text)
        assert f"<@{ADMIN}>" in text and "<!subteam^S0MLOPS>" in text      # who may, with the group
        assert read_alias(bot.store, "mnist-arcface") is None


@pytest.mark.parametrize("command, action", [("rollback", "rollback"), ("schedule pause", "schedule"),
                                             ("audit", "approve")])
def test_other_commands_need_their_list(bot, command, action):
    publish(bot.store, "mnist-arcface", _package(bot, "a"), run_id="a", by="x")
    publish(bot.store, "mnist-arcface", _package(bot, "b"), run_id="b", by="x")
    before = (read_alias(bot.store, "mnist-arcface")["version"], bot.state.schedule_paused())
    text = answer(bot, bot.slash(command, user=MALLORY))
    refused(bot, text)
    assert (read_alias(bot.store, "mnist-arcface")["version"], bot.state.schedule_paused()) == before
    ok = answer(bot, bot.slash(command, user=OPS))                       # a member of S0MLOPS may
    last = bot.state.read_audit(1)[0]
    assert not ok.startswith("⚠️") and not (last["action"] == "refused" and last["who"] == OPS), ok


def test_cancel_by_the_requester_or_the_list_only(bot):
    put_training_data(bot.store)
    run = bot.service.request_training("t", {}, ALICE)
    refused(bot, answer(bot, bot.slash(f"cancel {run.run_id}", user=MALLORY)))
    assert bot.service.get_run(run.run_id).active and bot.runner.cancels == []
    assert "Canceled run" in answer(bot, bot.slash(f"cancel {run.run_id}", user=ALICE))   # their own run


def test_foreign_workspace_and_other_channel_are_refused_for_everything(bot):
    other = bot.standin.channel_id("random")
    for text in ("status", "train", "runs", "schedule pause"):
        refused(bot, bot.slash(text, user=OPS, team_id=FOREIGN).text)
        refused(bot, bot.slash(text, user=OPS, channel=other).text)
    assert bot.runner.submits == [] and not bot.state.schedule_paused()


def test_secure_by_default(tmp_path, redis_url, s3_store):
    b = start_bot(tmp_path, redis_url, store=s3_store, access={})   # nothing configured
    try:
        run_id = held(b)
        text = answer(b, b.slash(f"deploy {run_id}"))
        refused(b, text)
        assert "Nobody may deploy a model yet" in text and "CT_ACCESS__DEPLOY" in text
        assert "Started run" in answer(b, b.slash("train seed=0"))           # train defaults to everyone
    finally:
        b.close()


def _package(bot, run_id: str) -> str:
    prefix = layout.candidate_prefix(run_id)
    bot.store.put_bytes(prefix + "model.pt", run_id.encode())
    bot.store.put_json(prefix + layout.METRICS_JSON, {"top1": 0.98})
    return prefix


# ---- buttons ----------------------------------------------------------------------------

def told(bot, reply) -> str:
    rid = reply.response_url.rsplit("/", 1)[1]
    bot.standin.wait_for("response", where=lambda a: a["rid"] == rid)
    return message_text(bot.standin.responses(rid)[-1])


def test_promote_anyway_and_roll_back_buttons_check_the_clicker(bot):
    run_id = held(bot)
    ts = bot.service.get_run(run_id).slack_ts
    assert ids.PROMOTE in buttons(bot.standin.message(bot.channel, ts).blocks)
    refused(bot, told(bot, bot.click(ts, ids.PROMOTE, user=MALLORY)))
    refused(bot, told(bot, bot.click(ts, ids.PROMOTE, user=ADMIN, team_id=FOREIGN)))
    assert read_alias(bot.store, "mnist-arcface") is None and ids.PROMOTE in buttons(
        bot.standin.message(bot.channel, ts).blocks)                      # nothing changed
    bot.click(ts, ids.PROMOTE, user=OPS)                                   # a group member may
    assert _wait(lambda: read_alias(bot.store, "mnist-arcface"))["version"] == 1


# ---- approvals ----------------------------------------------------------------------------

@pytest.fixture
def approving(bot):
    bot.settings.deploy.require_approval = True
    return bot


def awaiting(bot) -> tuple[str, str]:
    put_training_data(bot.store)
    run = bot.service.request_training("t", {}, ALICE)
    finish_run(bot.store, bot.runner, run.run_id, decision="deploy", top1=0.99, awaiting_approval=True)
    run = bot.service.refresh(run.run_id)
    assert run.approval == "pending" and run.model_version is None
    msg = bot.standin.message(bot.channel, run.slack_ts)
    assert "awaiting approval" in message_text(msg.to_payload())
    assert {ids.APPROVE_DEPLOY, ids.REJECT_DEPLOY} <= set(buttons(msg.blocks))
    return run.run_id, run.slack_ts


def test_approve_publishes_and_stamps_the_report(approving):
    bot = approving
    run_id, ts = awaiting(bot)
    refused(bot, told(bot, bot.click(ts, ids.APPROVE_DEPLOY, user=MALLORY)))
    assert read_alias(bot.store, "mnist-arcface") is None
    bot.click(ts, ids.APPROVE_DEPLOY, user=OPS)
    alias = _wait(lambda: read_alias(bot.store, "mnist-arcface"))
    assert alias["version"] == 1 and alias["history"][-1]["approved_by"] == OPS
    assert alias["history"][-1]["by"] == ALICE                            # the requester, and the approver
    msg = _wait(lambda: (m := bot.standin.message(bot.channel, ts)) and "Approved by" in message_text(m.to_payload())
                and m)
    assert f"Approved by <@{OPS}>" in message_text(msg.to_payload()) and "v1* is production" in \
        message_text(msg.to_payload())
    assert ids.APPROVE_DEPLOY not in buttons(msg.blocks) and ids.REJECT_DEPLOY not in buttons(msg.blocks)


def test_reject_stamps_and_publishes_nothing(approving):
    bot = approving
    run_id, ts = awaiting(bot)
    bot.click(ts, ids.REJECT_DEPLOY, user=OPS)
    _wait(lambda: bot.service.get_run(run_id).approval == "rejected")
    msg = _wait(lambda: (m := bot.standin.message(bot.channel, ts)) and "Rejected by" in message_text(m.to_payload())
                and m)
    assert read_alias(bot.store, "mnist-arcface") is None and ids.APPROVE_DEPLOY not in buttons(msg.blocks)


def test_self_approval_is_refused_unless_allowed(approving):
    bot = approving
    run_id, ts = awaiting(bot)
    text = told(bot, bot.click(ts, ids.APPROVE_DEPLOY, user=ALICE))      # ALICE requested it
    assert "another approver must approve" in text
    assert read_alias(bot.store, "mnist-arcface") is None and bot.service.get_run(run_id).approval == "pending"
    bot.settings.deploy.allow_self_approval = True
    bot.click(ts, ids.APPROVE_DEPLOY, user=ALICE)
    assert _wait(lambda: read_alias(bot.store, "mnist-arcface"))["history"][-1]["approved_by"] == ALICE


def test_a_stale_approval_is_refused(approving):
    bot = approving
    run_id, ts = awaiting(bot)
    publish(bot.store, "mnist-arcface", _package(bot, "other"), run_id="other", by="pipeline")   # production moved
    text = told(bot, bot.click(ts, ids.APPROVE_DEPLOY, user=OPS))
    assert "production changed since this report" in text
    assert read_alias(bot.store, "mnist-arcface")["run_id"] == "other"


def test_a_pending_approval_expires(approving):
    bot = approving
    bot.settings.deploy.approval_timeout_hours = 1 / 3600       # one second
    run_id, ts = awaiting(bot)
    time.sleep(1.2)
    assert bot.service.expire_approvals() == [run_id]
    msg = _wait(lambda: (m := bot.standin.message(bot.channel, ts)) and "approval expired" in
                message_text(m.to_payload()) and m)
    assert ids.APPROVE_DEPLOY not in buttons(msg.blocks)
    assert bot.state.read_audit(1)[0]["action"] == "approval_expired"


def test_a_double_click_on_approve_gives_one_promotion(approving):
    bot = approving
    run_id, ts = awaiting(bot)
    bot.click(ts, ids.APPROVE_DEPLOY, user=OPS)
    bot.click(ts, ids.APPROVE_DEPLOY, user=OPS)
    _wait(lambda: read_alias(bot.store, "mnist-arcface"))
    time.sleep(1.5)
    assert [h["version"] for h in read_alias(bot.store, "mnist-arcface")["history"]] == [1]
    assert len([e for e in bot.state.read_audit(50) if e["action"] == "approved"]) == 1


def test_the_audit_shows_who_did_what_in_order(approving):
    bot = approving
    run_id, ts = awaiting(bot)
    told(bot, bot.click(ts, ids.APPROVE_DEPLOY, user=MALLORY))
    bot.click(ts, ids.APPROVE_DEPLOY, user=OPS)
    # The approval is audited just after the alias moves: wait for the entry, not the alias.
    _wait(lambda: any(e["action"] == "approved" for e in bot.state.read_audit(20)))
    text = answer(bot, bot.slash("audit 20", user=OPS))
    order = [text.find(s) for s in ("*train_requested*", "*approval_requested*", "*refused*", "*approved*")]
    assert all(i >= 0 for i in order) and order == sorted(order), text
    assert f"<@{MALLORY}>" in text and f"<#{bot.channel}>" in text      # who, and from where
    refused(bot, answer(bot, bot.slash("audit", user=MALLORY)))



@pytest.mark.parametrize("button", [ids.RETRAIN_NEW_DATA, ids.DISMISS_ALERT, ids.ROLLBACK, ids.CANCEL_RUN,
                                    ids.RETRAIN, ids.VIEW_RUN])
def test_every_button_refuses_another_workspace_and_the_wrong_people(bot, button):
    from core.types import NewData
    put_training_data(bot.store)
    if button in (ids.RETRAIN_NEW_DATA, ids.DISMISS_ALERT):
        bot.notifier.new_data(NewData(keys=["data/x.npz"], total_bytes=1, fingerprint="sha256:1"), "alert-1")
        ts = bot.standin.messages(bot.channel)[-1].ts
    else:
        publish(bot.store, "mnist-arcface", _package(bot, "a"), run_id="a", by="x")
        run = bot.service.request_training("t", {}, ALICE)
        if button != ids.CANCEL_RUN:
            finish_run(bot.store, bot.runner, run.run_id, decision="deploy", version=2)
            publish(bot.store, "mnist-arcface", _package(bot, run.run_id), run_id=run.run_id, by="x")
            bot.service.refresh(run.run_id)
        ts = bot.service.get_run(run.run_id).slack_ts
    before = (read_alias(bot.store, "mnist-arcface"), len(bot.runner.submits), bot.runner.cancels[:])
    refused(bot, told(bot, bot.click(ts, button, user=OPS, team_id=FOREIGN)))
    if button in (ids.ROLLBACK, ids.CANCEL_RUN):                        # lists that exclude MALLORY
        refused(bot, told(bot, bot.click(ts, button, user=MALLORY)))
    assert (read_alias(bot.store, "mnist-arcface"), len(bot.runner.submits), bot.runner.cancels) == before


def test_ctbot_audit_prints_the_log(bot):
    import subprocess
    import sys
    bot.slash("schedule pause", user=MALLORY)
    _wait(lambda: bot.state.read_audit(1))
    env = {"REDIS_URL": bot.settings.redis_url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "ctbot.cli", "audit", "-n", "5"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert MALLORY in out.stdout and "refused" in out.stdout.lower() and bot.channel in out.stdout
