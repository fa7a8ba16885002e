"""Helpers for the bot's tests: requests signed exactly like Slack signs them, sent over
real HTTP to the running bot, and a bot wired to real Redis, a real store and the local
Slack stand-in.

The signature is computed here by hand (v0 HMAC-SHA256 over ``v0:{ts}:{body}``), not
with slack_sdk, so the tests check the bot against Slack's documented scheme.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import itertools
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"   # a test value, not a real secret
BOT_TOKEN = "xoxb-test-token"
ALICE, BOB = "U0ALICE01", "U0BOB0001"
_TRIGGERS = itertools.count(738474920)


# ---- signing and posting ---------------------------------------------------------------

def sign(secret: str, body: str, timestamp: int | None = None) -> dict:
    """Slack's request headers for ``body``: X-Slack-Request-Timestamp and X-Slack-Signature."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = f"v0:{ts}:{body}".encode()
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


def post(url: str, body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None,
         signature: str | None = None, content_type: str = "application/x-www-form-urlencoded",
         extra_headers: dict | None = None) -> tuple[int, str]:
    headers = {"Content-Type": content_type, **sign(secret, body, timestamp), **(extra_headers or {})}
    if signature is not None:
        headers["X-Slack-Signature"] = signature
    req = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def command_body(text: str, *, user: str, channel_id: str, response_url: str, command: str = "/ct",
                 team_id: str = "T0CTBOT00", trigger_id: str | None = None) -> str:
    """The form-encoded body of a slash command, field by field as Slack sends it. Each
    invocation gets its own trigger_id, as in Slack (a retry repeats the same body)."""
    if trigger_id is None:
        trigger_id = f"{int(time.time())}.{next(_TRIGGERS)}.{secrets.token_hex(10)}"
    return urllib.parse.urlencode({
        "token": "gIkuvaNzQIHg97ATvDxqgjtO", "team_id": team_id, "team_domain": "ctbot",
        "channel_id": channel_id, "channel_name": "ct", "user_id": user, "user_name": user.lower(),
        "command": command, "text": text, "api_app_id": "A0CTBOT00", "is_enterprise_install": "false",
        "response_url": response_url, "trigger_id": trigger_id})


@dataclass
class Reply:
    status: int
    body: dict | str
    response_url: str

    @property
    def rid(self) -> str:
        return self.response_url.rsplit("/", 1)[1]

    @property
    def text(self) -> str:
        """All the text of the ack (fallback + blocks), for asserts."""
        return message_text(self.body) if isinstance(self.body, dict) else str(self.body)


def message_text(msg: dict) -> str:
    """Every piece of text in a message: fallback, block texts, fields, buttons, confirms."""
    out = [msg.get("text") or ""]

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "text" and isinstance(v, str):
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(msg.get("blocks") or [])
    return "\n".join(out)


def buttons(blocks: list) -> dict:
    """action_id -> button element, for every button in the blocks."""
    return {e["action_id"]: e for b in blocks if b.get("type") == "actions" for e in b["elements"]}


# ---- the bot under test -----------------------------------------------------------------

@dataclass
class Bot:
    standin: object
    server: object
    service: object
    state: object
    store: object
    settings: object
    client: object
    notifier: object
    runner: object
    closers: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url + "/slack/events"

    @property
    def channel(self) -> str:
        return self.standin.channel_id(self.settings.slack_channel)

    def slash(self, text: str, user: str = ALICE, *, channel: str | None = None, team_id: str = "T0CTBOT00",
              **kw) -> Reply:
        channel = channel or self.channel
        rurl = self.standin.response_url(channel, user)
        trigger = kw.pop("trigger_id", None) or self.standin.new_trigger(user)   # one views.open takes
        status, raw = post(self.url, command_body(text, user=user, channel_id=channel, team_id=team_id,
                                                  response_url=rurl, command=self.settings.slash_command,
                                                  trigger_id=trigger), **kw)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = raw
        if status == 200:
            self.standin.record_ack(rurl, body)
        return Reply(status, body, rurl)

    def responses(self, reply: Reply, count: int = 1, timeout: float = 10) -> list[dict]:
        """The response_url posts the lazy work made for ``reply`` (waits for them)."""
        self.standin.wait_for("response", count, timeout, where=lambda a: a["rid"] == reply.rid)
        return self.standin.responses(reply.rid)

    def click(self, ts: str, action_id: str, user: str = ALICE, value: str | None = None, *,
              channel: str | None = None, team_id: str | None = None) -> Reply:
        payload = self.standin.action_payload(channel or self.channel, ts, action_id, user=user, value=value)
        if team_id is not None:   # as if from another workspace
            payload["team"] = {"id": team_id}
            payload["user"]["team_id"] = team_id
        body = "payload=" + urllib.parse.quote(json.dumps(payload))
        status, raw = post(self.url, body)
        return Reply(status, raw, payload["response_url"])

    def close(self) -> None:
        for c in reversed(self.closers):
            c()


