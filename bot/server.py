"""HTTP and Socket Mode entry points for the Bolt app.

HTTP is uvicorn (httptools, uvloop) with the limits of core/httpserver.py, in front of
a thin ASGI app. Not Bolt's own ``app.start()`` (single-threaded, backlog 5: acks of
3-4 s at 20 concurrent) and not Bolt's ASGI adapter, which runs the synchronous
``app.dispatch`` on the event loop and reads a body of any size: one ack waiting on
Redis would hold every probe behind it. Here the loop only parses, routes and answers
the probes; ``app.dispatch`` runs on a small pool of threads (``http.ack_threads``),
and the listeners ack at once and leave slow work to the background jobs
(bot/background.py). docs/http.md has the limits and the figures.

Routes: POST /slack/events; GET /livez (the process serves), /readyz (Redis and the
store answer; /healthz is its old name) and /metrics (Prometheus). The probes and
/metrics are also served on a listener of their own (``http.probe_port``), so a flood
of connections on the Slack port cannot fail them. In Socket Mode only that listener
runs, without the Slack route.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from slack_bolt import App
from slack_bolt.request import BoltRequest

from core import metrics
from core.config import HttpSection
from core.httpserver import HttpServer as _Uvicorn
from core.httpserver import Limits, Listener, bind

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
READY_PATHS = ("/readyz", "/healthz")   # /healthz: the name older manifests probe
PROBE_PATHS = ("/livez", "/metrics") + READY_PATHS
READY_EVERY = 0.5    # seconds between readiness checks (the Redis ping times out at 0.3 s)
READY_STALE = 3.0    # no check finished for this long: "not ready" (one is hanging past its timeouts)
READY_WAIT = 1.5     # how long a probe waits for the very first result


class Readiness:
    """Runs ``check`` every READY_EVERY on a thread of its own; a probe answers the latest
    result without waiting on anything, so it stays fast however busy the ack threads
    are, and a hung Redis turns it 503 within about READY_EVERY + 0.3 s. A check that
    hangs past its own timeouts shows as "not ready" after READY_STALE. Only the first
    probe waits, up to READY_WAIT, for a first result."""

    def __init__(self, check: Callable[[], dict], every: float = READY_EVERY):
        self._check, self.every = check, every
        self._first: Future = Future()
        self._last: dict | None = None
        self._last_at = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    async def status(self) -> dict:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ctbot-readyz", daemon=True)
            self._thread.start()
        if self._last is None:
            try:
                return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._first)), READY_WAIT)
            except TimeoutError:
                return {"ok": False, "error": f"the first readiness check took over {READY_WAIT:g} s"}
        age = time.monotonic() - self._last_at
        if age > READY_STALE:
            return {**self._last, "ok": False, "error": f"no readiness check has finished for {age:.1f} s"}
        return self._last

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = self._check()
            except Exception as e:   # health must answer, not crash the probe
                log.warning("readiness check failed: %s", e)
                status = {"ok": False, "error": type(e).__name__}
            self._last, self._last_at = status, time.monotonic()
            if not self._first.done():
                self._first.set_result(status)
            self._stop.wait(max(0.0, self.every - (time.monotonic() - started)))

    def close(self) -> None:
        self._stop.set()


def _request_name(body: str, ctype: str) -> tuple[str, str]:
    """(kind, name) of a Slack request, for the metrics: the subcommand of a slash
    command, the action id of a click, the event type; bounded label values."""
    try:
        if "json" in ctype:
            doc = json.loads(body or "{}")
            return "event", str((doc.get("event") or {}).get("type") or doc.get("type") or "unknown")[:40]
        form = urllib.parse.parse_qs(body)
        if "payload" in form:
            payload = json.loads(form["payload"][0])
            action = ((payload.get("actions") or [{}])[0]).get("action_id") or payload.get("type") or ""
            return "action", action if re.fullmatch(r"[a-z0-9_:.-]{1,40}", action) else "other"
        if "command" in form:
            from bot.blocks.replies import SUBCOMMANDS
            from bot.listeners.parse import ALIASES
            words = (form.get("text") or [""])[0].split()
            sub = ALIASES.get(words[0].lower(), words[0].lower()) if words else "help"
            return "command", sub if sub in SUBCOMMANDS else "unknown"
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        pass
    return "other", "unknown"


async def _answer(send, status: int, body: str | bytes, headers: dict | None = None,
                  ctype: str = "text/plain; charset=utf-8", close: bool = False) -> None:
    data = body.encode() if isinstance(body, str) else body
    out, sent_type = [], False
    for k, vs in (headers or {}).items():
        if k.lower() in ("content-length", "connection", "transfer-encoding"):
            continue
        for v in (vs if isinstance(vs, (list, tuple)) else [vs]):
            sent_type |= k.lower() == "content-type"
            out.append((k.lower().encode("latin-1"), str(v).encode("latin-1")))
    if not sent_type:
        out.append((b"content-type", ctype.encode()))
    out.append((b"content-length", str(len(data)).encode()))
    if close:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None when it passes ``limit`` (the rest is not read) or the
    client went away."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


class SlackAsgi:
    """The ASGI app: Slack's route (``app`` None: none) and the probes."""

    def __init__(self, app: App | None, health: Readiness, max_body: int, ack_threads: int = 4):
        self.app, self.health, self.max_body = app, health, max_body
        self._pool = ThreadPoolExecutor(ack_threads, thread_name_prefix="ctbot-ack") if app is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = scope["headers"]
        length = next((v for k, v in headers if k == b"content-length"), None)
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if scope["http_version"] == "1.1" and not any(k == b"host" for k, _ in headers):
            return await _answer(send, 400, "missing Host header\n", close=True)
        path, method = scope["path"], scope["method"]
        if method in ("GET", "HEAD"):
            if chunked or (length not in (None, b"0")):
                return await _answer(send, 400, f"a {method} request has no body\n", close=True)
            return await self._probe(send, path)
        if method != "POST" or path != EVENTS_PATH or self.app is None:
            return await _answer(send, 404, "not found", close=length not in (None, b"0") or chunked)
        if length is not None and int(length) > self.max_body:   # llhttp let only digits through
            return await _answer(send, 413, "payload too large\n", close=True)
        started = time.perf_counter()
        body = await _read_body(receive, self.max_body)
        if body is None:
            return await _answer(send, 413, "payload too large\n", close=True)
        loop = asyncio.get_running_loop()
        status, resp_body, resp_headers = await loop.run_in_executor(
            self._pool, self._dispatch, body, scope["query_string"].decode("latin-1"), headers, started)
        await _answer(send, status, resp_body, resp_headers)

    def _dispatch(self, raw: bytes, query: str, raw_headers, started: float) -> tuple[int, str, dict]:
        """On an ack thread: Bolt verifies the signature and runs the listener's ack."""
        body = raw.decode("utf-8", "replace")
        headers: dict[str, list[str]] = {}
        for k, v in raw_headers:
            headers.setdefault(k.decode("latin-1"), []).append(v.decode("latin-1"))
        resp = self.app.dispatch(BoltRequest(body=body, query=query, headers=headers))
        # Recorded before the answer leaves, so a scrape after it always counts it.
        kind, name = _request_name(body, (headers.get("content-type") or [""])[0])
        metrics.ACK_SECONDS.labels(kind).observe(time.perf_counter() - started)
        if kind in ("command", "action"):
            metrics.command(name, "ok" if resp.status < 300 else
                            "rejected" if resp.status in (401, 403) else "error")
        return resp.status, resp.body or "", resp.headers

    async def _probe(self, send, path: str) -> None:
        if path == "/livez":    # answering at all is the proof; no dependency is asked
            return await _answer(send, 200, json.dumps({"ok": True}), ctype="application/json")
        if path == "/metrics":
            body, ctype = metrics.exposition()
            return await _answer(send, 200, body, ctype=ctype)
        if path not in READY_PATHS:
            return await _answer(send, 404, "not found")
        status = await self.health.status()
        await _answer(send, 200 if status.get("ok") else 503, json.dumps(status, default=str),
                      ctype="application/json")

    def shutdown(self) -> None:
        self.health.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class HttpServer:
    """A running server: ``.url``, ``.events_url``, ``.probe_url``, ``.shutdown()``."""

    def __init__(self, server: _Uvicorn, asgi: SlackAsgi, host: str):
        self._server, self._asgi, self.host = server, asgi, host

    @property
    def port(self) -> int:
        return self._server.listeners[0].port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def events_url(self) -> str:
        return self.url + EVENTS_PATH

    @property
    def probe_url(self) -> str:
        return f"http://{self.host}:{self._server.listeners[-1].port}"

    def wait(self) -> None:
        self._server.wait()

    def shutdown(self) -> None:
        """Stop accepting, finish the requests in flight (up to http.shutdown_seconds)."""
        self._server.stop()
        self._asgi.shutdown()


