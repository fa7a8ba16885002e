"""Duplicates and races against two real `ctbot serve` replicas on one Redis, one store and
one Slack: every command and button delivered twice (Slack's retries), double clicks by
two people, concurrent promotes, rollbacks and a pipeline deploy, a crash in the middle
of a registry publish, and a stream of bad input. Effects are counted in the audit, the
registry and the Slack stand-in: each must have happened exactly once."""
from __future__ import annotations

import json
import threading
import time

import pytest

from bot import ids
from core.types import RunRecord
from steps import layout
from steps.deploy import list_versions, publish, read_alias, verify_package
from tests.helpers import wait_until as wait
from tests.slack_helpers import ALICE, BOB, buttons, message_text

pytestmark = pytest.mark.timeout(400)
MODEL = "mnist-arcface"


def held_run(world, run_id: str, top1: float = 0.95) -> str:
    """A finished, held run as a pipeline leaves it: its record and its candidate package."""
    prefix = layout.candidate_prefix(run_id)
    for name in ("model.pt", "model_export.pt", "index.faiss", "labels.npy"):
        world.store.put_bytes(prefix + name, f"{name} of {run_id} ".encode() * 200)
    world.store.put_json(prefix + layout.METRICS_JSON, {"top1": top1})
    world.state().create_run(RunRecord(run_id=run_id, model=MODEL, trigger="manual", reason="test",
                                       requested_by=ALICE, state="succeeded", decision="hold", top1=top1,
                                       finished_at=time.time()))
    return run_id


def audit(world, action: str) -> list[dict]:
    return [e for e in world.state().read_audit(500) if e["action"] == action]


def answered(world, rurl: str) -> list[dict]:
    return world.standin.responses(rurl.rsplit("/", 1)[1])


def count(ledger, seen: int, want: int = 1) -> int:
    ledger.lost += seen < want
    ledger.duplicated += max(0, seen - want)
    return seen


def test_a_crash_mid_publish_leaves_no_torn_production(world, ledger):
    mark = ledger.mark()
    held_run(world, "r-held-1")
    bot = world.bot(crash_at="mid_publish")
    status, ack, rurl, _ = bot.slash("deploy r-held-1")
    assert status == 200 and "Promoting" in ack
    bot.wait_dead(30, "in the middle of a registry publish")
    ledger.fault("SIGKILL during a registry publish")
    torn = list_versions(world.store, MODEL)
    assert torn and read_alias(world.store, MODEL) is None        # files copied, alias untouched
    with pytest.raises(ValueError, match="manifest"):
        verify_package(world.store, MODEL, torn[0])               # and readers refuse it
    world.bot()                                                   # restart: the command resumes
    alias = wait(lambda: read_alias(world.store, MODEL), 60, "the resumed promote")
    assert alias["version"] != torn[0] and verify_package(world.store, MODEL, alias["version"])
    wait(lambda: answered(world, rurl), 30, "an answer to /ct deploy")
    assert count(ledger, len(audit(world, "promote"))) == 1
    assert any(f"v{alias['version']}" in str(a) for a in answered(world, rurl))
    ledger.survived_since(mark)


