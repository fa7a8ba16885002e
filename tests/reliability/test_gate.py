"""The gate against real `ctbot serve` processes (real Redis, the local S3 server, the Slack
stand-in, the real pipeline through kfp.local): no way around an approval, a rollback made
while a run is between evaluate and deploy wins, the production gauges follow the alias,
and a Slack user-group lookup failure is answered as one. Refused attempts count as bad
inputs in the ledger; injected failures and moves as faults."""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest
from slack_sdk import WebClient

from bot import ids
from bot.blocks import final_report
from core.types import RunRecord
from steps import layout
from steps.deploy import publish, read_alias
from tests.helpers import metric_samples
from tests.helpers import wait_until as wait
from tests.reliability.conftest import seed_data
from tests.slack_helpers import ALICE, BOB, BOT_TOKEN, buttons, message_text, report

pytestmark = pytest.mark.timeout(900)
MODEL = "mnist-arcface"
CAROL = "U0CAROL01"


def answer(world, rurl: str, timeout: float = 60) -> str:
    rid = rurl.rsplit("/", 1)[1]
    got = wait(lambda: world.standin.responses(rid), timeout, "an answer through the response_url")
    return " ".join(message_text(r) for r in got)


def slash(world, bot, text: str, user: str) -> str:
    """The answer to a slash command. An ack that could not record it (Redis slower than
    the ack's deadline) says nothing was changed: the user tries again, and so do we."""
    for _ in range(3):
        status, ack, rurl, _ = bot.slash(text, user=user)
        assert status == 200, ack
        if "nothing was changed" not in ack:
            return answer(world, rurl)
    raise AssertionError(f"/ct {text} was never accepted: {ack}")


def audit(world, action: str) -> list[dict]:
    return [e for e in world.state().read_audit(500) if e["action"] == action]


def gauges(bot) -> dict:
    base = bot.url.split("/slack/")[0]
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        samples = metric_samples(resp.read().decode())
    return {"version": samples.get(("ctbot_production_version", ())),
            "top1": samples.get(("ctbot_production_top1", ()))}


def follows(bot, version: int, top1: float, what: str) -> None:
    wait(lambda: gauges(bot) == {"version": version, "top1": pytest.approx(top1)}, 30,
         f"the production gauges to show v{version} after {what}")


def awaiting_run(world, run_id: str, requested_by: str, approval: str = "pending") -> str:
    """A finished run waiting for an approver, as the bot leaves it (record, candidate
    package, report.json, its report in the channel with the Approve/Reject buttons)."""
    prefix = layout.candidate_prefix(run_id)
    for name in ("model.pt", "model_export.pt", "index.faiss", "labels.npy"):
        world.store.put_bytes(prefix + name, f"{name} of {run_id} ".encode() * 200)
    world.store.put_json(prefix + layout.METRICS_JSON, {"top1": 0.99, "production": None})
    rep = report(run_id, version=None, prod_top1=None, top1=0.99)
    world.store.put_json(layout.report_key(run_id), rep)
    run = RunRecord(run_id=run_id, model=MODEL, trigger="manual", reason="test", requested_by=requested_by,
                    state="succeeded", decision="deploy", top1=0.99, finished_at=time.time(), approval=approval,
                    approval_expect={"production": None})
    msg = final_report(run, rep)
    posted = WebClient(token=BOT_TOKEN, base_url=world.standin.api_url).chat_postMessage(channel="#ct", **msg)
    run.slack_channel, run.slack_ts = posted["channel"], posted["ts"]
    state = world.state()
    state.create_run(run)
    state.r.sadd(state.k("approvals"), run_id)
    return posted["ts"]


# These tests are about the gate, not the ack path or resuming commands cut off by a crash:
# on a loaded machine a refused command must not be resumed while its answer is on the
# way, and the ack's Redis write gets most of Slack's 3 s.
CALM = {"CT_COMMAND_STALE_SECONDS": "120", "CT_REDIS_ACK_TIMEOUT_SECONDS": "2.5"}


