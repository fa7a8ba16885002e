"""The gate (core/gate.py) over signed HTTP as Slack sends it: with deploy.require_approval
a run awaiting approval or rejected can't be published by `/ct deploy` or *Promote anyway*
except by an approver, whose deploy is the approval; an expired one only by an approver;
every decision audited with its rule; a user-group lookup failure answered as such; the
production gauges following promote, rollback and a pipeline deploy."""
from __future__ import annotations

import time

import pytest

from bot import ids
from core import metrics
from steps.deploy import read_alias
from tests.helpers import metric_samples
from tests.helpers import wait_until as _wait
from tests.integration.test_access import ADMIN, OPS, _package, answer, awaiting, held, told
from tests.recording import finish_run
from tests.slack_helpers import ALICE, buttons, message_text, put_training_data, start_bot

MODEL = "mnist-arcface"
# ALICE requests the runs and may deploy and approve; OPS (through S0MLOPS) may too; ADMIN may only deploy.
ACCESS = {"train": ["*"], "deploy": [ALICE, ADMIN, "S0MLOPS"], "rollback": ["S0MLOPS"], "cancel": ["S0MLOPS"],
          "schedule": ["S0MLOPS"], "approve": ["S0MLOPS", ALICE]}


@pytest.fixture
def bot(tmp_path, redis_url, s3_store):
    b = start_bot(tmp_path, redis_url, store=s3_store, usergroups={"S0MLOPS": [OPS]}, access=dict(ACCESS))
    b.settings.deploy.require_approval = True
    try:
        yield b
    finally:
        b.close()


def last_audit(bot, action: str) -> dict:
    return next(e for e in bot.state.read_audit(50) if e["action"] == action)


def report_of(bot, ts: str):
    return bot.standin.message(bot.channel, ts)


def test_the_requesters_deploy_of_a_pending_run_is_refused(bot):
    run_id, ts = awaiting(bot)
    text = answer(bot, bot.slash(f"deploy {run_id}", user=ALICE))
    assert f"Run `{run_id}` is waiting for approval by <!subteam^S0MLOPS>, <@{ALICE}>" in text, text
    assert "an approver can approve it" in text and "another approver must approve it" in text
    refusal = last_audit(bot, "refused")
    assert refusal["requested"] == "deploy" and refusal["run_id"] == run_id and refusal["rule"].startswith("pending:")
    text = answer(bot, bot.slash(f"deploy {run_id}", user=ADMIN))     # on the deploy list, not an approver
    assert "waiting for approval" in text and "only <!subteam^S0MLOPS>" in text
    assert read_alias(bot.store, MODEL) is None
    run = bot.service.get_run(run_id)
    assert run.approval == "pending" and run.model_version is None
    assert {ids.APPROVE_DEPLOY, ids.REJECT_DEPLOY} <= set(buttons(report_of(bot, ts).blocks))


def test_an_approvers_deploy_is_the_approval(bot):
    run_id, ts = awaiting(bot)
    text = answer(bot, bot.slash(f"deploy {run_id}", user=OPS))
    alias = read_alias(bot.store, MODEL)
    assert alias["version"] == 1 and alias["history"][-1]["approved_by"] == OPS and alias["history"][-1]["by"] == ALICE
    assert "v1" in text
    run = bot.service.get_run(run_id)
    assert (run.approval, run.approval_by, run.model_version) == ("approved", OPS, 1)
    entry = last_audit(bot, "approved")
    assert (entry["who"], entry["via"], entry["run_id"]) == (OPS, "deploy", run_id)
    assert entry["rule"] == "pending: an approver's deploy counts as the approval" and "expired" not in entry
    assert not [e for e in bot.state.read_audit(50) if e["action"] == "promote"]   # an approval, not a promote
    msg = _wait(lambda: (m := report_of(bot, ts)) and "Approved by" in message_text(m.to_payload()) and m)
    assert ids.APPROVE_DEPLOY not in buttons(msg.blocks) and ids.REJECT_DEPLOY not in buttons(msg.blocks)
    assert "already published" in answer(bot, bot.slash(f"deploy {run_id}", user=OPS))


def test_a_rejected_run_cannot_be_published(bot):
    run_id, ts = awaiting(bot)
    bot.click(ts, ids.REJECT_DEPLOY, user=OPS)
    _wait(lambda: bot.service.get_run(run_id).approval == "rejected")
    for user in (ALICE, OPS):
        text = answer(bot, bot.slash(f"deploy {run_id}", user=user))
        assert f"Run `{run_id}` was rejected by <@{OPS}>; it can't be published" in text, text
        assert last_audit(bot, "refused")["rule"] == "rejected: a rejected run is never published"
    # A forged Promote anyway click on the (now button-less) report: the gate, not the UI, refuses.
    payload_ts = bot.standin.message(bot.channel, ts)
    from slack_sdk import WebClient

    from tests.slack_helpers import BOT_TOKEN
    posted = WebClient(token=BOT_TOKEN, base_url=bot.standin.api_url).chat_postMessage(
        channel=bot.channel, text="forged", blocks=[{"type": "actions", "elements": [
            {"type": "button", "action_id": ids.PROMOTE, "value": run_id,
             "text": {"type": "plain_text", "text": "Promote anyway"}}]}])
    text = told(bot, bot.click(posted["ts"], ids.PROMOTE, user=OPS))
    assert "was rejected" in text and payload_ts
    assert read_alias(bot.store, MODEL) is None and bot.service.get_run(run_id).approval == "rejected"