def serve_http(app: App | None, host: str = "127.0.0.1", port: int = 0,
               health: Readiness | None = None, http: HttpSection | None = None) -> HttpServer:
    """Serve ``app`` at POST /slack/events (commands, actions, events), and the probes
    and /metrics, on a background thread; port 0 picks a free one. The probes and
    /metrics also get their own listener at ``http.probe_port`` (0 when ``port`` is 0).
    ``app`` None serves only the probes and /metrics (Socket Mode), at ``port``."""
    http = http or HttpSection()
    limits = Limits.from_section(http)
    health = health or Readiness(lambda: {"ok": True})
    asgi = SlackAsgi(app, health, http.max_body_bytes, http.ack_threads)
    listeners = [Listener(asgi, bind(host, port), limits)]
    if app is not None:
        probe_port = 0 if port == 0 else http.probe_port
        listeners.append(Listener(SlackAsgi(None, health, 0), bind(host, probe_port), limits, max_connections=64))
    server = HttpServer(_Uvicorn(listeners).start(), asgi, host)
    if app is not None:
        log.info("serving Slack requests at %s, probes also at %s", server.events_url, server.probe_url)
    else:
        log.info("serving /livez, /readyz and /metrics at %s", server.url)
    return server


def serve_socket_mode(app: App, app_token: str):
    """Connect over Socket Mode (no public URL needed); returns the connected handler,
    whose ``close()`` disconnects."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    handler = SocketModeHandler(app, app_token)
    handler.connect()
    log.info("connected to Slack over Socket Mode")
    return handler
