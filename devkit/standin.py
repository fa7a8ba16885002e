"""A local stand-in for Slack, for tests and the demo.

It plays both sides of Slack on 127.0.0.1:

* the Web API the bot calls (``WebClient(base_url=standin.api_url)``): auth.test,
  chat.postMessage/update (with message metadata)/postEphemeral/getPermalink,
  conversations.info/join, views.open/update/publish (modals and the App Home), the
  three calls of files_upload_v2 (including the POST to the upload URL it hands out),
  and response_url POSTs (``/response/<id>``);
* the Slack that calls the bot: ``command()``, ``click()``, ``submit_view()`` and
  ``click_view()`` deliver signed slash commands, button clicks (in the channel or on
  the Home tab) and modal submissions to the bot's HTTP endpoint, like Slack does.

It records every call, keeps the channel as Slack would show it (messages updated in
place, threads, files, ephemeral replies), and renders a readable transcript.
It checks what real Slack checks where a bug would otherwise hide: the bot token,
unknown channels, the 50-block cap (100 in a view) and text lengths, five uses per
response_url, and trigger_ids as views.open takes them: issued by a delivery, used once,
within ``trigger_ttl`` seconds (Slack's 3 s by default).
"""
from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from slack_sdk.signature import SignatureVerifier

TEAM_ID = "T0CTBOT00"
BOT_USER = "U0CTBOT00"
BOT_ID = "B0CTBOT00"
APP_ID = "A0CTBOT00"
DEFAULT_USERS = {"U0ALICE01": "alice", "U0BOB0001": "bob"}
RESPONSE_URL_USES = 5          # Slack: a response_url works 5 times in 30 minutes
TRIGGER_TTL = 3.0              # Slack: a trigger_id must be exchanged within 3 seconds
MAX_VIEW_BLOCKS = 100          # Slack: blocks in a modal or Home tab (messages: 50)
MAX_VIEW_BYTES = 250_000       # Slack: view_too_large past 250 kB


@dataclass
class Call:
    method: str                  # Web API method, "upload", or "response"
    args: dict                   # merged query, form and JSON arguments (blocks decoded)
    at: float
    status: int = 200
    error: str = ""
    at_mono: float = field(default_factory=time.monotonic)   # for trigger ages


@dataclass
class Message:
    channel: str
    ts: str
    text: str = ""
    blocks: list = field(default_factory=list)
    user: str = BOT_USER
    thread_ts: str = ""
    files: list = field(default_factory=list)       # [{id, name, title, path}]
    ephemeral_to: str = ""                          # user id when only they can see it
    kind: str = "message"                           # message | command | ephemeral
    edits: int = 0
    deleted: bool = False
    replies: list = field(default_factory=list)
    history: list = field(default_factory=list)     # earlier (text, blocks), oldest first
    clicked: str = ""                               # for a click: the button's label
    metadata: dict = field(default_factory=dict)    # chat.postMessage's metadata, as Slack keeps it

    def edit(self, text: str, blocks: list) -> None:
        self.history.append((self.text, self.blocks))
        self.text, self.blocks, self.edits = text, blocks, self.edits + 1

    def to_payload(self) -> dict:
        """The ``message`` object Slack puts in a block_actions payload."""
        return {"type": "message", "ts": self.ts, "text": self.text, "blocks": self.blocks,
                "user": self.user, "bot_id": BOT_ID if self.user == BOT_USER else None,
                **({"thread_ts": self.thread_ts} if self.thread_ts else {})}


class SlackApiError(Exception):
    def __init__(self, error: str, *messages: str):
        super().__init__(error)
        self.error, self.messages = error, list(messages)


def _check_blocks(blocks, max_blocks: int = 50) -> None:
    """What Slack itself rejects with invalid_blocks (a deliberately small, independent check)."""
    if not isinstance(blocks, list) or len(blocks) > max_blocks:
        raise SlackApiError("invalid_blocks")
    for b in blocks:
        t = b.get("type") if isinstance(b, dict) else None
        txt = (b.get("text") or {}).get("text", "") if t in ("section", "header") else ""
        if t is None or (t == "header" and len(txt) > 150) or (t == "section" and len(txt) > 3000):
            raise SlackApiError("invalid_blocks")
        if t == "section" and (len(b.get("fields") or []) > 10 or
                               any(len(f.get("text", "")) > 2000 for f in b.get("fields") or [])):
            raise SlackApiError("invalid_blocks")
    if len(json.dumps(blocks)) > 50000:
        raise SlackApiError("msg_too_long")


INPUT_ELEMENTS = ("plain_text_input", "static_select", "number_input", "checkboxes", "radio_buttons")


def _plain(obj, limit: int) -> bool:
    """A plain_text object within ``limit`` characters."""
    return isinstance(obj, dict) and obj.get("type") == "plain_text" and 0 < len(obj.get("text") or "") <= limit


def _check_view(view) -> dict:
    """A view as views.open/update/publish take it (JSON string or object); invalid_arguments
    names what Slack would name."""
    if isinstance(view, str):
        try:
            view = json.loads(view)
        except ValueError:
            raise SlackApiError("invalid_arguments", "failed to parse `view`") from None
    if not isinstance(view, dict) or view.get("type") not in ("modal", "home"):
        raise SlackApiError("invalid_arguments", "`view.type` must be modal or home")
    if len(json.dumps(view)) > MAX_VIEW_BYTES:
        raise SlackApiError("view_too_large")
    blocks = view.get("blocks") or []
    problems = []
    if view["type"] == "modal":
        if not _plain(view.get("title"), 24):
            problems.append("`title` must be plain_text of at most 24 characters")
        for key in ("submit", "close"):
            if view.get(key) is not None and not _plain(view[key], 24):
                problems.append(f"`{key}` must be plain_text of at most 24 characters")
        if any(b.get("type") == "input" for b in blocks) and view.get("submit") is None:
            problems.append("a view with input blocks needs `submit`")
    if len(str(view.get("private_metadata") or "")) > 3000:
        problems.append("`private_metadata` must be at most 3000 characters")
    if len(str(view.get("callback_id") or "")) > 255:
        problems.append("`callback_id` must be at most 255 characters")
    block_ids = [b.get("block_id") for b in blocks if b.get("block_id")]
    if len(block_ids) != len(set(block_ids)):
        problems.append("`block_id`s must be unique")
    for i, b in enumerate(blocks):
        if b.get("type") != "input":
            continue
        el = b.get("element") or {}
        if not _plain(b.get("label"), 2000):
            problems.append(f"block {i}: an input's `label` must be plain_text of at most 2000 characters")
        if el.get("type") not in INPUT_ELEMENTS or not el.get("action_id"):
            problems.append(f"block {i}: an input needs an element with an action_id")
        if b.get("hint") is not None and not _plain(b["hint"], 2000):
            problems.append(f"block {i}: `hint` must be plain_text of at most 2000 characters")
        if el.get("type") == "static_select":
            values = [o.get("value") for o in el.get("options") or []]
            if not values or len(values) > 100:
                problems.append(f"block {i}: a static_select needs 1-100 options")
            init = (el.get("initial_option") or {}).get("value")
            if init is not None and init not in values:
                problems.append(f"block {i}: `initial_option` is not one of the options")
        if el.get("type") == "plain_text_input" and len(str(el.get("initial_value") or "")) > 3000:
            problems.append(f"block {i}: `initial_value` over 3000 characters")
    if len(blocks) > MAX_VIEW_BLOCKS:
        problems.append(f"no more than {MAX_VIEW_BLOCKS} items allowed [json-pointer:/view/blocks]")
    if problems:
        raise SlackApiError("invalid_arguments", *problems)
    try:
        _check_blocks([b for b in blocks if b.get("type") != "input"], MAX_VIEW_BLOCKS)
    except SlackApiError:
        raise SlackApiError("invalid_arguments", "`blocks` breaks Block Kit's limits") from None
    return view