def test_no_way_around_an_approval(world, ledger):
    mark = ledger.mark()
    bot = world.bot(CT_DEPLOY__REQUIRE_APPROVAL="true", **CALM)   # deploy: ALICE, BOB; approve: ALICE
    ts = awaiting_run(world, "r-pending-1", requested_by=BOB)
    assert {ids.APPROVE_DEPLOY, ids.REJECT_DEPLOY} <= set(buttons(world.standin.message(world.channel, ts).blocks))

    # The requester, on the deploy list, tries /ct deploy and Promote anyway: both refused.
    text = slash(world, bot, "deploy r-pending-1", BOB)
    ledger.bad_inputs += 1
    assert f"Run `r-pending-1` is waiting for approval by <@{ALICE}>; an approver can approve it" in text, text
    forged = WebClient(token=BOT_TOKEN, base_url=world.standin.api_url).chat_postMessage(
        channel="#ct", text="forged", blocks=[{"type": "actions", "elements": [
            {"type": "button", "action_id": ids.PROMOTE, "value": "r-pending-1",
             "text": {"type": "plain_text", "text": "Promote anyway"}}]}])["ts"]
    payload = world.standin.action_payload(world.channel, forged, ids.PROMOTE, user=BOB)
    assert bot.click(payload)[0] == 200
    ledger.bad_inputs += 1
    assert "waiting for approval" in answer(world, payload["response_url"])
    assert read_alias(world.store, MODEL) is None
    refusals = [e for e in audit(world, "refused") if e.get("run_id") == "r-pending-1"]
    assert len(refusals) == 2 and all(e["rule"].startswith("pending:") for e in refusals)
    assert world.state().get_run("r-pending-1").approval == "pending"

    # An approver who is not the requester: /ct deploy is the approval, recorded as one.
    text = slash(world, bot, "deploy r-pending-1", ALICE)
    assert "v1" in text, text
    alias = read_alias(world.store, MODEL)
    assert alias["version"] == 1 and alias["history"][-1]["approved_by"] == ALICE
    run = world.state().get_run("r-pending-1")
    assert (run.approval, run.approval_by, run.model_version) == ("approved", ALICE, 1)
    (approved,) = audit(world, "approved")
    assert approved["via"] == "deploy" and approved["rule"] == "pending: an approver's deploy counts as the approval"
    msg = wait(lambda: (m := world.standin.message(world.channel, ts)) and "Approved by" in
               message_text(m.to_payload()) and m, 60, "the report stamped as approved")
    assert ids.APPROVE_DEPLOY not in buttons(msg.blocks) and ids.REJECT_DEPLOY not in buttons(msg.blocks)

    # A rejected run can't be published by anyone, nor by a forged Promote anyway.
    ts = awaiting_run(world, "r-pending-2", requested_by=BOB)
    payload = world.standin.action_payload(world.channel, ts, ids.REJECT_DEPLOY, user=ALICE)
    assert bot.click(payload)[0] == 200
    wait(lambda: world.state().get_run("r-pending-2").approval == "rejected", 30, "the rejection")
    for user in (BOB, ALICE):
        text = slash(world, bot, "deploy r-pending-2", user)
        ledger.bad_inputs += 1
        assert "Run `r-pending-2` was rejected by" in text and "can't be published" in text, text
    payload = world.standin.action_payload(world.channel, forged, ids.PROMOTE, user=ALICE)
    payload["actions"][0]["value"] = "r-pending-2"          # a hand-made click for the rejected run
    assert bot.click(payload)[0] == 200
    ledger.bad_inputs += 1
    assert "was rejected" in answer(world, payload["response_url"])
    assert read_alias(world.store, MODEL)["version"] == 1 and len(audit(world, "approved")) == 1
    ledger.survived_since(mark)


def test_a_user_group_lookup_failure_gets_a_specific_answer(world, ledger):
    mark = ledger.mark()
    world.standin.usergroups["S0MLOPS"] = [CAROL]
    bot = world.bot(CT_ACCESS__DEPLOY="S0MLOPS", CT_ACCESS__ROLLBACK="S0GONE00", **CALM)
    from tests.reliability.test_duplicates import held_run
    held_run(world, "r-held-g")

    world.standin.fail_next("usergroups.users.list", status=500)
    ledger.fault("usergroups.users.list answered HTTP 500")
    text = slash(world, bot, "deploy r-held-g", CAROL)
    assert "couldn't check the <!subteam^S0MLOPS> group with Slack" in text, text
    assert "nothing was changed; try again" in text and "incident" not in text
    refusal = audit(world, "refused")[0]
    assert (refusal["who"], refusal["requested"], refusal["outcome"]) == (CAROL, "deploy", "refused")
    assert "couldn't check the <!subteam^S0MLOPS> group" in refusal["reason"]
    assert read_alias(world.store, MODEL) is None

    text = slash(world, bot, "rollback", CAROL)               # a group Slack no longer has
    ledger.fault("usergroups.users.list answered no_such_subteam")
    assert "couldn't check the <!subteam^S0GONE00> group with Slack" in text and "no_such_subteam" in text, text
    assert audit(world, "refused")[0]["rule"] == "access: the S0GONE00 group could not be resolved"

    assert "Promoted run" in slash(world, bot, "deploy r-held-g", CAROL)    # tried again: Slack answers
    assert read_alias(world.store, MODEL)["version"] == 1
    ledger.survived_since(mark)


