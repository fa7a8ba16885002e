"""The bot as it is deployed: `python -m bot` in its own process, configured from the
environment, talking to the Slack stand-in and a real Redis. Also the app manifest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from slack_sdk import WebClient

from bot import ids
from bot.blocks import new_data_alert
from bot.blocks.replies import SUBCOMMANDS
from core.config import Settings
from core.state import StateStore
from core.types import NewData
from devkit.standin import SlackStandin
from tests.helpers import wait_ready
from tests.slack_helpers import ALICE, BOT_TOKEN, SIGNING_SECRET, command_body, post

ROOT = Path(__file__).resolve().parents[2]


def wait_for_line(proc, prefix: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"bot did not print {prefix!r}; exit code {proc.poll()}")


@pytest.mark.parametrize("scheduler", [True, False], ids=["with-scheduler", "no-scheduler"])
def test_bot_process_serves_slack_without_torch(tmp_path, redis_url, scheduler):
    with SlackStandin(bot_token=BOT_TOKEN, signing_secret=SIGNING_SECRET) as standin:
        env = {**os.environ, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET,
               "SLACK_API_URL": standin.api_url, "REDIS_URL": redis_url, "CT_STORE": str(tmp_path / "store"),
               "CT_RUN_WORKDIR": str(tmp_path / "runs"), "CT_HTTP_PORT": "0", "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "ctbot.cli", "serve"] + ([] if scheduler else ["--no-scheduler"])
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = wait_for_line(proc, "ctbot serve: serving ")
            events_url = line.split()[-1]
            base = events_url.rsplit("/slack/events", 1)[0]
            wait_ready(base)        # job workers up: the command's slow half runs there
            with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
                health = json.loads(resp.read())
            assert health["ok"] is True and health["mode"] == "http" and health["scheduler"] is scheduler
            assert health["imports"] == {"torch": False, "faiss": False}

            rurl = standin.response_url("ct", ALICE)
            status, raw = post(events_url, command_body("status", user=ALICE, channel_id=standin.channel_id("ct"),
                                                        response_url=rurl))
            assert status == 200 and "Checking" in raw
            standin.wait_for("response", where=lambda a: a["rid"] == rurl.rsplit("/", 1)[1])
            answer = json.dumps(standin.responses(rurl.rsplit("/", 1)[1]))
            assert "ctbot status" in answer and "no model in production yet" in answer
            assert [c.method for c in standin.calls()][:1] == ["auth.test"]     # Bolt's one check

            # A button: its job runs in a worker process too (payload pickled across).
            alert = new_data_alert(NewData(keys=["data/x.npz"], total_bytes=1, fingerprint="f"), "alert-p")
            ts = WebClient(token=BOT_TOKEN, base_url=standin.api_url).chat_postMessage(channel="#ct", **alert)["ts"]
            payload = standin.action_payload("ct", ts, ids.DISMISS_ALERT, user=ALICE)
            status, _ = post(events_url, "payload=" + urllib.parse.quote(json.dumps(payload)))
            assert status == 200
            standin.wait_for("chat.update", where=lambda a: a.get("ts") == ts)
            assert "Dismissed by <@U0ALICE01>" in json.dumps(standin.message("ct", ts).blocks)
            audit = StateStore.from_url(redis_url).read_audit(1)[0]
            assert audit["action"] == "alert_dismissed" and audit["alert_id"] == "alert-p"
            with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
                assert json.loads(resp.read())["imports"]["torch"] is False    # still, after work
        finally:
            proc.terminate()
            out = proc.communicate(timeout=15)[0]
        assert proc.returncode == 0, out
        assert BOT_TOKEN not in out and SIGNING_SECRET not in out             # secrets never logged


def test_bot_refuses_to_start_without_its_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "CT_", "REDIS_URL"))}
    out = subprocess.run([sys.executable, "-m", "ctbot.cli", "serve"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "missing settings: SLACK_BOT_TOKEN, REDIS_URL, SLACK_SIGNING_SECRET" in out.stderr
    assert "Traceback" not in out.stderr


def test_manifest_matches_the_bot():
    m = yaml.safe_load((ROOT / "bot" / "manifest.yaml").read_text())
    (cmd,) = m["features"]["slash_commands"]
    assert cmd["command"] == Settings().slash_command
    hinted = {w.split()[0] for w in cmd["usage_hint"].split(" | ")}
    assert hinted == set(SUBCOMMANDS)                        # every subcommand, audit included
    # What a following app declares (ctbot itself needs no scope for metadata): valid YAML.
    text = (ROOT / "bot" / "manifest.yaml").read_text()
    lines = text[text.index("# metadata_subscriptions:"):].splitlines()
    snippet = [line.strip()[2:] for line in lines[:next(i for i, x in enumerate(lines) if "#" not in x)]]
    follower = yaml.safe_load("\n".join(snippet))
    assert follower["metadata_subscriptions"][0]["event_type"] == "ctbot_run"
    urls = {cmd["url"], m["settings"]["interactivity"]["request_url"], m["settings"]["event_subscriptions"]["request_url"]}
    assert len(urls) == 1 and urls.pop().endswith("/slack/events")           # the server's one endpoint
    assert m["settings"]["interactivity"]["is_enabled"] is True
    scopes = set(m["oauth_config"]["scopes"]["bot"])
    assert {"commands", "chat:write", "chat:write.public", "files:write", "channels:read"} <= scopes
    assert m["settings"]["event_subscriptions"]["bot_events"] == ["app_home_opened"]
    assert len(m["display_information"]["description"]) <= 140
    assert 174 <= len(m["display_information"]["long_description"]) <= 4000
