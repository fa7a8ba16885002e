"""Slack down for ten minutes (time compressed through `outbox.time_scale`), two real
`ctbot serve` replicas, a real run finishing meanwhile: every report is delivered once,
in the order it was owed, when Slack answers again; /metrics shows what is owed while it
is down; and what is still owed after `outbox.give_up_hours` is logged and kept for
`/ct status`, never sent later."""
from __future__ import annotations

import urllib.parse
import urllib.request

import pytest

from core.outbox import Outbox
from tests.helpers import metric_samples
from tests.helpers import wait_until as wait
from tests.reliability.conftest import seed_data
from tests.reliability.test_run_life import run_messages
from tests.slack_helpers import ALICE, BOB

pytestmark = pytest.mark.timeout(900)

SCALE = 60                 # a real second stands for a minute of outage
OUTAGE_MINUTES = 10        # more than twice the 4 minutes after which the old outbox gave up


def scrape(bot) -> dict:
    u = urllib.parse.urlsplit(bot.url)
    with urllib.request.urlopen(f"{u.scheme}://{u.netloc}/metrics", timeout=10) as r:
        return {name: v for (name, labels), v in metric_samples(r.read().decode()).items() if not labels}


def owed_messages(state) -> int:
    return state.r.zcard(state.k("outbox", "msgs"))


def test_a_ten_minute_slack_outage_ends_with_every_report_delivered_once_in_order(world, ledger):
    seed_data(world.store)
    state, outbox = world.state(), Outbox(world.state())
    mark = ledger.mark()
    compressed = {"CT_OUTBOX__TIME_SCALE": str(SCALE)}
    a, b = world.bot(**compressed), world.bot(**compressed)      # two replicas share one outbox

    # Before: a run under way, its message posted; each replica has answered a command.
    status, ack, *_ = a.slash("train epochs=1 batch_size=64")
    assert status == 200 and "Starting a training run" in ack, ack
    run = wait(lambda: (runs := state.list_runs(1)) and runs[0].slack_ts and runs[0], 120, "the run's message")
    assert b.slash("status", user=BOB)[0] == 200

    # Slack goes away: first rate limiting, then plain 500s, for ten (compressed) minutes.
    world.standin.outage(status=429, retry_after=1)
    ledger.fault("Slack down: HTTP 429 with Retry-After on every Web API call")
    # Announcements owed meanwhile, from either replica, in a known order.
    expected = []
    for i, (bot, user, verb) in enumerate([(a, ALICE, "pause"), (b, BOB, "resume"), (b, BOB, "pause"),
                                           (a, ALICE, "resume")]):
        if i == 2:
            world.standin.outage(status=500)
            ledger.fault("Slack down: HTTP 500 on every Web API call")
        assert bot.slash(f"schedule {verb}", user=user)[0] == 200
        wait(lambda n=i + 1: owed_messages(state) == n, 60, f"announcement {i + 1} to be owed")
        expected.append(f"<@{user}> {verb}d the weekly retrain.")
    # The run finishes while Slack is down: its report is owed too.
    run = wait(lambda: (r := state.get_run(run.run_id)) and not r.active and r, 400, "the run to end")
    assert run.state == "succeeded", run.error
    wait(lambda: outbox.oldest_age() * SCALE >= OUTAGE_MINUTES * 60, 120,
         "the oldest owed message to have waited ten compressed minutes")

    # Still owed, none given up, and /metrics on either replica says so.
    metrics = wait(lambda: (m := scrape(a)).get("ctbot_outbox_pending", 0) >= 5 and m, 30,
                   "ctbot_outbox_pending to count the owed report and announcements")
    assert metrics["ctbot_outbox_oldest_seconds"] * SCALE >= OUTAGE_MINUTES * 60
    assert scrape(b)["ctbot_outbox_pending"] == metrics["ctbot_outbox_pending"]
    assert outbox.failures() == [] and outbox.paused()
    assert len([c for c in world.standin.calls() if c.status in (429, 500)]) >= 3   # it kept trying

    # Slack answers again: everything owed goes out, in order, once.
    world.standin.end_outage()
    wait(lambda: outbox.pending_count() == 0, 120, "the outbox to empty")
    posted = world.standin.messages(world.channel)
    announcements = [m.text for m in posted if "weekly retrain" in (m.text or "")]
    ledger.lost += max(0, len(expected) - len(announcements)) + len(outbox.failures())
    ledger.duplicated += max(0, len(announcements) - len(expected))
    assert announcements == expected
    msgs = run_messages(world, run.run_id)
    assert len(msgs) == 1 and msgs[0].ts == run.slack_ts
    report = " ".join([msgs[0].text] + [str(x) for x in msgs[0].blocks])
    assert "deployed as v1" in report or "held" in report
    thread = world.standin.thread(world.channel, run.slack_ts)
    details = [m for m in thread if (m.metadata.get("event_payload") or {}).get("key") == f"details-{run.run_id}"]
    files = [f for m in thread for f in m.files]
    ledger.lost += (len(details) == 0) + (len(files) == 0)
    ledger.duplicated += max(0, len(details) - 1) + max(0, len(files) - 1)
    assert (len(details), len(files)) == (1, 1)
    assert outbox.failures() == [] and not outbox.paused()
    assert scrape(a)["ctbot_outbox_pending"] == 0
    ledger.survived_since(mark)


def test_what_is_still_owed_after_the_give_up_time_is_logged_and_kept_for_status(world, ledger):
    mark = ledger.mark()
    outbox = Outbox(world.state())
    # 0.01 h is 36 s; compressed 60x, 0.6 s.
    bot = world.bot(CT_OUTBOX__TIME_SCALE=str(SCALE), CT_OUTBOX__GIVE_UP_HOURS="0.01")
    assert bot.slash("status")[0] == 200
    world.standin.outage(status=503)
    ledger.fault("Slack down past outbox.give_up_hours")
    assert bot.slash("schedule pause")[0] == 200
    (failure,) = wait(lambda: outbox.failures(), 60, "the announcement to be given up")
    assert failure["detail"] == f"<@{ALICE}> paused the weekly retrain." and "503" in failure["error"]
    assert outbox.pending_count() == 0
    # /ct status (answered through the response URL) names it...
    _, _, rurl, _ = bot.slash("status")
    rid = rurl.rsplit("/", 1)[1]
    world.standin.wait_for("response", timeout=60, where=lambda args: args["rid"] == rid and
                           "Not delivered to Slack" in str(args) and "paused the weekly retrain" in str(args))
    # ...the log says so once, as an error...
    assert "gave up delivering message" in wait(lambda: "gave up" in bot.log.read_text() and bot.log.read_text(),
                                                30, "the give-up in the log")
    # ...and it is not sent later, when Slack is back.
    world.standin.end_outage()
    assert bot.slash("schedule resume")[0] == 200
    wait(lambda: any("resumed" in (m.text or "") for m in world.standin.messages(world.channel)), 60,
         "the next announcement")
    assert not any("paused" in (m.text or "") for m in world.standin.messages(world.channel))
    ledger.survived_since(mark)
