"""The HTTP server in front of Bolt: Slack's signature scheme, health, routing, bursts."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.slack_helpers import ALICE, SIGNING_SECRET, command_body, post, sign, start_bot


@pytest.fixture
def bot(tmp_path, redis_url):
    b = start_bot(tmp_path, redis_url)
    yield b
    b.close()


def body_for(bot, text="help"):
    return command_body(text, user=ALICE, channel_id=bot.channel,
                        response_url=bot.standin.response_url(bot.channel, ALICE))


def test_signature_matches_slacks_documented_example():
    """The example from Slack's 'Verifying requests' guide, so the helper signs like Slack."""
    body = ("token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
            "&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
            "&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
            "&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c")
    headers = sign("8f742231b10e8888abcd99yyyzzz85a5", body, 1531420618)
    assert headers["X-Slack-Signature"] == "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"


def test_correctly_signed_request_is_accepted(bot):
    status, raw = post(bot.url, body_for(bot))
    assert status == 200 and "ctbot: continuous training" in raw


@pytest.mark.parametrize("case", ["wrong secret", "tampered body", "bad signature", "missing signature"])
def test_bad_signatures_are_rejected(bot, case):
    body = body_for(bot)
    if case == "wrong secret":
        status, _ = post(bot.url, body, secret="not-the-secret")
    elif case == "tampered body":
        headers = sign(SIGNING_SECRET, body)
        status, _ = post(bot.url, body.replace("help", "runs"), timestamp=int(headers["X-Slack-Request-Timestamp"]),
                         signature=headers["X-Slack-Signature"])
    elif case == "bad signature":
        status, _ = post(bot.url, body, signature="v0=" + "0" * 64)
    else:
        req = urllib.request.Request(bot.url, data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            status = urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as e:
            status = e.code
    assert status == 401
    assert bot.standin.calls("response") == []


@pytest.mark.parametrize("age", [6 * 60, -6 * 60, 3600])
def test_stale_or_future_timestamps_are_rejected(bot, age):
    """Slack's replay window is five minutes; a correctly signed old request still fails."""
    status, _ = post(bot.url, body_for(bot), timestamp=int(time.time()) - age)
    assert status == 401


def test_timestamp_inside_the_window_is_accepted(bot):
    status, _ = post(bot.url, body_for(bot), timestamp=int(time.time()) - 4 * 60)
    assert status == 200


def test_healthz_and_unknown_paths(bot):
    with urllib.request.urlopen(bot.server.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read())["ok"] is True
    for method, path in (("GET", "/slack/events"), ("POST", "/nope"), ("GET", "/")):
        req = urllib.request.Request(bot.server.url + path, data=b"" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 404


def test_url_verification_challenge(bot):
    body = json.dumps({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                       "type": "url_verification"})
    status, raw = post(bot.url, body, content_type="application/json")
    assert status == 200 and "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in raw


def test_a_burst_of_commands_is_all_answered(bot):
    """40 commands at once from 20 clients: none refused or dropped (Bolt's own server drops some)."""
    def one(i):
        return post(bot.url, body_for(bot, "help" if i % 2 else "trian"))[0]
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(40)))
    assert statuses == [200] * 40


def test_app_home_is_published_when_opened(bot):
    out = bot.standin.event(bot.url, {"type": "app_home_opened", "user": ALICE, "channel": "D0ALICE", "tab": "home",
                                      "event_ts": f"{time.time():.6f}"})
    assert out["status"] == 200
    call = bot.standin.wait_for("views.publish")[0]
    assert call.args["user_id"] == ALICE
    view = bot.standin.home_views[ALICE]
    assert view["type"] == "home" and "ctbot: continuous training" in json.dumps(view)