def test_an_expired_approval_is_published_only_by_an_approver(bot):
    bot.settings.deploy.approval_timeout_hours = 1 / 3600       # one second
    run_id, ts = awaiting(bot)
    _wait(lambda: time.sleep(0.3) or bot.service.expire_approvals() == [run_id] or
          bot.service.get_run(run_id).approval == "expired")
    text = answer(bot, bot.slash(f"deploy {run_id}", user=ADMIN))
    assert "approval of run" in text and "expired; only an approver can deploy it" in text
    assert last_audit(bot, "refused")["rule"] == "expired: only an approver may publish it"
    assert "v1" in answer(bot, bot.slash(f"deploy {run_id}", user=OPS))
    entry = last_audit(bot, "approved")
    assert entry["expired"] == "true" and entry["rule"].startswith("expired:") and entry["via"] == "deploy"
    assert read_alias(bot.store, MODEL)["history"][-1]["approved_by"] == OPS


def test_a_held_run_is_still_promoted_by_the_deploy_list(bot):
    run_id = held(bot)
    assert "Promoted run" in answer(bot, bot.slash(f"deploy {run_id}", user=ADMIN))
    assert last_audit(bot, "promote")["rule"] == "deploy list: a held run, published by hand"


@pytest.mark.parametrize("failure", ["500", "no_such_subteam"])
def test_a_user_group_lookup_failure_is_answered_and_audited(bot, failure):
    run_id = held(bot)
    if failure == "500":
        bot.standin.fail_next("usergroups.users.list", status=500)
        group, said = "<!subteam^S0MLOPS>", "`internal_error`"
    else:
        bot.settings.access.deploy = ["S0GONE00"]                 # a group deleted in Slack
        group, said = "<!subteam^S0GONE00>", "`no_such_subteam`"
    text = answer(bot, bot.slash(f"deploy {run_id}", user=OPS))
    assert f"couldn't check the {group} group with Slack (usergroups.users.list answered {said})" in text, text
    assert "nothing was changed; try again" in text and "incident" not in text
    refusal = last_audit(bot, "refused")
    assert refusal["who"] == OPS and refusal["outcome"] == "refused" and "couldn't check" in refusal["reason"]
    assert "could not be resolved" in refusal["rule"]
    assert read_alias(bot.store, MODEL) is None
    # A group that fails does not shut out a member of another group on the list.
    bot.settings.access.deploy = ["S0GONE00", "S0MLOPS"]
    assert "Promoted run" in answer(bot, bot.slash(f"deploy {run_id}", user=OPS))


def production_gauges() -> tuple[float, float]:
    body, _ = metrics.exposition()
    s = metric_samples(body.decode())
    return s[("ctbot_production_version", ())], s[("ctbot_production_top1", ())]


def shows(version: int, top1: float) -> None:
    """Scrapes until the gauges say so (a scrape may start a background read of the alias)."""
    _wait(lambda: production_gauges() == (version, pytest.approx(top1)), 20, f"the gauges at v{version}")


def test_production_gauges_follow_promote_rollback_and_a_pipeline_deploy(bot):
    metrics.follow_production(bot.service.production)
    try:
        promoted = held(bot)
        bot.service.promote(promoted, by=ADMIN)                   # v1, top-1 0.95
        shows(1, 0.95)
        put_training_data(bot.store)
        run = bot.service.request_training("t", {}, ALICE)       # the pipeline publishes v2 itself
        bot.settings.deploy.require_approval = False
        from steps.deploy import publish
        publish(bot.store, MODEL, _package(bot, run.run_id), run_id=run.run_id, by=ALICE)
        finish_run(bot.store, bot.runner, run.run_id, decision="deploy", top1=0.98, version=2)
        bot.service.refresh(run.run_id)
        shows(2, 0.98)
        assert last_audit(bot, "deploy")["rule"].startswith("compare-and-set: production was still")
        bot.service.rollback(None, by=OPS)                        # back to v1: the gauges follow
        shows(1, 0.95)
        from steps.deploy import rollback
        rollback(bot.store, MODEL, to_version=2, by="cli")        # moved by another process
        metrics.follow_production(bot.service.production)         # (its next scrape re-reads the alias)
        shows(2, 0.98)
    finally:
        metrics.follow_production(None)


def test_the_registry_cli_is_held_at_the_same_gate(bot):
    import json
    import subprocess
    import sys
    run_id, _ = awaiting(bot)
    assert bot.store.get_json(f"runs/{run_id}/approval.json")["state"] == "pending"
    out = subprocess.run([sys.executable, "-m", "steps.deploy", "--store", bot.store.uri(""), "--model", MODEL,
                          "publish", "--package-prefix", f"runs/{run_id}/candidate/", "--run-id", run_id],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "is waiting for approval" in json.loads(out.stdout)["error"], out
    assert read_alias(bot.store, MODEL) is None
    answer(bot, bot.slash(f"deploy {run_id}", user=OPS))          # through ctbot, by an approver: published
    assert bot.store.get_json(f"runs/{run_id}/approval.json")["state"] == "approved"
    assert read_alias(bot.store, MODEL)["version"] == 1


def test_an_approver_off_the_deploy_list_may_deploy_only_a_run_awaiting_approval(bot):
    approver = "U0APPROVR"
    bot.settings.access.approve = [*ACCESS["approve"], approver]
    held_id = held(bot)
    text = answer(bot, bot.slash(f"deploy {held_id}", user=approver))   # no approval pending: the deploy list
    assert "You may not deploy a model" in text and last_audit(bot, "refused")["rule"] == "access: the deploy list"
    run_id, _ = awaiting(bot)
    assert "v1" in answer(bot, bot.slash(f"deploy {run_id}", user=approver))
    assert (bot.service.get_run(run_id).approval_by, last_audit(bot, "approved")["via"]) == (approver, "deploy")