def _check_metadata(raw) -> dict | None:
    """chat.postMessage/update's ``metadata``: {event_type, event_payload}, or absent."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise SlackApiError("invalid_metadata_format") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("event_type"), str) \
            or not raw["event_type"].replace("_", "").isalnum() or not isinstance(raw.get("event_payload"), dict):
        raise SlackApiError("invalid_metadata_format")
    if len(json.dumps(raw)) > 8000:
        raise SlackApiError("metadata_too_large")
    return raw


class SlackStandin:
    def __init__(self, *, bot_token: str = "xoxb-standin", signing_secret: str = "standin-secret",
                 channels: tuple[str, ...] = ("ct",), users: dict | None = None,
                 files_dir: str | Path | None = None, command: str = "/ct", host: str = "127.0.0.1",
                 usergroups: dict | None = None, trigger_ttl: float = TRIGGER_TTL):
        self.bot_token = bot_token
        self.signing_secret = signing_secret
        self.command_name = command
        self.users = dict(users or DEFAULT_USERS)
        self.files_dir = Path(files_dir) if files_dir else None
        self._host = host
        self._lock = threading.Condition()
        self._calls: list[Call] = []
        self._channels: dict[str, str] = {}            # id -> name
        self._timeline: list[Message] = []             # top-level items in order
        self._by_ts: dict[tuple[str, str], Message] = {}
        self._responses: dict[str, dict] = {}          # rid -> {channel, user, uses, message, posts}
        self._files: dict[str, dict] = {}
        self._fail: dict[str, list] = {}
        self._outage: tuple | None = None              # every Web API call fails while set
        self.home_views: dict[str, dict] = {}          # user id -> last published Home tab
        self.views: dict[str, dict] = {}               # view id -> the view as Slack keeps it (modals, homes)
        self.view_users: dict[str, str] = {}           # view id -> the user it is shown to
        self.trigger_ttl = trigger_ttl
        self._triggers: dict[str, dict] = {}           # trigger_id -> {user, at, used}
        self.usergroups: dict[str, list] = dict(usergroups or {})   # S… -> member user ids
        self._seq = itertools.count(1)
        for name in channels:
            self.add_channel(name)
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> SlackStandin:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                standin._handle(self, b"")

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                standin._handle(self, self.rfile.read(n) if n else b"")

        self._server = ThreadingHTTPServer((self._host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="slack-standin").start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    # ---- inspection ----------------------------------------------------------------
    def add_channel(self, name: str) -> str:
        name = name.lstrip("#")
        cid = "C" + name.upper().replace("-", "").replace("_", "")[:6].ljust(6, "0") + f"{len(self._channels):02d}"
        self._channels[cid] = name
        return cid

    def channel_id(self, name_or_id: str) -> str:
        key = (name_or_id or "").lstrip("#")
        if key in self._channels:
            return key
        for cid, name in self._channels.items():
            if name == key:
                return cid
        raise SlackApiError("channel_not_found")

    def calls(self, method: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if method is None or c.method == method]

    def wait_for(self, method: str, count: int = 1, timeout: float = 10.0, where=None) -> list[Call]:
        """Block until ``count`` successful calls of ``method`` (matching ``where``) were seen.
        The bot does slow work after its ack, so tests wait here instead of sleeping."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [c for c in self._calls if c.method == method and c.status == 200 and not c.error
                         and (where is None or where(c.args))]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(c.method, c.status, c.error) for c in self._calls[-10:]]
                    raise TimeoutError(f"waited {timeout}s for {count} x {method}; last calls: {seen}")
                self._lock.wait(left)

    def messages(self, channel: str | None = None) -> list[Message]:
        """Top-level messages (not ephemeral) in a channel, oldest first."""
        cid = self.channel_id(channel) if channel else None
        with self._lock:
            return [m for m in self._timeline if m.kind == "message" and not m.deleted
                    and (cid is None or m.channel == cid)]

    def message(self, channel: str, ts: str) -> Message:
        with self._lock:
            return self._by_ts[(self.channel_id(channel), ts)]

    def thread(self, channel: str, ts: str) -> list[Message]:
        return list(self.message(channel, ts).replies)

    def ephemerals(self, user: str | None = None) -> list[Message]:
        with self._lock:
            return [m for m in self._timeline if m.kind == "ephemeral" and not m.deleted
                    and (user is None or m.ephemeral_to == user)]

    def responses(self, rid: str | None = None) -> list[dict]:
        """Bodies posted to response_urls (all, or those of one response id)."""
        with self._lock:
            return [dict(p) for r, info in self._responses.items() if rid in (None, r) for p in info["posts"]]

    def uploaded(self, file_id: str | None = None) -> dict:
        """file_id -> {name, title, bytes, path, channel, thread_ts}."""
        with self._lock:
            return {k: dict(v) for k, v in self._files.items() if file_id in (None, k)}

    def save_files(self, directory: str | Path) -> list[Path]:
        """Write every uploaded file to ``directory``; later transcripts show these paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        with self._lock:
            for fid, info in self._files.items():
                if info["bytes"] is None:
                    continue
                path = directory / f"{fid}-{Path(info['name']).name}"
                path.write_bytes(info["bytes"])
                info["path"] = str(path)
                for m in self._all_messages():
                    for f in m.files:
                        if f["id"] == fid:
                            f["path"] = str(path)
                out.append(path)
        return out

    def _all_messages(self):
        for m in self._timeline:
            yield m
            yield from m.replies

    def fail_next(self, method: str, *, status: int = 429, retry_after: int = 1, times: int = 1,
                  after_effect: bool = False, delay: float = 0.0) -> None:
        """The next ``times`` calls of ``method`` fail: HTTP ``status`` (429 with
        Retry-After, 500 without), after ``delay`` seconds. With ``after_effect`` the
        call takes effect first and only its reply is lost, as when a connection drops."""
        with self._lock:
            self._fail.setdefault(method, []).extend([(status, retry_after, after_effect, delay)] * times)

    def outage(self, status: int = 500, retry_after: int = 1) -> None:
        """Slack is down: every Web API call fails with HTTP ``status`` (429 with
        Retry-After) until ``end_outage()``. Calls are still recorded, with the status."""
        with self._lock:
            self._outage = (status, retry_after, False, 0.0)

    def end_outage(self) -> None:
        with self._lock:
            self._outage = None

    # ---- Slack -> app: signed deliveries --------------------------------------------
    def response_url(self, channel: str, user: str, message_ts: str = "") -> str:
        rid = f"R{next(self._seq):06d}"
        with self._lock:
            self._responses[rid] = {"channel": self.channel_id(channel), "user": user, "uses": 0,
                                    "message_ts": message_ts, "posts": [], "last": None}
        return f"{self.url}/response/{rid}"

    def new_trigger(self, user: str) -> str:
        """A trigger_id as Slack puts in a command, click or submission: views.open takes
        it once, within ``trigger_ttl`` seconds."""
        tid = f"{next(self._seq)}.{int(time.time())}.{secrets.token_hex(8)}"
        with self._lock:
            self._triggers[tid] = {"user": user, "at": time.monotonic(), "used": False}
        return tid

    def trigger_age(self, trigger_id: str, at: float) -> float | None:
        """Seconds from a trigger's issue to ``at`` (a Call's monotonic ``at_mono``)."""
        info = self._triggers.get(trigger_id)
        return None if info is None else at - info["at"]

    def modals(self, user: str | None = None, open_only: bool = True) -> list[dict]:
        """Modals opened (for ``user``), oldest first; each {id, view, user, open, errors}."""
        with self._lock:
            return [dict(v, user=self.view_users.get(vid, "")) for vid, v in self.views.items()
                    if v["view"]["type"] == "modal" and (user is None or self.view_users.get(vid) == user)
                    and (v["open"] or not open_only)]

    def signed_headers(self, body: str, timestamp: int | None = None) -> dict:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        sig = SignatureVerifier(self.signing_secret).generate_signature(timestamp=ts, body=body)
        return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}

    def _deliver(self, app_url: str, body: str, content_type: str) -> tuple[int, str]:
        req = urllib.request.Request(app_url, data=body.encode(), method="POST",
                                     headers={"Content-Type": content_type, **self.signed_headers(body)})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def command_form(self, text: str, *, user: str = "U0ALICE01", channel: str = "ct") -> dict:
        """The form fields Slack sends for ``/ct <text>``, with a fresh response_url, and
        the command shown in the channel's transcript."""
        cid = self.channel_id(channel)
        with self._lock:
            self._append(Message(channel=cid, ts=self._new_ts(), text=f"{self.command_name} {text}".strip(),
                                 user=user, kind="command"))
        return {"token": "legacy-verification-token", "team_id": TEAM_ID, "team_domain": "ctbot",
                "channel_id": cid, "channel_name": self._channels[cid], "user_id": user,
                "user_name": self.users.get(user, user), "command": self.command_name, "text": text,
                "api_app_id": APP_ID, "response_url": self.response_url(cid, user),
                "trigger_id": self.new_trigger(user)}

    def action_payload(self, channel: str, ts: str, action_id: str, *, user: str = "U0ALICE01",
                       value: str | None = None) -> dict:
        """The block_actions payload Slack sends when ``user`` clicks button ``action_id``
        on a channel message (after confirming its dialog, if it has one)."""
        cid = self.channel_id(channel)
        msg = self.message(cid, ts)
        block, button = _find_button(msg.blocks, action_id, value)
        with self._lock:
            self._append(Message(channel=cid, ts=self._new_ts(), user=user, kind="command",
                                 text=f"clicked [{button['text']['text']}] on the message of {ts}",
                                 clicked=button["text"]["text"]))
        return {
            "type": "block_actions", "api_app_id": APP_ID, "token": "legacy-verification-token",
            "user": {"id": user, "username": self.users.get(user, user), "name": self.users.get(user, user),
                     "team_id": TEAM_ID},
            "team": {"id": TEAM_ID, "domain": "ctbot"},
            "container": {"type": "message", "message_ts": ts, "channel_id": cid, "is_ephemeral": False},
            "channel": {"id": cid, "name": self._channels[cid]},
            "message": msg.to_payload(),
            "trigger_id": self.new_trigger(user),
            "response_url": self.response_url(cid, user, message_ts=ts),
            "state": {"values": {}},
            "actions": [{"type": "button", "action_id": action_id, "block_id": block.get("block_id", ""),
                         "text": button.get("text"), "value": button.get("value"), "style": button.get("style"),
                         "action_ts": f"{time.time():.6f}"}],
        }

    def record_ack(self, response_url: str, body) -> None:
        """Show a command's ack body as its first ephemeral reply, as Slack does."""
        if isinstance(body, dict) and (body.get("text") or body.get("blocks")):
            self._respond(response_url.rsplit("/", 1)[1], body, count_use=False)

    def command(self, app_url: str, text: str, *, user: str = "U0ALICE01", channel: str = "ct") -> dict:
        """Deliver ``/ct <text>`` to the bot, signed. Returns {status, body, response_url}."""
        form = self.command_form(text, user=user, channel=channel)
        status, raw = self._deliver(app_url, urllib.parse.urlencode(form), "application/x-www-form-urlencoded")
        body = _maybe_json(raw)
        if status == 200:
            self.record_ack(form["response_url"], body)
        return {"status": status, "body": body, "response_url": form["response_url"]}

    def click(self, app_url: str, channel: str, ts: str, action_id: str, *, user: str = "U0ALICE01",
              value: str | None = None) -> dict:
        """Deliver a button click to the bot, signed. Returns {status, body, response_url}."""
        payload = self.action_payload(channel, ts, action_id, user=user, value=value)
        status, raw = self._deliver(app_url, "payload=" + urllib.parse.quote(json.dumps(payload)),
                                    "application/x-www-form-urlencoded")
        return {"status": status, "body": _maybe_json(raw), "response_url": payload["response_url"]}

    def event(self, app_url: str, event: dict) -> dict:
        """Deliver an Events API event (e.g. app_home_opened) in its event_callback envelope."""
        envelope = {"token": "legacy-verification-token", "team_id": TEAM_ID, "api_app_id": APP_ID,
                    "type": "event_callback", "event_id": f"Ev{next(self._seq):08d}",
                    "event_time": int(time.time()), "event": event,
                    "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER, "is_bot": True}]}
        status, raw = self._deliver(app_url, json.dumps(envelope), "application/json")
        return {"status": status, "body": _maybe_json(raw)}

    def view_state(self, view: dict, values: dict | None = None) -> dict:
        """``state.values`` of a view as Slack sends it on submit: every input as the user
        left it, the form's initial values unless ``values`` ({block_id: text or option
        value}) changes them."""
        values, out = values or {}, {}
        for b in view.get("blocks") or []:
            if b.get("type") != "input":
                continue
            el, bid = b.get("element") or {}, b.get("block_id", "")
            if el.get("type") == "static_select":
                chosen = values.get(bid, (el.get("initial_option") or {}).get("value"))
                option = next((o for o in el.get("options") or [] if o.get("value") == chosen), None)
                if chosen is not None and option is None:
                    raise KeyError(f"{chosen!r} is not an option of {bid}")
                out[bid] = {el["action_id"]: {"type": "static_select", "selected_option": option}}
            else:
                text = values.get(bid, el.get("initial_value"))
                out[bid] = {el["action_id"]: {"type": el.get("type"), "value": text if text != "" else None}}
        return {"values": out}

    def submit_view(self, app_url: str, view_id: str, values: dict | None = None) -> dict:
        """The user presses the modal's submit button. As Slack, an empty required input is
        refused in the client (nothing is sent); otherwise a signed view_submission goes to
        the bot, and its answer closes the modal (an empty 200), shows errors next to fields
        (``response_action: errors``) or replaces the view. Returns {status, body, errors}."""
        with self._lock:
            kept = self.views[view_id]
            view, user = kept["view"], self.view_users[view_id]
        state = self.view_state(view, values)
        missing = {bid: "Please fill out this field." for b in view.get("blocks") or []
                   if b.get("type") == "input" and not b.get("optional")
                   for bid in [b.get("block_id", "")]
                   if all((v.get("value") in (None, "") and v.get("selected_option") is None)
                          for v in state["values"][bid].values())}
        if missing:
            with self._lock:
                kept["errors"] = missing
            return {"status": None, "body": None, "errors": missing}
        payload = {"type": "view_submission", "team": {"id": TEAM_ID, "domain": "ctbot"},
                   "user": {"id": user, "username": self.users.get(user, user), "name": self.users.get(user, user),
                            "team_id": TEAM_ID},
                   "api_app_id": APP_ID, "token": "legacy-verification-token", "trigger_id": self.new_trigger(user),
                   "view": {**view, "state": state}, "response_urls": [], "is_enterprise_install": False}
        status, raw = self._deliver(app_url, "payload=" + urllib.parse.quote(json.dumps(payload)),
                                    "application/x-www-form-urlencoded")
        body = _maybe_json(raw)
        errors = {}
        with self._lock:
            self._calls.append(Call("view_submission", {"view_id": view_id, "user": user, "state": state,
                                                        "answer": body}, time.time(), status=status))
            action = body.get("response_action") if isinstance(body, dict) else None
            inputs = {b.get("block_id") for b in view.get("blocks") or [] if b.get("type") == "input"}
            if status != 200:
                errors = {"": "We had some trouble connecting. Try again?"}
            elif action == "errors":
                errors = dict(body.get("errors") or {})
                if not errors or set(errors) - inputs:   # Slack refuses errors for blocks that are not inputs
                    errors = {"": "We had some trouble connecting. Try again?"}
            elif action == "update":
                kept["history"].append(view)
                kept["view"] = {**_check_view(body.get("view")), "id": view_id}
            elif action in (None, "clear") and not raw:
                kept["open"] = False
            elif action is None:     # a 200 whose body is not a response_action: Slack shows an error
                errors = {"": "We had some trouble connecting. Try again?"}
            kept["errors"] = errors
            kept["state"] = state
            self._lock.notify_all()
        return {"status": status, "body": body, "errors": errors}

    def view_action_payload(self, user: str, action_id: str, *, value: str | None = None,
                            view_id: str | None = None) -> dict:
        """The block_actions payload of a click on a button in a view: ``user``'s Home tab
        unless ``view_id`` names a modal. As in Slack it has no channel and no response_url."""
        with self._lock:
            view = self.views[view_id]["view"] if view_id else self.home_views[user]
        block, button = _find_button(view.get("blocks") or [], action_id, value)
        return {"type": "block_actions", "api_app_id": APP_ID, "token": "legacy-verification-token",
                "user": {"id": user, "username": self.users.get(user, user), "name": self.users.get(user, user),
                         "team_id": TEAM_ID},
                "team": {"id": TEAM_ID, "domain": "ctbot"}, "is_enterprise_install": False,
                "container": {"type": "view", "view_id": view["id"]},
                "trigger_id": self.new_trigger(user), "view": view,
                "actions": [{"type": "button", "action_id": action_id, "block_id": block.get("block_id", ""),
                             "text": button.get("text"), "value": button.get("value"),
                             "style": button.get("style"), "action_ts": f"{time.time():.6f}"}]}

    def click_view(self, app_url: str, user: str, action_id: str, *, value: str | None = None,
                   view_id: str | None = None) -> dict:
        """Deliver a click on a button of ``user``'s Home tab (or a modal), signed."""
        payload = self.view_action_payload(user, action_id, value=value, view_id=view_id)
        status, raw = self._deliver(app_url, "payload=" + urllib.parse.quote(json.dumps(payload)),
                                    "application/x-www-form-urlencoded")
        return {"status": status, "body": _maybe_json(raw), "trigger_id": payload["trigger_id"]}

    # ---- transcript ----------------------------------------------------------------
    def transcript(self) -> str:
        with self._lock:
            lines = []
            for m in self._timeline:
                if m.deleted:
                    continue
                lines += _render_message(m, self.users, self._channels)
                for r in m.replies:
                    lines += ["    " + line for line in _render_message(r, self.users, self._channels)]
            return "\n".join(lines) + "\n"

    def save_transcript(self, path: str | Path, echo: bool = False) -> Path:
        text = self.transcript()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if echo:
            print(text)
        return path

    def save_view_html(self, path: str | Path, *, home_of: str | None = None, view_id: str | None = None) -> Path:
        """Write ``home_of``'s Home tab, or the modal ``view_id`` (with the errors of its last
        submission next to their fields), as a page that looks like Slack."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if home_of is not None:
                kept = next(v for vid, v in self.views.items()
                            if self.view_users[vid] == home_of and v["view"]["type"] == "home")
                user = home_of
            else:
                kept, user = self.views[view_id], self.view_users[view_id]
            page = render_view_page(self, kept, user)
        path.write_text(page, encoding="utf-8")
        return path

    def save_html(self, path: str | Path, channel: str | None = None) -> Path:
        """Write the channel as a self-contained page that looks like Slack, with the
        uploaded files beside it (referenced relatively, so the folder can be moved)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hrefs = {}
        with self._lock:
            for fid, info in self._files.items():
                if info["bytes"] is not None:
                    name = f"{fid}-{Path(info['name']).name}"
                    (path.parent / name).write_bytes(info["bytes"])
                    hrefs[fid] = name
            page = render_page(self, self.channel_id(channel) if channel else next(iter(self._channels)), hrefs)
        path.write_text(page, encoding="utf-8")
        return path

    # ---- HTTP handling ---------------------------------------------------------------
    def _new_ts(self) -> str:
        return f"{int(time.time())}.{next(self._seq):06d}"

    def _append(self, m: Message) -> None:
        self._timeline.append(m)
        self._by_ts[(m.channel, m.ts)] = m

    def _handle(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        parts = parsed.path.strip("/").split("/")
        try:
            if parts[0] == "api" and len(parts) == 2:
                status, body, headers = self._api(parts[1], h, parsed.query, raw)
            elif parts[0] == "upload" and len(parts) == 2:
                status, body, headers = self._upload(parts[1], raw)
            elif parts[0] == "response" and len(parts) == 2:
                status, body, headers = self._response_post(parts[1], raw)
            elif parts[0] == "archives":
                status, body, headers = 200, "permalink target", {}
            else:
                status, body, headers = 404, "not found", {}
        except Exception as e:  # the stand-in must answer, even on its own bugs
            status, body, headers = 500, f"standin error: {type(e).__name__}: {e}", {}
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _args(self, h, query: str, raw: bytes) -> dict:
        args = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        ctype = h.headers.get("Content-Type", "")
        if raw and "json" in ctype:
            args.update(json.loads(raw))
        elif raw:
            args.update({k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode()).items()})
        for key in ("blocks", "files", "attachments", "view", "metadata"):
            if isinstance(args.get(key), str):
                try:
                    args[key] = json.loads(args[key])
                except ValueError:
                    pass
        return args

    def _api(self, method: str, h, query: str, raw: bytes):
        args = self._args(h, query, raw)
        with self._lock:
            call = Call(method, args, time.time())
            self._calls.append(call)
            fails = self._fail.get(method)
            fault = fails.pop(0) if fails else self._outage
        if fault and fault[3]:
            time.sleep(fault[3])   # slow, outside the lock: other calls go on
        with self._lock:
            if fault and not fault[2]:
                return self._fault(call, fault)
            auth = h.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else args.get("token", "")
            try:
                if self.bot_token and token != self.bot_token:
                    raise SlackApiError("invalid_auth" if token else "not_authed")
                handler = getattr(self, "_m_" + method.replace(".", "_"), None)
                if handler is None:
                    raise SlackApiError("unknown_method")
                result = {"ok": True, **handler(args)}
            except SlackApiError as e:
                call.error = e.error
                result = {"ok": False, "error": e.error,
                          **({"response_metadata": {"messages": e.messages}} if e.messages else {})}
            if fault:   # it happened, but the caller never hears so
                return self._fault(call, fault)
            self._lock.notify_all()
            return 200, result, {}

    def _fault(self, call: Call, fault: tuple):
        status, retry_after = fault[0], fault[1]
        error = "ratelimited" if status == 429 else "internal_error"
        call.status, call.error = status, error
        self._lock.notify_all()
        headers = {"Retry-After": str(retry_after)} if status == 429 else {}
        return status, {"ok": False, "error": error}, headers

    # Web API methods (called with the lock held) ------------------------------------
    def _m_auth_test(self, a):
        return {"url": self.url + "/", "team": "ctbot", "user": "ctbot", "team_id": TEAM_ID,
                "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False}

    def _content(self, a) -> tuple[str, list]:
        blocks = a.get("blocks") or []
        text = a.get("text") or ""
        if not text and not blocks:
            raise SlackApiError("no_text")
        if blocks:
            _check_blocks(blocks)
        if len(text) > 40000:
            raise SlackApiError("msg_too_long")
        return text, blocks

    def _m_chat_postMessage(self, a):
        cid = self.channel_id(a.get("channel", ""))
        text, blocks = self._content(a)
        m = Message(channel=cid, ts=self._new_ts(), text=text, blocks=blocks, thread_ts=a.get("thread_ts") or "",
                    metadata=_check_metadata(a.get("metadata")) or {})
        if m.thread_ts:
            parent = self._by_ts.get((cid, m.thread_ts))
            if parent is None:
                raise SlackApiError("thread_not_found")
            parent.replies.append(m)
            self._by_ts[(cid, m.ts)] = m
        else:
            self._append(m)
        return {"channel": cid, "ts": m.ts, "message": m.to_payload()}

    def _history_item(self, m: Message, metadata: bool) -> dict:
        item = {"type": "message", "ts": m.ts, "text": m.text, "user": m.user,
                **({"thread_ts": m.thread_ts} if m.thread_ts else {}),
                **({"files": [{"id": f.get("id"), "name": f.get("name"), "title": f.get("title")}
                              for f in m.files]} if m.files else {})}
        if metadata and m.metadata:
            item["metadata"] = m.metadata
        return item

    def _m_usergroups_users_list(self, a):
        group = a.get("usergroup", "")
        if group not in self.usergroups:
            raise SlackApiError("no_such_subteam")
        return {"users": list(self.usergroups[group])}

    def _m_conversations_list(self, a):
        return {"channels": [{"id": cid, "name": name, "is_channel": True, "is_member": True}
                             for cid, name in self._channels.items()],
                "response_metadata": {"next_cursor": ""}}

    def _m_conversations_history(self, a):
        """Newest first, like Slack; metadata only with include_all_metadata."""
        cid = self.channel_id(a.get("channel", ""))
        limit = int(a.get("limit") or 100)
        want_md = str(a.get("include_all_metadata", "")).lower() in ("1", "true")
        top = [m for m in self._timeline if m.channel == cid and not m.deleted and not m.ephemeral_to]
        return {"messages": [self._history_item(m, want_md) for m in reversed(top)][:limit], "has_more": False}

    def _m_conversations_replies(self, a):
        cid = self.channel_id(a.get("channel", ""))
        parent = self._by_ts.get((cid, a.get("ts", "")))
        if parent is None:
            raise SlackApiError("thread_not_found")
        want_md = str(a.get("include_all_metadata", "")).lower() in ("1", "true")
        limit = int(a.get("limit") or 100)
        return {"messages": [self._history_item(m, want_md) for m in [parent, *parent.replies]][:limit],
                "has_more": False}

    def _m_chat_update(self, a):
        cid = self.channel_id(a.get("channel", ""))
        m = self._by_ts.get((cid, a.get("ts", "")))
        if m is None or m.deleted:
            raise SlackApiError("message_not_found")
        text, blocks = self._content(a)
        metadata = _check_metadata(a.get("metadata"))
        m.edit(text, blocks)
        if metadata is not None:   # as Slack: an update without metadata keeps the message's
            m.metadata = metadata
        return {"channel": cid, "ts": m.ts, "text": text, "message": m.to_payload()}

    def _m_chat_postEphemeral(self, a):
        cid = self.channel_id(a.get("channel", ""))
        if not a.get("user"):
            raise SlackApiError("user_not_in_channel")
        text, blocks = self._content(a)
        m = Message(channel=cid, ts=self._new_ts(), text=text, blocks=blocks, kind="ephemeral",
                    ephemeral_to=a["user"])
        self._append(m)
        return {"message_ts": m.ts}

    def _m_chat_getPermalink(self, a):
        cid = self.channel_id(a.get("channel", ""))
        ts = a.get("message_ts", "")
        if (cid, ts) not in self._by_ts:
            raise SlackApiError("message_not_found")
        return {"channel": cid, "permalink": f"{self.url}/archives/{cid}/p{ts.replace('.', '')}"}

    def _m_conversations_info(self, a):
        cid = self.channel_id(a.get("channel", ""))
        return {"channel": {"id": cid, "name": self._channels[cid], "is_channel": True, "is_member": True}}

    def _m_conversations_join(self, a):
        return self._m_conversations_info(a)

    def _m_views_publish(self, a):
        if not a.get("user_id") or a["user_id"] not in self.users:
            raise SlackApiError("invalid_arguments" if not a.get("user_id") else "user_not_found")
        view = _check_view(a.get("view"))
        if view["type"] != "home":
            raise SlackApiError("invalid_arguments", "`view.type` must be home")
        old = next((vid for vid, u in self.view_users.items()
                    if u == a["user_id"] and self.views[vid]["view"]["type"] == "home"), None)
        if old and a.get("hash") and a["hash"] != self.views[old]["view"]["hash"]:
            raise SlackApiError("hash_conflict")
        kept = self._keep_view(view, a["user_id"], old)
        self.home_views[a["user_id"]] = kept
        return {"view": kept}

    def _keep_view(self, view: dict, user: str, view_id: str | None = None) -> dict:
        """Store a view as Slack returns it: with an id, a fresh hash and an empty state."""
        vid = view_id or f"V{next(self._seq):08d}"
        kept = {**view, "id": vid, "team_id": TEAM_ID, "app_id": APP_ID, "bot_id": BOT_ID,
                "hash": f"{int(time.time())}.{secrets.token_hex(4)}", "state": {"values": {}},
                "private_metadata": view.get("private_metadata") or "", "callback_id": view.get("callback_id") or "",
                "external_id": view.get("external_id") or "", "root_view_id": vid}
        self.views[vid] = {"id": vid, "view": kept, "open": True, "errors": {}, "history": []}
        self.view_users[vid] = user
        return kept

    def _m_views_open(self, a):
        tid = a.get("trigger_id") or ""
        if not tid:
            raise SlackApiError("invalid_arguments", "missing required field: trigger_id")
        info = self._triggers.get(tid)
        if info is None:
            raise SlackApiError("invalid_arguments", "invalid `trigger_id`")
        view = _check_view(a.get("view"))
        if view["type"] != "modal":
            raise SlackApiError("invalid_arguments", "`view.type` must be modal")
        if info["used"]:
            raise SlackApiError("exchanged_trigger_id")
        if self.trigger_ttl is not None and time.monotonic() - info["at"] > self.trigger_ttl:
            raise SlackApiError("expired_trigger_id")
        if view.get("external_id") and any(v["view"].get("external_id") == view["external_id"]
                                           for v in self.views.values()):
            raise SlackApiError("duplicate_external_id")
        info["used"] = True
        return {"view": self._keep_view(view, info["user"])}

    def _m_views_update(self, a):
        vid = a.get("view_id") or next((k for k, v in self.views.items()
                                        if a.get("external_id") and v["view"]["external_id"] == a["external_id"]), "")
        if not vid and not a.get("external_id"):
            raise SlackApiError("invalid_arguments", "one of view_id or external_id is required")
        kept = self.views.get(vid)
        if kept is None:
            raise SlackApiError("not_found")
        if a.get("hash") and a["hash"] != kept["view"]["hash"]:
            raise SlackApiError("hash_conflict")
        view = _check_view(a.get("view"))
        history = kept["history"] + [kept["view"]]
        new = self._keep_view(view, self.view_users[vid], vid)
        self.views[vid].update(history=history, open=kept["open"])
        if new["type"] == "home":
            self.home_views[self.view_users[vid]] = new
        return {"view": new}

    def _m_files_getUploadURLExternal(self, a):
        if not a.get("filename") or not str(a.get("length", "")).isdigit():
            raise SlackApiError("invalid_arguments")
        fid = f"F{next(self._seq):08d}"
        self._files[fid] = {"name": a["filename"], "title": a["filename"], "length": int(a["length"]),
                            "bytes": None, "path": "", "channel": "", "thread_ts": ""}
        return {"upload_url": f"{self.url}/upload/{fid}", "file_id": fid}

    def _m_files_completeUploadExternal(self, a):
        files = a.get("files") or []
        out = []
        for f in files:
            info = self._files.get(f.get("id"))
            if info is None or info["bytes"] is None:
                raise SlackApiError("file_not_found" if info is None else "file_upload_incomplete")
            info["title"] = f.get("title") or info["name"]
            out.append({"id": f["id"], "name": info["name"], "title": info["title"], "size": len(info["bytes"])})
        cid = a.get("channel_id") or ""
        if cid:
            cid = self.channel_id(cid)
            thread_ts = a.get("thread_ts") or ""
            m = Message(channel=cid, ts=self._new_ts(), text=a.get("initial_comment") or "",
                        thread_ts=thread_ts,
                        files=[{"id": f["id"], "name": f["name"], "title": f["title"],
                                "path": self._files[f["id"]]["path"]} for f in out])
            for f in out:
                self._files[f["id"]].update(channel=cid, thread_ts=thread_ts)
            if thread_ts:
                parent = self._by_ts.get((cid, thread_ts))
                if parent is None:
                    raise SlackApiError("thread_not_found")
                parent.replies.append(m)
            else:
                self._append(m)
        return {"files": out}

    # Non-API endpoints --------------------------------------------------------------
    def _upload(self, fid: str, raw: bytes):
        with self._lock:
            self._calls.append(Call("upload", {"file_id": fid, "size": len(raw)}, time.time()))
            info = self._files.get(fid)
            if info is None:
                self._lock.notify_all()
                return 404, "unknown upload url", {}
            info["bytes"] = raw
            if self.files_dir:
                self.files_dir.mkdir(parents=True, exist_ok=True)
                path = self.files_dir / f"{fid}-{Path(info['name']).name}"
                path.write_bytes(raw)
                info["path"] = str(path)
            self._lock.notify_all()
        return 200, f"OK - {len(raw)}", {}

    def _response_post(self, rid: str, raw: bytes):
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, "invalid_payload", {}
        with self._lock:
            call = Call("response", {"rid": rid, **body}, time.time())
            self._calls.append(call)
            status, text, headers = self._respond(rid, body)
            call.status, call.error = status, "" if status == 200 else text
            self._lock.notify_all()
        return status, text, headers

    def _respond(self, rid: str, body: dict, count_use: bool = True):
        with self._lock:
            info = self._responses.get(rid)
            if info is None:
                return 404, "no_such_response_url", {}
            if count_use:   # a real POST to the response_url (not the ack shown as a reply)
                info["uses"] += 1
                if info["uses"] > RESPONSE_URL_USES:
                    return 404, "used_url", {}
                info["posts"].append(body)
            cid, target = info["channel"], None
            if info["message_ts"]:                      # from a click: the message with the button
                target = self._by_ts.get((cid, info["message_ts"]))
            elif info["last"] is not None:              # from a command: its last ephemeral reply
                target = info["last"]
            if body.get("delete_original") and target is not None:
                target.deleted = True
                return 200, "ok", {}
            text, blocks = body.get("text") or "", body.get("blocks") or []
            try:
                if blocks:
                    _check_blocks(blocks)
            except SlackApiError as e:
                return 400, e.error, {}
            if body.get("replace_original") and target is not None:
                target.edit(text, blocks)
                return 200, "ok", {}
            in_channel = body.get("response_type") == "in_channel"
            m = Message(channel=cid, ts=self._new_ts(), text=text, blocks=blocks,
                        kind="message" if in_channel else "ephemeral",
                        ephemeral_to="" if in_channel else info["user"])
            self._append(m)
            if not info["message_ts"]:
                info["last"] = m
            self._lock.notify_all()
        return 200, "ok", {}


def _maybe_json(raw: str):
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return raw


def _find_button(blocks: list, action_id: str, value: str | None):
    for b in blocks:
        for el in (b.get("elements") or []) + ([b["accessory"]] if b.get("accessory") else []):
            if el.get("action_id") == action_id and (value is None or el.get("value") == value):
                return b, el
    raise KeyError(f"no button {action_id!r} on that message")


# ---- rendering Block Kit as text -----------------------------------------------------
def _mrkdwn(text: str, users: dict, channels: dict) -> str:
    import re
    text = re.sub(r"<@([UW][A-Z0-9]+)>", lambda m: "@" + users.get(m.group(1), m.group(1)), text)
    text = re.sub(r"<#(C[A-Z0-9]+)(\|[^>]*)?>", lambda m: "#" + channels.get(m.group(1), m.group(1)), text)
    text = re.sub(r"<(https?://[^|>]+)\|([^>]+)>", r"\2 (\1)", text)
    text = re.sub(r"<(https?://[^>]+)>", r"\1", text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def render_blocks(blocks: list, users: dict | None = None, channels: dict | None = None) -> list[str]:
    """Block Kit as plain text lines: headers, sections, fields, context, buttons, images."""
    users, channels = users or {}, channels or {}

    def t(obj) -> str:
        return _mrkdwn((obj or {}).get("text", ""), users, channels)

    lines = []
    for b in blocks:
        kind = b.get("type")
        if kind == "header":
            title = t(b.get("text"))
            lines += [f"┃ {title}", "┃ " + "─" * min(60, len(title))]
        elif kind == "section":
            if b.get("text"):
                lines += t(b["text"]).replace("```", "").splitlines()
            for f in b.get("fields") or []:
                lines.append("  " + t(f).replace("\n", ": ", 1).replace("\n", " "))
            acc = b.get("accessory")
            if acc and acc.get("type") == "button":
                lines.append(f"  [{t(acc.get('text'))}]")
        elif kind == "context":
            lines.append("  (" + " · ".join(t(e) if e.get("type") != "image" else "[img]"
                                            for e in b.get("elements") or []) + ")")
        elif kind == "divider":
            lines.append("  " + "-" * 40)
        elif kind == "actions":
            buttons = []
            for e in b.get("elements") or []:
                label = f"[{t(e.get('text'))}]"
                if e.get("confirm"):
                    label += "(confirm)"
                buttons.append(label)
            lines.append("  " + " ".join(buttons))
        elif kind == "image":
            lines.append(f"  [image: {b.get('alt_text', '')}] {b.get('image_url', '')}")
        else:
            lines.append(f"  [{kind} block]")
    return lines


def _render_message(m: Message, users: dict, channels: dict) -> list[str]:
    stamp = time.strftime("%H:%M:%S", time.localtime(float(m.ts.split(".")[0])))
    who = "@" + users.get(m.user, "ctbot" if m.user == BOT_USER else m.user)
    if m.kind == "command":
        return [f"[{stamp}] {who}: {m.text}"]
    tag = f" (only visible to @{users.get(m.ephemeral_to, m.ephemeral_to)})" if m.kind == "ephemeral" else ""
    edited = f" (edited {m.edits}x)" if m.edits else ""
    out = [f"[{stamp}] {who}{tag}{edited}:"]
    body = render_blocks(m.blocks, users, channels) if m.blocks else _mrkdwn(m.text, users, channels).splitlines()
    out += ["  " + line for line in body]
    for f in m.files:
        out.append(f"  [file: {f['title']}] {f['path'] or f['name']}")
    return out + [""]


# ---- rendering the channel as an HTML page that looks like Slack -------------------------
EMOJI = {"white_check_mark": "✅", "heavy_check_mark": "✔️", "x": "❌", "warning": "⚠️",
         "rocket": "🚀", "tada": "🎉", "package": "📦", "hourglass": "⏳", "hourglass_flowing_sand": "⏳",
         "eyes": "👀", "+1": "👍", "thumbsup": "👍", "no_entry": "⛔", "chart_with_upwards_trend": "📈",
         "robot_face": "🤖", "bell": "🔔", "hand": "✋", "raised_hand": "✋", "weight_lifter": "🏋️",
         "arrows_counterclockwise": "🔄", "information_source": "ℹ️", "fire": "🔥",
         "calendar": "📅", "double_vertical_bar": "⏸️", "arrow_forward": "▶️", "inbox_tray": "📥",
         "satellite_antenna": "📡", "no_entry_sign": "🚫", "rewind": "⏪", "large_green_circle": "🟢"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
EARLIER_VERSIONS_SHOWN = 8      # a run's message is edited once per step and epoch
AVATAR_COLOURS = ("#e8912d", "#2eb67d", "#e01e5a", "#36c5f0", "#4a154b", "#1264a3")


def _h(text) -> str:
    import html
    return html.escape(str(text), quote=True)


def _emoji(text: str) -> str:
    import re
    return re.sub(r":([a-z0-9_+\-]+):", lambda m: EMOJI.get(m.group(1), m.group(0)), text)


def _slack_token_html(token: str, users: dict, channels: dict) -> str:
    """One <...> token of mrkdwn: a user or channel mention, a special mention, a link."""
    target, _, label = token.partition("|")
    label = _unescape(label)
    if target.startswith("@"):
        return f'<span class="mention">@{_h(label or users.get(target[1:], target[1:]))}</span>'
    if target.startswith("#"):
        return f'<span class="mention">#{_h(label or channels.get(target[1:], target[1:]))}</span>'
    if target.startswith("!"):
        return f'<span class="mention">@{_h(label or target[1:].split("^")[0])}</span>'
    url = _unescape(target)
    return f'<a href="{_h(url)}">{_h(label or url)}</a>'


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def mrkdwn_html(text: str, users: dict | None = None, channels: dict | None = None) -> str:
    """Slack mrkdwn as HTML: *bold*, _italic_, ~strike~, `code`, ```pre```, > quotes,
    <url|text> links, <@U…>/<#C…> mentions and :emoji: shortcodes. Code, pre and link
    tokens become placeholders first, so formatting never reaches inside them."""
    import re
    users, channels, held = users or {}, channels or {}, []

    def hold(html_text: str) -> str:
        held.append(html_text)
        return f"\x00{len(held) - 1}\x00"

    text = re.sub(r"\n?```(.*?)```", lambda m: hold(f"<pre>{_h(_unescape(m.group(1).strip(chr(10))))}</pre>"),
                  text or "", flags=re.S)
    text = re.sub(r"`([^`\n]+)`", lambda m: hold(f"<code>{_h(_unescape(m.group(1)))}</code>"), text)
    text = re.sub(r"<([^<>\n]+)>", lambda m: hold(_slack_token_html(m.group(1), users, channels)), text)
    text = _h(_unescape(text))
    for mark, tag in (("*", "b"), ("_", "i"), ("~", "s")):
        m = re.escape(mark)
        text = re.sub(rf"(?<![\w{m}]){m}(?=\S)([^{m}\n]*?\S){m}(?![\w{m}])", rf"<{tag}>\1</{tag}>", text)
    text = _emoji(text)
    lines = text.split("\n")
    out, quote = [], []
    for line in lines + [None]:
        if line is not None and line.startswith("&gt; "):
            quote.append(line[5:])
            continue
        if quote:
            out.append("<blockquote>" + "<br>".join(quote) + "</blockquote>")
            quote = []
        if line is not None:
            out.append(line + "<br>")
    html_text = "".join(out).removesuffix("<br>").replace("</blockquote><br>", "</blockquote>")
    # a pre block is a block of its own: no line break right after it
    html_text = re.sub(r"(\x00\d+\x00)<br>", lambda m: m.group(1) + ("" if held[int(m.group(1)[1:-1])]
                                                                      .startswith("<pre>") else "<br>"),
                       html_text)
    return re.sub(r"\x00(\d+)\x00", lambda m: held[int(m.group(1))], html_text)


def _text_html(obj, users: dict, channels: dict) -> str:
    obj = obj or {}
    if obj.get("type") == "mrkdwn":
        return mrkdwn_html(obj.get("text", ""), users, channels)
    return _emoji(_h(obj.get("text", ""))).replace("\n", "<br>")


def _element_html(e: dict, users: dict, channels: dict) -> str:
    kind = e.get("type")
    if kind == "button":
        style = e.get("style") or ""
        title = ' title="asks to confirm"' if e.get("confirm") else ""
        return f'<span class="btn {_h(style)}"{title}>{_text_html(e.get("text"), users, channels)}</span>'
    if kind == "image":
        return f'<img class="ctx-img" src="{_h(e.get("image_url", ""))}" alt="{_h(e.get("alt_text", ""))}">'
    if kind in ("static_select", "users_select", "channels_select", "overflow", "datepicker"):
        label = _text_html(e.get("placeholder") or {"text": kind}, users, channels)
        return f'<span class="btn select">{label} ▾</span>'
    return f'<span class="unknown">[{_h(kind)}]</span>'


def _input_html(b: dict, error: str, users: dict, channels: dict, state: dict | None = None) -> str:
    """An input block as a form field: label, the element filled in as the user sees it
    (``state``: what they entered, else the initial value), the hint, and the error Slack
    shows under it after a refused submission."""
    el = dict(b.get("element") or {})
    entered = (state or {}).get(el.get("action_id"))
    if entered is not None:
        if entered.get("type") == "static_select":
            el["initial_option"] = entered.get("selected_option")
        else:
            el["initial_value"] = entered.get("value") or ""
    label = _text_html(b.get("label"), users, channels) + ("" if not b.get("optional")
                                                            else ' <span class="optional">(optional)</span>')
    if el.get("type") == "static_select":
        shown = (el.get("initial_option") or {}).get("text") or el.get("placeholder") or {"text": "Select"}
        field_html = f'<div class="f-input select">{_text_html(shown, users, channels)}<span>▾</span></div>'
    else:
        value = el.get("initial_value") or ""
        cls = "f-input multi" if el.get("multiline") else "f-input"
        field_html = (f'<div class="{cls}">{_h(value)}</div>' if value else
                      f'<div class="{cls} placeholder">{_text_html(el.get("placeholder"), users, channels)}</div>')
    hint = f'<div class="f-hint">{_text_html(b["hint"], users, channels)}</div>' if b.get("hint") else ""
    err = f'<div class="f-error">⚠ {_h(error)}</div>' if error else ""
    return (f'<div class="b-input{" has-error" if error else ""}"><div class="f-label">{label}</div>'
            f'{field_html}{err}{hint}</div>')


def blocks_html(blocks: list, users: dict | None = None, channels: dict | None = None,
                errors: dict | None = None, state: dict | None = None) -> str:
    """Block Kit as HTML: header, section (text, fields, accessory), context, divider,
    actions, image, input (with ``errors`` by block_id); anything else shows its type."""
    users, channels, errors = users or {}, channels or {}, errors or {}
    out = []
    for b in blocks:
        kind = b.get("type")
        if kind == "input":
            out.append(_input_html(b, errors.get(b.get("block_id", ""), ""), users, channels,
                                   (state or {}).get(b.get("block_id", ""))))
        elif kind == "header":
            out.append(f'<div class="b-header">{_text_html(b.get("text"), users, channels)}</div>')
        elif kind == "section":
            inner = ""
            if b.get("text"):
                inner += f'<div class="mrkdwn">{_text_html(b["text"], users, channels)}</div>'
            if b.get("fields"):
                inner += '<div class="fields">' + "".join(
                    f'<div class="field">{_text_html(f, users, channels)}</div>' for f in b["fields"]) + "</div>"
            acc = b.get("accessory")
            side = f'<div class="accessory">{_element_html(acc, users, channels)}</div>' if acc else ""
            out.append(f'<div class="b-section"><div class="body">{inner}</div>{side}</div>')
        elif kind == "context":
            out.append('<div class="b-context">' + "".join(
                _element_html(e, users, channels) if e.get("type") == "image"
                else f'<span>{_text_html(e, users, channels)}</span>' for e in b.get("elements") or []) + "</div>")
        elif kind == "divider":
            out.append('<hr class="b-divider">')
        elif kind == "actions":
            out.append('<div class="b-actions">' + "".join(
                _element_html(e, users, channels) for e in b.get("elements") or []) + "</div>")
        elif kind == "image":
            title = f'<div class="file-title">{_text_html(b["title"], users, channels)}</div>' if b.get("title") else ""
            src = b.get("image_url") or (b.get("slack_file") or {}).get("url", "")
            out.append(f'<div class="b-image">{title}<img src="{_h(src)}" alt="{_h(b.get("alt_text", ""))}"></div>')
        else:
            out.append(f'<div class="unknown">[{_h(kind)} block]</div>')
    return "".join(out)


def _avatar(name: str, is_bot: bool) -> str:
    colour = "#4a154b" if is_bot else AVATAR_COLOURS[sum(map(ord, name)) % len(AVATAR_COLOURS)]
    letters = "ct" if is_bot else name[:1].upper()
    return f'<div class="avatar" style="background:{colour}">{_h(letters)}</div>'


def _message_html(m: Message, users: dict, channels: dict, hrefs: dict, reply: bool = False) -> str:
    stamp = time.strftime("%H:%M", time.localtime(float(m.ts.split(".")[0])))
    is_bot = m.user == BOT_USER
    name = "ctbot" if is_bot else users.get(m.user, m.user)
    if m.clicked:   # Slack shows no click; the page notes it so the story reads
        return (f'<div class="event" id="m{_h(m.ts)}"><span class="time">{stamp}</span> '
                f'<b>{_h(name)}</b> clicked <span class="btn small">{_h(m.clicked)}</span></div>')
    badge = '<span class="badge">APP</span>' if is_bot else ""
    edited = '<span class="edited">(edited)</span>' if m.edits else ""
    cls = "msg reply" if reply else "msg"
    eph = ""
    if m.kind == "ephemeral":
        cls += " ephemeral"
        who = "you" if not m.ephemeral_to else "@" + users.get(m.ephemeral_to, m.ephemeral_to)
        eph = f'<div class="only-visible">👁 Only visible to {_h(who)}</div>'
    body = blocks_html(m.blocks, users, channels) if m.blocks else \
        f'<div class="mrkdwn">{mrkdwn_html(m.text, users, channels)}</div>'
    if m.kind == "command":
        body = f'<div class="mrkdwn command">{_h(m.text)}</div>'
    files = "".join(_file_html(f, hrefs) for f in m.files)
    history = ""
    if m.history:
        shown = m.history[::-1][:EARLIER_VERSIONS_SHOWN]
        more = len(m.history) - len(shown)
        history = (f'<details class="history"><summary>{len(m.history)} earlier version(s)</summary>'
                   + "".join(f'<div class="version"><div class="version-label">version {len(m.history) - i}</div>'
                             + (blocks_html(b, users, channels) if b else mrkdwn_html(t, users, channels))
                             + "</div>" for i, (t, b) in enumerate(shown))
                   + (f'<div class="version-label">…and {more} older</div>' if more else "") + "</details>")
    out = (f'<div class="{cls}" id="m{_h(m.ts)}">{_avatar(name, is_bot)}<div class="content">{eph}'
           f'<div class="meta"><span class="name">{_h(name)}</span>{badge}'
           f'<span class="time">{stamp}</span>{edited}</div>{body}{files}{history}</div></div>')
    if m.replies:
        n = len(m.replies)
        out += (f'<div class="thread"><div class="thread-count">{n} {"reply" if n == 1 else "replies"}</div>'
                + "".join(_message_html(r, users, channels, hrefs, reply=True) for r in m.replies) + "</div>")
    return out


def _file_html(f: dict, hrefs: dict) -> str:
    href = urllib.parse.quote(hrefs.get(f["id"], ""))
    title = f'<div class="file-title">{_h(f.get("title") or f["name"])}</div>'
    if href and f["name"].lower().endswith(IMAGE_SUFFIXES):
        return (f'<div class="file">{title}<a href="{href}"><img class="file-img" src="{href}" '
                f'alt="{_h(f.get("title") or f["name"])}"></a></div>')
    link = f'<a href="{href}">{_h(f["name"])}</a>' if href else _h(f["name"])
    return f'<div class="file">{title}<div class="file-card">📄 {link}</div></div>'


def render_view_page(standin: SlackStandin, kept: dict, user: str) -> str:
    """A modal over a dimmed workspace, or a user's Home tab, as Slack shows them (called
    with the stand-in's lock held)."""
    view, users, channels = kept["view"], standin.users, standin._channels
    body = blocks_html(view.get("blocks") or [], users, channels, kept.get("errors"),
                       (kept.get("state") or {}).get("values"))
    general = (kept.get("errors") or {}).get("")
    if general:
        body = f'<div class="f-error banner">⚠ {_h(general)}</div>' + body
    sidebar = "".join(f'<div class="chan"># {_h(n)}</div>' for n in channels.values())
    who = users.get(user, user)
    if view["type"] == "home":
        main = (f'<header class="channel-header"><span class="channel-name">ctbot</span>'
                f'<span class="tabs"><span class="tab active">Home</span><span class="tab">About</span></span>'
                f'<span class="channel-note">as @{_h(who)} sees it · rendered by the ctbot Slack stand-in</span>'
                f'</header><div class="home">{body}</div>')
        apps = '<div class="chan active">● ctbot</div>'
    else:
        buttons = "".join(f'<span class="btn {cls}">{_text_html(view[k], users, channels)}</span>'
                          for k, cls in (("close", ""), ("submit", "primary")) if view.get(k))
        if view.get("submit") and not view.get("close"):
            buttons = '<span class="btn">Cancel</span>' + buttons
        main = (f'<div class="overlay"><div class="modal"><div class="modal-head">'
                f'{_text_html(view.get("title"), users, channels)}<span class="x">✕</span></div>'
                f'<div class="modal-body">{body}</div><div class="modal-foot">{buttons}</div></div></div>')
        apps = '<div class="chan">● ctbot</div>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{_h(view["type"])} · ctbot (Slack stand-in)</title>
<style>{PAGE_CSS}{VIEW_CSS}</style></head>
<body><div class="app">
<nav class="sidebar"><div class="workspace">ctbot</div><div class="section-label">Channels</div>{sidebar}
<div class="section-label">Apps</div>{apps}</nav>
<main>{main}</main></div></body></html>
"""


def render_page(standin: SlackStandin, cid: str, hrefs: dict) -> str:
    """The page of one channel (called with the stand-in's lock held)."""
    users, channels = standin.users, standin._channels
    msgs = [m for m in standin._timeline if m.channel == cid and not m.deleted]
    day = time.strftime("%A, %B %d", time.localtime(float(msgs[0].ts.split(".")[0]))) if msgs else ""
    sidebar = "".join(f'<div class="chan{" active" if c == cid else ""}"># {_h(n)}</div>'
                      for c, n in channels.items())
    body = "".join(_message_html(m, users, channels, hrefs) for m in msgs) or \
        '<div class="empty">No messages yet.</div>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>#{_h(channels[cid])} · ctbot (Slack stand-in)</title>
<style>{PAGE_CSS}</style></head>
<body><div class="app">
<nav class="sidebar"><div class="workspace">ctbot</div><div class="section-label">Channels</div>{sidebar}
<div class="section-label">Apps</div><div class="chan">● ctbot</div></nav>
<main><header class="channel-header"><span class="channel-name"># {_h(channels[cid])}</span>
<span class="channel-note">rendered by the ctbot Slack stand-in · {time.strftime("%Y-%m-%d %H:%M")}</span></header>
<div class="messages">{f'<div class="day"><span>{_h(day)}</span></div>' if day else ""}{body}</div></main>
</div></body></html>
"""


PAGE_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.46668 "Slack-Lato","Lato","Helvetica Neue",Helvetica,"Liberation Sans",Arial,sans-serif;
  color:#1d1c1d;background:#fff}
.app{display:flex;min-height:100vh}
.sidebar{width:220px;flex:none;background:#3f0e40;color:#cfc3cf;padding:12px 0}
.workspace{color:#fff;font-weight:900;font-size:18px;padding:4px 16px 14px;border-bottom:1px solid #522653}
.section-label{font-size:14px;padding:14px 16px 4px;opacity:.8}
.chan{padding:2px 16px 2px 26px;font-size:15px;white-space:nowrap}
.chan.active{background:#1164a3;color:#fff;font-weight:700}
main{flex:1;min-width:0}
.channel-header{display:flex;align-items:baseline;gap:14px;padding:14px 20px;border-bottom:1px solid #ddd}
.channel-name{font-weight:900;font-size:18px}
.channel-note{color:#616061;font-size:12px}
.messages{padding:8px 0 40px}
.day{text-align:center;border-top:1px solid #ddd;margin:22px 0 6px;height:0}
.day span{position:relative;top:-13px;background:#fff;border:1px solid #ddd;border-radius:24px;
  padding:3px 16px;font-size:13px;font-weight:700}
.msg{display:flex;gap:8px;padding:8px 20px}
.avatar{width:36px;height:36px;flex:none;border-radius:6px;color:#fff;font-weight:900;font-size:15px;
  display:flex;align-items:center;justify-content:center}
.content{flex:1;min-width:0;max-width:860px}
.meta{display:flex;align-items:baseline;gap:6px}
.name{font-weight:900}
.badge{background:rgba(29,28,29,.13);color:rgba(29,28,29,.7);font-size:10px;font-weight:700;
  padding:1px 3px;border-radius:2px}
.time{color:#616061;font-size:12px}
.edited{color:#616061;font-size:12px}
.mrkdwn{word-wrap:break-word}
.command{font-family:Monaco,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:14px}
.b-header{font-size:18px;font-weight:900;margin:4px 0 6px}
.b-section{display:flex;gap:12px;margin:4px 0}
.b-section .body{flex:1;min-width:0}
.fields{display:grid;grid-template-columns:1fr 1fr;gap:8px 24px;margin:6px 0;max-width:640px}
.b-context{display:flex;flex-wrap:wrap;align-items:center;gap:4px 12px;color:#616061;font-size:12px;margin:6px 0}
.b-context code{font-size:11px}
.ctx-img{width:16px;height:16px;border-radius:3px}
.b-divider{border:0;border-top:1px solid #ddd;margin:10px 0}
.b-actions{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0 4px}
.btn{display:inline-flex;align-items:center;height:28px;padding:0 12px;border:1px solid rgba(29,28,29,.3);
  border-radius:4px;background:#fff;font-size:13px;font-weight:700;color:#1d1c1d;white-space:nowrap}
.btn.primary{background:#007a5a;border-color:#007a5a;color:#fff}
.btn.danger{background:#e01e5a;border-color:#e01e5a;color:#fff}
.btn.small{height:22px;padding:0 8px;font-size:12px}
.btn.select{font-weight:400}
code{font:12px Monaco,Menlo,Consolas,"DejaVu Sans Mono",monospace;color:#e01e5a;background:rgba(29,28,29,.04);
  border:1px solid rgba(29,28,29,.13);border-radius:3px;padding:2px 3px 1px}
pre{font:12px/1.5 Monaco,Menlo,Consolas,"DejaVu Sans Mono",monospace;background:rgba(29,28,29,.04);
  border:1px solid rgba(29,28,29,.13);border-radius:4px;padding:8px;margin:4px 0;white-space:pre-wrap}
blockquote{margin:4px 0;padding-left:12px;border-left:4px solid #ddd}
a{color:#1264a3;text-decoration:none}
.mention{color:#1264a3;background:rgba(29,155,209,.1);border-radius:3px;padding:0 2px}
.ephemeral{background:#f8f8f8}
.only-visible{color:#616061;font-size:12px;margin-bottom:2px}
.event{color:#616061;font-size:13px;padding:4px 20px 4px 64px}
.thread{margin:0 20px 8px 64px;border-left:3px solid #e0dfe0;padding-left:4px}
.thread-count{color:#1264a3;font-size:13px;font-weight:700;padding:2px 12px}
.msg.reply{padding:6px 12px}
.file{margin:6px 0}
.file-title{color:#616061;font-size:13px;margin-bottom:4px}
.file-img,.b-image img{max-width:480px;max-height:480px;border:1px solid rgba(29,28,29,.13);border-radius:8px;
  display:block}
.file-card{display:inline-block;border:1px solid rgba(29,28,29,.13);border-radius:8px;padding:10px 14px}
.history{margin-top:6px;font-size:13px}
.history summary{color:#616061;cursor:pointer}
.version{border-left:3px solid #e0dfe0;padding:4px 10px;margin:6px 0;opacity:.8}
.version-label{color:#616061;font-size:11px;text-transform:uppercase;letter-spacing:.04em}
.unknown,.empty{color:#616061;font-style:italic;padding:8px 20px}
"""

VIEW_CSS = """
.tabs{display:flex;gap:18px;margin-left:12px}
.tab{font-size:14px;color:#616061;padding-bottom:4px}
.tab.active{color:#1d1c1d;font-weight:700;border-bottom:2px solid #1264a3}
.home{padding:16px 28px 40px;max-width:900px}
.overlay{min-height:100vh;background:rgba(0,0,0,.55);display:flex;align-items:flex-start;justify-content:center;
  padding:40px 0}
.modal{width:560px;background:#fff;border-radius:8px;box-shadow:0 18px 48px rgba(0,0,0,.35)}
.modal-head{display:flex;justify-content:space-between;font-size:22px;font-weight:900;padding:20px 28px 12px}
.modal-head .x{color:#616061;font-size:18px}
.modal-body{padding:4px 28px 12px}
.modal-foot{display:flex;justify-content:flex-end;gap:10px;padding:16px 28px;border-top:1px solid #ddd}
.b-input{margin:12px 0}
.f-label{font-weight:700;margin-bottom:6px}
.optional{color:#616061;font-weight:400}
.f-input{border:1px solid rgba(29,28,29,.3);border-radius:4px;padding:8px 10px;min-height:38px;
  display:flex;justify-content:space-between}
.f-input.multi{min-height:70px}
.f-input.placeholder{color:#868686}
.has-error .f-input{border-color:#e01e5a;box-shadow:0 0 0 1px #e01e5a}
.f-error{color:#e01e5a;font-size:13px;margin-top:4px}
.f-error.banner{background:#fdf0f4;padding:8px 10px;border-radius:4px}
.f-hint{color:#616061;font-size:13px;margin-top:4px}
"""