def test_retries_double_clicks_and_races_across_two_replicas(world, ledger):
    mark = ledger.mark()
    a, b = world.bot(), world.bot()
    for i in range(3):
        held_run(world, f"r-held-{i}")

    # Every command delivered twice, the retry to the other replica (X-Slack-Retry-Num: 1).
    sent = {}
    for text in ("status", "runs 3", "data", "schedule pause", "schedule resume", "deploy r-held-0",
                 "deploy r-held-1", "rollback", "help"):
        status, ack, rurl, body = a.slash(text)
        assert status == 200
        status2, _, _, _ = b.slash(text, retry=1, body=body)
        assert status2 == 200
        ledger.fault(f"repeated delivery of /ct {text}")
        sent[text] = rurl
        if text != "help":
            wait(lambda r=rurl: answered(world, r), 30, f"an answer to /ct {text}")
    time.sleep(2)   # time for a wrongly repeated effect to show
    for text, rurl in sent.items():
        if text != "help":
            assert count(ledger, len(answered(world, rurl))) == 1, text
    assert count(ledger, len(audit(world, "schedule_paused"))) == 1
    assert count(ledger, len(audit(world, "schedule_resumed"))) == 1
    assert count(ledger, len(audit(world, "promote")), 2) == 2
    assert count(ledger, len(audit(world, "rollback"))) == 1
    assert read_alias(world.store, MODEL)["version"] == 1          # v1, v2, rolled back to v1

    # A report with a Roll back button, clicked by two people on two replicas, each
    # delivery repeated: one rollback.
    publish(world.store, MODEL, layout.candidate_prefix("r-held-2"), run_id="r-held-2", by="pipeline")   # v3
    from slack_sdk import WebClient

    from bot.blocks import final_report
    from tests.slack_helpers import BOT_TOKEN, report
    run = world.state().get_run("r-held-2")
    msg = final_report(run, report("r-held-2", version=3))
    ts = WebClient(token=BOT_TOKEN, base_url=world.standin.api_url).chat_postMessage(channel="#ct", **msg)["ts"]
    assert ids.ROLLBACK in buttons(world.standin.message(world.channel, ts).blocks)
    payloads = [world.standin.action_payload(world.channel, ts, ids.ROLLBACK, user=u) for u in (ALICE, BOB)]
    world.standin.fail_next("chat.update", status=429, retry_after=1)
    ledger.fault("Slack 429 on the clicked message's chat.update")
    threads = [threading.Thread(target=bot.click, args=(p,)) for bot, p in ((a, payloads[0]), (b, payloads[1]))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for bot, p in ((b, payloads[0]), (a, payloads[1])):
        bot.click(p, retry=1)
    ledger.fault("double click by two people on two replicas")
    ledger.fault("repeated delivery of both clicks")
    wait(lambda: len(audit(world, "rollback")) >= 2, 30, "the rollback")
    time.sleep(2)
    assert count(ledger, len(audit(world, "rollback")), 2) == 2    # the command's, and one click's
    told = [str(r) for p in payloads for r in answered(world, p["response_url"])]
    assert any("Already done" in t for t in told)                  # the later clicker is told

    # Concurrent promotes (both replicas), a rollback and a pipeline deploy at once.
    held_run(world, "r-held-3")
    held_run(world, "r-held-4")
    before = len(audit(world, "promote"))
    go = threading.Barrier(4)

    def later(fn):
        def run():
            go.wait()
            fn()
        return threading.Thread(target=run)
    racers = [later(lambda: a.slash("deploy r-held-3")), later(lambda: b.slash("deploy r-held-3")),
              later(lambda: b.slash("rollback")),
              later(lambda: publish(world.store, MODEL, layout.candidate_prefix("r-held-4"), run_id="r-held-4",
                                    by="pipeline"))]
    [t.start() for t in racers]
    [t.join() for t in racers]
    ledger.fault("concurrent promotes, a rollback and a pipeline deploy")
    wait(lambda: len(audit(world, "promote")) > before, 30, "the promote")
    time.sleep(3)
    assert count(ledger, len(audit(world, "promote")) - before) == 1     # r-held-3 published once
    versions = list_versions(world.store, MODEL)
    for v in versions:
        verify_package(world.store, MODEL, v)                     # no torn package
    history = read_alias(world.store, MODEL)["history"]
    published = [h["version"] for h in history if h["action"] in ("deploy", "promote")]
    assert len(published) == len(set(published))                 # no version number twice
    prod = read_alias(world.store, MODEL)["version"]
    assert verify_package(world.store, MODEL, prod)
    ledger.survived_since(mark)


BAD = ["runs ²", "rollback ²", "rollback v٣", "runs 𝟙𝟘", "runs 99999999999999", "train epochs=²", "train lr=nan",
       "train epochs=1e9", "train preset=nope", "train =", "train a=b=c", "deploy", "cancel a b", "schedule now",
       "trian", "status please", "rollback -1", "runs -5", "train epochs=0", "train batch_size=1",
       "\u202edeploy", "train " + "x=1 " * 200, "💥", "deploy `r-nope`", "cancel r-nope"]


def test_bad_input_gets_specific_answers_never_an_incident(world, ledger):
    bot = world.bot()
    for text in BAD:
        status, raw, rurl, _ = bot.slash(text)
        ledger.bad_inputs += 1
        assert status == 200, text
        ack = message_text(json.loads(raw)) if raw.startswith("{") else raw
        answers = []
        if "…" in ack:   # "working on it": the answer comes through the response_url
            answers = [message_text(r) for r in wait(lambda r=rurl: answered(world, r), 20, text)]
        everything = ack + " ".join(answers)
        assert "incident" not in everything and "Traceback" not in everything, (text, everything)
        assert "⚠️" in everything or "Unknown" in everything or "not" in everything.lower(), (text, everything)