def test_a_rollback_between_evaluate_and_deploy_wins(world, ledger, tmp_path):
    """Two real pipeline runs: the first deploys v1 (republished as v2 from outside the
    bot); the second is held at its deploy step while @bob rolls production back to v1.
    It must not publish over the rollback; the report says why, and `/ct deploy` then
    publishes it deliberately. The production gauges follow every move."""
    mark = ledger.mark()
    seed_data(world.store)
    go = tmp_path / "deploy-go"
    go.touch()                              # the first run passes its deploy step unheld
    bot = world.bot(CT_PAUSE_AT=f"before_deploy:{go}", CT_DEPLOY_TOLERANCE="1", **CALM)   # always "deploy"
    state = world.state()

    def finished(run_id: str) -> RunRecord:
        return wait(lambda: (r := state.get_run(run_id)) and not r.active and r, 600, f"run {run_id} to end")

    assert "Started run" in slash(world, bot, "train epochs=1 batch_size=64", ALICE)
    (first,) = [r.run_id for r in state.list_runs(5)]
    run = finished(first)
    assert (run.state, run.model_version) == ("succeeded", 1), run.error
    follows(bot, 1, run.top1, "a pipeline deploy")
    publish(world.store, MODEL, layout.candidate_prefix(first), run_id=first, by="pipeline")   # v2, from outside
    ledger.fault("production moved by another process")
    follows(bot, 2, run.top1, "a publish by another process")

    go.unlink()
    (tmp_path / "deploy-go.reached").unlink()
    assert "Started run" in slash(world, bot, "train epochs=1 batch_size=64", ALICE)
    second = next(r.run_id for r in state.list_runs(5) if r.run_id != first)
    wait(lambda: (tmp_path / "deploy-go.reached").exists(), 600, "the second run to reach its deploy step")
    evaluated = world.store.get_json(layout.candidate_key(second, layout.METRICS_JSON))
    assert evaluated["production"]["version"] == 2             # what evaluate compared against
    text = slash(world, bot, "rollback", BOB)
    ledger.fault("rollback between evaluate and deploy")
    assert "rolled back from v2 to *v1*" in text, text
    follows(bot, 1, run.top1, "a rollback")
    go.touch()

    held = finished(second)
    assert held.state == "succeeded" and held.decision == "hold" and held.model_version is None, held
    want = (f"production moved from v2 to v1 during the run (rolled back by <@{BOB}>); "
            f"compare again with `/ct deploy {second}`")
    assert held.decision_reason == want
    alias = read_alias(world.store, MODEL)
    assert alias["version"] == 1 and [h["version"] for h in alias["history"]] == [1, 2, 1]
    (entry,) = audit(world, "deploy_held")
    assert entry["run_id"] == second and entry["rule"].startswith("compare-and-set: production moved")

    def reported():
        msgs = [m for m in world.standin.messages(world.channel)
                if (m.metadata.get("event_payload") or {}).get("key") == f"run-{second}"]
        text = " ".join(json.dumps(m.blocks) for m in msgs)
        return msgs if "held" in text and "compare again with" in text else None
    (msg,) = wait(reported, 120, "the held report")
    assert ids.PROMOTE in buttons(msg.blocks)
    assert f"rolled back by <@{BOB}>" in urllib.parse.unquote(json.dumps(msg.blocks))

    text = slash(world, bot, f"deploy {second}", ALICE)       # compared again, by a person: published
    assert "*v3*" in text, text
    follows(bot, 3, held.top1, "a promote")
    ledger.survived_since(mark)