def start_bot(tmp_path: Path, redis_url: str, *, store=None, runner=None, min_update_seconds: float = 0.0,
              usergroups: dict | None = None, channels: tuple = ("ct",), **settings_overrides) -> Bot:
    """The real app behind the real HTTP server, with real Redis, a real store and the
    Slack stand-in. The runner is the service tests' RecordingRunner unless one is given:
    a test finishes a run by writing what a pipeline writes into the store."""
    from bot.app import create_app
    from bot.server import serve_http
    from core.config import AccessSection, Settings
    from ctbot.wiring import build_deps
    from devkit.standin import SlackStandin
    from tests.recording import RecordingRunner

    # trigger_ttl=None: the stand-in does not expire trigger_ids here, so a loaded machine
    # can't fail a test by timing; test_standin_views checks the 3 s rule itself.
    standin = SlackStandin(bot_token=BOT_TOKEN, signing_secret=SIGNING_SECRET, channels=channels,
                           files_dir=tmp_path / "slack-files", usergroups=usergroups, trigger_ttl=None).start()
    settings = Settings(slack_bot_token=BOT_TOKEN, slack_signing_secret=SIGNING_SECRET,
                        slack_api_url=standin.api_url, slack_channel="#ct", redis_url=redis_url,
                        store=str(tmp_path / "store"), run_workdir=str(tmp_path / "runs"),
                        slack_min_update_seconds=min_update_seconds, **settings_overrides)
    if "access" not in settings_overrides:   # the test users may do everything, unless a test says otherwise
        settings.access = AccessSection(deploy=[ALICE, BOB], rollback=[ALICE, BOB], approve=[ALICE, BOB])
    runner = runner if runner is not None else RecordingRunner()
    deps = build_deps(settings, store=store, runner=runner)
    store, state, client, notifier, service = deps.store, deps.state, deps.client, deps.notifier.inner, deps.service
    app = create_app(settings, service, client)
    server = serve_http(app, "127.0.0.1", 0)
    return Bot(standin, server, service, state, store, settings, client, notifier, runner,
               closers=[standin.stop, app.background.shutdown, server.shutdown])


# ---- what a pipeline would have written -------------------------------------------------

def put_training_data(store, n_objects: int = 2) -> list[str]:
    """Small .npz objects under data/ so a run has a snapshot (the bot never reads them)."""
    import numpy as np
    keys = []
    for i in range(n_objects):
        buf = io.BytesIO()
        np.savez(buf, x=np.zeros((4, 28, 28), np.uint8), y=np.arange(4, dtype=np.uint8))
        keys.append(f"data/batch-{i}.npz")
        store.put_bytes(keys[-1], buf.getvalue())
    return keys


def write_step(store, run_id: str, step: str, state: str, seconds: float | None = None, **summary) -> None:
    now = time.time()
    store.put_json(f"runs/{run_id}/steps/{step}.json", {
        "step": step, "state": state, "started_at": now - (seconds or 0), "finished_at": now if seconds else None,
        "seconds": seconds, "summary": summary, "error": None})


def report(run_id: str, *, top1: float = 0.9812, prod_top1: float | None = 0.9790, decision: str = "deploy",
           version: int | None = 4, warnings: list[str] | None = None, reason: str | None = None) -> dict:
    from steps.params import TrainParams
    per_class = {str(c): round(top1 - 0.004 * (c % 5) + 0.002, 4) for c in range(10)}
    return {
        "run_id": run_id, "model": "mnist-arcface", "status": "succeeded",
        "params": {"epochs": 2, "lr": TrainParams().lr},     # lr at its default: not shown
        "data": {"n": 4000, "counts": {str(c): 400 for c in range(10)},
                 "sources": [{"uri": "s3://b/data/batch-0.npz", "size": 1000}], "fingerprint": "sha256:abc"},
        "eval": {"uri": "s3://b/eval/eval.npz", "n": 1000, "fingerprint": "sha256:def"},
        "validation": {"warnings": warnings if warnings is not None else ["class 7 has 3% fewer images"]},
        "timings": {"ingest": 0.4, "validate": 0.1, "train": 41.0, "embed": 3.2, "index": 0.2, "evaluate": 1.1},
        "total_seconds": 46.0,
        "metrics": {"top1": top1, "per_class": per_class,
                    "confusion": [[100 if i == j else 0 for j in range(10)] for i in range(10)]},
        "production": None if prod_top1 is None else {"version": 3, "top1": prod_top1},
        "decision": decision,
        "reason": reason or (f"top-1 {100 * top1:.2f}% >= floor 97.00%" if decision == "deploy"
                             else "top-1 regressed more than the tolerance vs production v3"),
        "model_version": version if decision == "deploy" else None,
        "failed_step": None, "error": None,
    }


def png_bytes() -> bytes:
    """A small real PNG (what the evaluate step writes as confusion.png)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()
