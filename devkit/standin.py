"""A local stand-in for Slack, for tests and the demo.

It plays both sides of Slack on 127.0.0.1:

* the Web API the bot calls (``WebClient(base_url=standin.api_url)``): auth.test,
  chat.postMessage/update/postEphemeral/getPermalink, conversations.info/join, the
  three calls of files_upload_v2 (including the POST to the upload URL it hands out),
  and response_url POSTs (``/response/<id>``);
* the Slack that calls the bot: ``command()`` and ``click()`` deliver signed slash
  commands and button clicks to the bot's HTTP endpoint, like Slack does.

It records every call, keeps the channel as Slack would show it (messages updated in
place, threads, files, ephemeral replies), and renders a readable transcript.
It checks what real Slack checks where a bug would otherwise hide: the bot token,
unknown channels, the 50-block cap and text lengths, and five uses per response_url.
"""
from __future__ import annotations

import itertools
import json
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


@dataclass
class Call:
    method: str                  # Web API method, "upload", or "response"
    args: dict                   # merged query, form and JSON arguments (blocks decoded)
    at: float
    status: int = 200
    error: str = ""


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
    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


def _check_blocks(blocks) -> None:
    """What Slack itself rejects with invalid_blocks (a deliberately small, independent check)."""
    if not isinstance(blocks, list) or len(blocks) > 50:
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


class SlackStandin:
    def __init__(self, *, bot_token: str = "xoxb-standin", signing_secret: str = "standin-secret",
                 channels: tuple[str, ...] = ("ct",), users: dict | None = None,
                 files_dir: str | Path | None = None, command: str = "/ct", host: str = "127.0.0.1",
                 usergroups: dict | None = None):
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
                "trigger_id": f"{next(self._seq)}.{int(time.time())}.standin"}

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
            "trigger_id": f"{next(self._seq)}.{int(time.time())}.standin",
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
        for key in ("blocks", "files", "attachments"):
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
                result = {"ok": False, "error": e.error}
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
                    metadata=_maybe_json(a["metadata"]) if isinstance(a.get("metadata"), str) else a.get("metadata") or {})
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
        m.edit(text, blocks)
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
        view = a.get("view")
        if isinstance(view, str):
            view = json.loads(view)
        if not a.get("user_id") or not isinstance(view, dict) or view.get("type") != "home":
            raise SlackApiError("invalid_arguments")
        _check_blocks(view.get("blocks") or [])
        self.home_views[a["user_id"]] = view
        return {"view": {"id": f"V{next(self._seq):08d}", **view}}

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
         "satellite_antenna": "📡", "no_entry_sign": "🚫", "rewind": "⏪"}
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


def blocks_html(blocks: list, users: dict | None = None, channels: dict | None = None) -> str:
    """Block Kit as HTML: header, section (text, fields, accessory), context, divider,
    actions, image; anything else shows its type."""
    users, channels = users or {}, channels or {}
    out = []
    for b in blocks:
        kind = b.get("type")
        if kind == "header":
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
