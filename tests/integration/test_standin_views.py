"""The Slack stand-in answers views.open/update/publish and message metadata as Slack's
Web API does, through the real WebClient: the bot's tests rely on it refusing what Slack
refuses."""
from __future__ import annotations

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from devkit.standin import SlackStandin

MODAL = {"type": "modal", "callback_id": "f", "title": {"type": "plain_text", "text": "Train a model"},
         "submit": {"type": "plain_text", "text": "Start"},
         "blocks": [{"type": "input", "block_id": "epochs", "label": {"type": "plain_text", "text": "Epochs"},
                     "element": {"type": "plain_text_input", "action_id": "v", "initial_value": "4"}}]}


@pytest.fixture
def slack():
    with SlackStandin() as standin:
        yield standin, WebClient(token=standin.bot_token, base_url=standin.api_url)


def error_of(call) -> tuple[str, list]:
    with pytest.raises(SlackApiError) as e:
        call()
    return e.value.response["error"], (e.value.response.get("response_metadata") or {}).get("messages", [])


def test_views_open_takes_a_trigger_once(slack):
    standin, client = slack
    assert error_of(lambda: client.views_open(trigger_id="1.2.forged", view=MODAL)) == \
        ("invalid_arguments", ["invalid `trigger_id`"])
    trigger = standin.new_trigger("U0ALICE01")
    view = client.views_open(trigger_id=trigger, view=MODAL)["view"]
    assert view["id"].startswith("V") and view["state"] == {"values": {}} and view["hash"]
    assert error_of(lambda: client.views_open(trigger_id=trigger, view=MODAL))[0] == "exchanged_trigger_id"
    assert [m["id"] for m in standin.modals("U0ALICE01")] == [view["id"]]


def test_an_old_trigger_is_expired(slack):
    standin, client = slack
    standin.trigger_ttl = 0.0
    assert error_of(lambda: client.views_open(trigger_id=standin.new_trigger("U0ALICE01"), view=MODAL))[0] == \
        "expired_trigger_id"


@pytest.mark.parametrize("change, message", [
    ({"title": {"type": "plain_text", "text": "x" * 25}}, "`title` must be plain_text of at most 24 characters"),
    ({"submit": None}, "a view with input blocks needs `submit`"),
    ({"private_metadata": "x" * 3001}, "`private_metadata` must be at most 3000 characters"),
    ({"blocks": [{"type": "divider"}] * 101}, "no more than 100 items allowed [json-pointer:/view/blocks]"),
])
def test_invalid_views_are_refused_with_slacks_messages(slack, change, message):
    standin, client = slack
    bad = {**MODAL, **change}
    err, messages = error_of(lambda: client.views_open(trigger_id=standin.new_trigger("U0ALICE01"), view=bad))
    assert err == "invalid_arguments" and message in messages


def test_views_update_checks_the_hash(slack):
    standin, client = slack
    view = client.views_open(trigger_id=standin.new_trigger("U0ALICE01"), view=MODAL)["view"]
    new = client.views_update(view_id=view["id"], hash=view["hash"], view={**MODAL, "callback_id": "g"})["view"]
    assert new["id"] == view["id"] and new["callback_id"] == "g"
    assert error_of(lambda: client.views_update(view_id=view["id"], hash=view["hash"], view=MODAL))[0] == \
        "hash_conflict"
    assert error_of(lambda: client.views_update(view_id="V404", view=MODAL))[0] == "not_found"


def test_views_publish_takes_100_blocks_and_not_more(slack):
    standin, client = slack
    home = {"type": "home", "blocks": [{"type": "divider"}] * 100}
    assert client.views_publish(user_id="U0ALICE01", view=home)["view"]["type"] == "home"
    assert len(standin.home_views["U0ALICE01"]["blocks"]) == 100
    assert error_of(lambda: client.views_publish(user_id="U0ALICE01", view={**home, "blocks": home["blocks"] * 2}))[0] \
        == "invalid_arguments"
    assert error_of(lambda: client.views_publish(user_id="U0NOBODY1", view=home))[0] == "user_not_found"


def test_message_metadata_is_kept_and_checked(slack):
    standin, client = slack
    md = {"event_type": "ctbot_run", "event_payload": {"run_id": "r-1", "status": "running"}}
    posted = client.chat_postMessage(channel="#ct", text="run", metadata=md)
    assert standin.message("ct", posted["ts"]).metadata == md
    client.chat_update(channel=posted["channel"], ts=posted["ts"], text="still")    # no metadata: kept
    assert standin.message("ct", posted["ts"]).metadata == md
    done = {"event_type": "ctbot_run", "event_payload": {"run_id": "r-1", "status": "succeeded"}}
    client.chat_update(channel=posted["channel"], ts=posted["ts"], text="done", metadata=done)
    assert standin.message("ct", posted["ts"]).metadata == done
    history = client.conversations_history(channel=posted["channel"], include_all_metadata=True)
    assert history["messages"][0]["metadata"] == done
    for bad in ({"event_type": "no spaces", "event_payload": {}}, {"event_type": "x"}, ["x"]):
        assert error_of(lambda b=bad: client.chat_postMessage(channel="#ct", text="x", metadata=b))[0] == \
            "invalid_metadata_format"
