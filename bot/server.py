"""HTTP and Socket Mode entry points for the Bolt app.

Not Bolt's ``app.start()``: that server is single-threaded with a listen backlog of 5,
and under 20 concurrent requests it dropped connections and acked in 3-4 s, past
Slack's 3 s limit. Here a ThreadingHTTPServer with a deep accept queue hands each
request to ``app.dispatch`` on its own thread; the listeners ack at once and leave
slow work to the app's background jobs (bot/background.py).

Routes: POST /slack/events; GET /livez (the process serves), /readyz (Redis and the
store answer; /healthz is its old name) and /metrics (Prometheus). In Socket Mode the
same server runs without the Slack route, for the probes and the scrape.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from slack_bolt import App
from slack_bolt.request import BoltRequest

from core import metrics

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
READY_PATHS = ("/readyz", "/healthz")   # /healthz: the name older manifests probe
MAX_BODY = 1 << 20   # Slack's payloads are a few KB; refuse anything absurd
READY_WAIT = 2.0     # a readiness check that takes longer answers with the last result


class Readiness:
    """Runs ``check`` off the request thread: a store or Redis that hangs must not hold
    one of the four server threads Slack's acks need. A request waits up to READY_WAIT
    for a fresh answer, else gets the last one (not ready if there was none)."""

    def __init__(self, check: Callable[[], dict]):
        self._check = check
        self._lock = threading.Lock()
        self._last: dict = {"ok": False, "error": "not checked yet"}
        self._running: threading.Thread | None = None

    def __call__(self) -> dict:
        with self._lock:
            if self._running is None or not self._running.is_alive():
                self._running = threading.Thread(target=self._run, name="ctbot-readyz", daemon=True)
                self._running.start()
            running = self._running
        running.join(READY_WAIT)
        with self._lock:
            return dict(self._last, stale=True) if running.is_alive() else dict(self._last)

    def _run(self) -> None:
        try:
            status = self._check()
        except Exception as e:   # health must answer, not crash the handler
            log.warning("readiness check failed: %s", e)
            status = {"ok": False, "error": type(e).__name__}
        with self._lock:
            self._last = status


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


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer on a small fixed pool of threads.

    Measured with bench/bench_ack.py (2 cores, 20 concurrent clients): a thread per
    request cost ~0.3 ms of CPU per ack just to start it, and with 20+ threads parsing
    and dispatching at once they mostly trade the GIL: p99 ~100-150 ms. Four threads and
    the kernel's accept queue in front of them: p99 ~70 ms. A client that stalls holds
    a thread for at most ``timeout`` seconds (behind an ingress that buffers requests it
    never reaches us).
    """
    daemon_threads = True
    request_queue_size = 1024     # listen backlog: bursts wait in the kernel, not refused
    allow_reuse_address = True
    pool_size = 4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="ctbot-http")

    def process_request(self, request, client_address):
        self._pool.submit(self.process_request_thread, request, client_address)

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class HttpServer:
    """A running server: ``.url``, ``.events_url``, ``.shutdown()``."""

    def __init__(self, server: _Server, thread: threading.Thread):
        self._server, self._thread = server, thread

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def events_url(self) -> str:
        return self.url + EVENTS_PATH

    def wait(self) -> None:
        self._thread.join()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(app: App | None, health: Callable[[], dict]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "ctbot"
        timeout = 10          # a client that stalls mid-request frees its pool thread

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: str | bytes, headers: dict | None = None,
                  ctype: str = "text/plain; charset=utf-8") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            sent_type = False
            for k, vs in (headers or {}).items():
                for v in (vs if isinstance(vs, (list, tuple)) else [vs]):
                    if k.lower() == "content-length":
                        continue
                    sent_type |= k.lower() == "content-type"
                    self.send_header(k, v)
            if not sent_type:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/livez":    # answering at all is the proof; no dependency is asked
                return self._send(200, json.dumps({"ok": True}), ctype="application/json")
            if path == "/metrics":
                body, ctype = metrics.exposition()
                return self._send(200, body, ctype=ctype)
            if path not in READY_PATHS:
                return self._send(404, "not found")
            try:
                status = health()
            except Exception as e:   # health must answer, not crash the handler
                log.warning("health check failed: %s", e)
                status = {"ok": False, "error": type(e).__name__}
            self._send(200 if status.get("ok") else 503, json.dumps(status, default=str),
                       ctype="application/json")

        def do_POST(self):
            started = time.perf_counter()
            parsed = urllib.parse.urlsplit(self.path)
            if app is None or parsed.path != EVENTS_PATH:
                return self._send(404, "not found")
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                return self._send(413, "payload too large")
            body = self.rfile.read(n).decode("utf-8") if n else ""
            headers: dict[str, list[str]] = {}
            for k, v in self.headers.items():
                headers.setdefault(k.lower(), []).append(v)
            resp = app.dispatch(BoltRequest(body=body, query=parsed.query, headers=headers))
            self._send(resp.status, resp.body or "", resp.headers)
            kind, name = _request_name(body, self.headers.get("Content-Type") or "")
            metrics.ACK_SECONDS.labels(kind).observe(time.perf_counter() - started)
            if kind in ("command", "action"):
                metrics.command(name, "ok" if resp.status < 300 else
                                "rejected" if resp.status in (401, 403) else "error")

    return Handler


def serve_http(app: App | None, host: str = "127.0.0.1", port: int = 0,
               health: Callable[[], dict] | None = None) -> HttpServer:
    """Serve ``app`` at POST /slack/events (commands, actions, events), and the probes
    and /metrics, on a background thread; port 0 picks a free one. ``app`` None serves
    only the probes and /metrics (Socket Mode). Returns a handle with .url."""
    server = _Server((host, port), _handler(app, health or (lambda: {"ok": True})))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="ctbot-http", daemon=True)
    thread.start()
    if app is not None:
        log.info("serving Slack requests at http://%s:%s%s", host, server.server_address[1], EVENTS_PATH)
    else:
        log.info("serving /livez, /readyz and /metrics at http://%s:%s", host, server.server_address[1])
    return HttpServer(server, thread)


def serve_socket_mode(app: App, app_token: str):
    """Connect over Socket Mode (no public URL needed); returns the connected handler,
    whose ``close()`` disconnects."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    handler = SocketModeHandler(app, app_token)
    handler.connect()
    log.info("connected to Slack over Socket Mode")
    return handler
