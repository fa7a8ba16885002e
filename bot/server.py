"""HTTP and Socket Mode entry points for the Bolt app.

Not Bolt's ``app.start()``: that server is single-threaded with a listen backlog of 5,
and under 20 concurrent requests it dropped connections and acked in 3-4 s, past
Slack's 3 s limit. Here a ThreadingHTTPServer with a deep accept queue hands each
request to ``app.dispatch`` on its own thread; the listeners ack at once and leave
slow work to the app's background jobs (bot/background.py).
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from slack_bolt import App
from slack_bolt.request import BoltRequest

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
MAX_BODY = 1 << 20   # Slack's payloads are a few KB; refuse anything absurd


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


def _handler(app: App, health: Callable[[], dict]):
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
            if urllib.parse.urlsplit(self.path).path != "/healthz":
                return self._send(404, "not found")
            try:
                status = health()
            except Exception as e:   # health must answer, not crash the handler
                log.warning("health check failed: %s", e)
                status = {"ok": False, "error": type(e).__name__}
            self._send(200 if status.get("ok") else 503, json.dumps(status, default=str),
                       ctype="application/json")

        def do_POST(self):
            parsed = urllib.parse.urlsplit(self.path)
            if parsed.path != EVENTS_PATH:
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

    return Handler


def serve_http(app: App, host: str = "127.0.0.1", port: int = 0,
               health: Callable[[], dict] | None = None) -> HttpServer:
    """Serve ``app`` at POST /slack/events (commands, actions, events) and GET /healthz
    on a background thread; port 0 picks a free one. Returns a handle with .url."""
    server = _Server((host, port), _handler(app, health or (lambda: {"ok": True})))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="ctbot-http", daemon=True)
    thread.start()
    log.info("serving Slack requests at http://%s:%s%s", host, server.server_address[1], EVENTS_PATH)
    return HttpServer(server, thread)


def serve_socket_mode(app: App, app_token: str):
    """Connect over Socket Mode (no public URL needed); returns the connected handler,
    whose ``close()`` disconnects."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    handler = SocketModeHandler(app, app_token)
    handler.connect()
    log.info("connected to Slack over Socket Mode")
    return handler
