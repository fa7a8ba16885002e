"""Every `/ct` subcommand over real HTTP, signed like Slack, against the real service,
Redis and store; Slack's side is the local stand-in."""
from __future__ import annotations

import json
import logging

import pytest

from steps import deploy
from tests.recording import finish_run
from tests.slack_helpers import ALICE, BOB, command_body, message_text, post, put_training_data, start_bot


@pytest.fixture
def bot(tmp_path, redis_url):
    b = start_bot(tmp_path, redis_url)
    yield b
    b.close()


def final_text(bot, reply) -> str:
    """The answer that replaced the 'working on it' ack."""
    posts = bot.responses(reply)
    assert all(p.get("replace_original") for p in posts)
    return message_text(posts[-1])


def no_trace(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text


# ---- answered in the ack ----------------------------------------------------------------

@pytest.mark.parametrize("text", ["help", "", "HELP"])
def test_help_is_answered_in_the_ack(bot, text):
    reply = bot.slash(text)
    assert reply.status == 200
    assert "/ct train [key=value …]" in reply.text and "epochs" in reply.text and "1…200" in reply.text
    assert reply.body.get("response_type") in (None, "ephemeral")
    assert bot.standin.calls("response") == []        # nothing slow left to do


@pytest.mark.parametrize("text, expected", [
    ("trian", "Did you mean `/ct train`"),
    ("promote r-1", "Did you mean `/ct deploy`"),
    ("stauts", "Did you mean `/ct status`"),
    ("frobnicate", "Unknown subcommand “frobnicate”"),
])
def test_unknown_subcommand_suggests(bot, text, expected):
    reply = bot.slash(text)
    assert reply.status == 200 and expected in reply.text and "Try `/ct help`" in reply.text


@pytest.mark.parametrize("text, expected", [
    ("train epochs", "Malformed parameter(s): “epochs”"),
    ("train epochs=3 =4", "Malformed parameter(s): “=4”"),
    ("train lr==0.1", "Malformed parameter(s): “lr==0.1”"),
    ("train foo=1", "unknown training parameter(s): foo; valid: epochs, batch_size, lr"),
    ("train epochs=1000", "epochs=1000 is out of range [1, 200]"),
    ("train lr=fast", "`lr` must be a float, got `fast`"),
    ("train lr_schedule=step", "lr_schedule='step' must be one of onecycle, cosine, none"),
    ("runs abc", "“abc” is not a number of runs between 1 and 50"),
    ("runs 0", "not a number of runs between 1 and 50"),
    ("runs 51", "not a number of runs between 1 and 50"),
    ("runs 3 4", "takes at most one number"),
    ("deploy", "`/ct deploy` needs exactly one run id"),
    ("cancel r-1 r-2", "needs exactly one run id (got 2)"),
    ("rollback vx", "“vx” is not a model version"),
    ("rollback 0", "is not a model version"),
    ("schedule later", "accepts only `pause` or `resume`"),
    ("status now", "`/ct status` takes no arguments"),
])
def test_bad_input_gets_a_specific_ephemeral_error_in_the_ack(bot, text, expected):
    reply = bot.slash(text)
    assert reply.status == 200
    assert expected in reply.text, reply.text
    assert ":warning:" in reply.text
    assert reply.body.get("response_type") in (None, "ephemeral")
    no_trace(reply.text)
    assert bot.runner.submits == []


# ---- slow work after the ack --------------------------------------------------------------

def test_train_starts_a_run_and_posts_its_message(bot):
    put_training_data(bot.store, 3)
    reply = bot.slash("train epochs=2 lr=0.01")
    assert reply.status == 200 and "Starting a training run" in reply.text       # working on it
    done = final_text(bot, reply)
    run_id = bot.runner.submits[0]["run_id"]
    assert f"Started run `{run_id}`" in done and "`epochs=2` `lr=0.01`" in done
    assert bot.standin.url + "/archives/" in done                                 # permalink to the run message
    submit = bot.runner.submits[0]
    assert submit["params"]["epochs"] == 2 and submit["params"]["lr"] == 0.01
    assert len(submit["data_uris"]) == 3 and submit["requested_by"] == ALICE
    run = bot.service.get_run(run_id)
    assert run.state == "running" and run.trigger == "manual" and run.slack_ts
    msg = bot.standin.message(bot.channel, run.slack_ts)
    assert f"Training run {run_id}" in message_text(msg.to_payload())
    assert bot.state.read_audit(5)[0]["action"] == "train_requested"


def test_train_while_a_run_is_active_is_refused_with_how_to_cancel(bot):
    put_training_data(bot.store)
    first = bot.slash("train seed=0")
    final_text(bot, first)
    active = bot.runner.submits[0]["run_id"]
    second = bot.slash("train epochs=1", user=BOB)
    text = final_text(bot, second)
    assert f"Run `{active}` is still running" in text and f"/ct cancel {active}" in text
    assert len(bot.runner.submits) == 1
    no_trace(text)


def test_train_without_data_says_where_to_put_it(bot):
    text = final_text(bot, bot.slash("train seed=0"))
    assert "No training data under" in text and "store/data`" in text and "&lt;label&gt;" in text
    assert bot.runner.submits == []


def test_status_runs_and_data(bot):
    put_training_data(bot.store)
    final_text(bot, bot.slash("train seed=0"))
    run_id = bot.runner.submits[0]["run_id"]

    status = final_text(bot, bot.slash("status"))
    assert f"*Active run* `{run_id}`" in status and "no model in production yet" in status

    runs = final_text(bot, bot.slash("runs 5"))
    assert run_id in runs and "running" in runs

    data = final_text(bot, bot.slash("data"))
    assert "Waiting for training" in data and "No model has been trained yet" in data


def test_cancel_an_active_run_and_unknown_ids(bot):
    put_training_data(bot.store)
    final_text(bot, bot.slash("train seed=0"))
    run_id = bot.runner.submits[0]["run_id"]

    unknown = final_text(bot, bot.slash("cancel r-nope"))
    assert "No run with id `r-nope`" in unknown and "`/ct runs`" in unknown

    text = final_text(bot, bot.slash(f"cancel {run_id}", user=BOB))
    assert f"Canceled run `{run_id}`" in text
    assert bot.runner.cancels == [run_id] and bot.service.get_run(run_id).state == "canceled"
    # The run's message shows it, and the channel is told who did it.
    run = bot.service.get_run(run_id)
    bot.standin.wait_for("chat.update", where=lambda a: a.get("ts") == run.slack_ts)
    assert "canceled" in message_text(bot.standin.message(bot.channel, run.slack_ts).to_payload())
    said = [m.text for m in bot.standin.messages(bot.channel)]
    assert f"<@{BOB}> canceled run `{run_id}`." in said

    again = final_text(bot, bot.slash(f"cancel {run_id}"))
    assert "already canceled" in again


def test_deploy_a_held_run_then_roll_back(bot):
    put_training_data(bot.store)
    # v1 in production, then a run that was held.
    final_text(bot, bot.slash("train seed=0"))
    first = bot.runner.submits[0]["run_id"]
    finish_run(bot.store, bot.runner, first, decision="deploy", version=1)
    deploy.publish(bot.store, bot.settings.model_name, f"runs/{first}/candidate/", run_id=first, by=ALICE)
    bot.service.refresh(first)
    final_text(bot, bot.slash("train seed=0"))
    held = bot.runner.submits[1]["run_id"]
    finish_run(bot.store, bot.runner, held, decision="hold", version=None, top1=0.96)
    bot.service.refresh(held)

    not_held = final_text(bot, bot.slash(f"deploy {first}"))
    assert "already" in not_held and "v1" in not_held and not_held.startswith("⚠️")

    text = final_text(bot, bot.slash(f"deploy {held}", user=BOB))
    assert f"Promoted run `{held}` to production as *v2*" in text
    assert deploy.read_alias(bot.store, bot.settings.model_name)["version"] == 2
    assert any("promoted run" in m.text and f"<@{BOB}>" in m.text for m in bot.standin.messages(bot.channel))

    text = final_text(bot, bot.slash("rollback"))
    assert "rolled back from v2 to *v1*" in text
    assert deploy.read_alias(bot.store, bot.settings.model_name)["version"] == 1
    actions = [e["action"] for e in bot.state.read_audit(10)]
    assert "promote" in actions and "rollback" in actions

    missing = final_text(bot, bot.slash("rollback v7"))
    assert "Could not roll back" in missing
    no_trace(missing)


def test_schedule_show_pause_resume(bot):
    assert "next weekly retrain" in final_text(bot, bot.slash("schedule"))
    assert "Weekly retrain paused" in final_text(bot, bot.slash("schedule pause"))
    assert bot.state.schedule_paused()
    assert "*paused*" in final_text(bot, bot.slash("schedule"))
    assert "Weekly retrain resumed" in final_text(bot, bot.slash("schedule resume", user=BOB))
    assert not bot.state.schedule_paused()
    assert any(f"<@{BOB}> resumed the weekly retrain" in m.text for m in bot.standin.messages(bot.channel))


def test_redis_down_gets_a_specific_answer_and_nothing_changes(tmp_path, caplog):
    """Redis is down (nothing listens on the port): the ack says so, specifically."""
    from devkit.localservices import free_port
    b = start_bot(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    try:
        with caplog.at_level(logging.WARNING, logger="bot.listeners"):
            reply = b.slash("status")
        assert reply.status == 200
        assert "ctbot can't reach its state store; nothing was changed" in reply.text
        no_trace(reply.text)
        assert any("state store is unreachable" in r.getMessage() for r in caplog.records)
        assert b.runner.submits == []
    finally:
        b.close()


# ---- commands ctbot does not serve ------------------------------------------------------------

def test_another_command_routed_here_is_answered_not_404(bot):
    """A second command name pointed at the same URL: Slack would show "dispatch_failed"
    for a 404; the user learns which command ctbot serves instead."""
    rurl = bot.standin.response_url(bot.channel, ALICE)
    status, raw = post(bot.url, command_body("train epochs=2", user=ALICE, channel_id=bot.channel,
                                             response_url=rurl, command="/train"))
    assert status == 200
    body = json.loads(raw)
    text = message_text(body)
    assert "ctbot does not serve `/train`: its command is `/ct`" in text and "`/ct help`" in text
    assert body.get("response_type") in (None, "ephemeral")
    assert bot.runner.submits == [] and bot.standin.calls("response") == []
