"""The HTTP front: KServe's Open Inference Protocol v2 over REST, on the stdlib
ThreadingHTTPServer (HTTP/1.1 keep-alive, one thread per connection).

    GET  /v2/health/live               200 while the process runs
    GET  /v2/health/ready              200 once a model is loaded, else 503
    GET  /v2                           server metadata
    GET  /v2/models/{name}             model metadata; "versions" is what is served now
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer       (also under /versions/{v}/ for the served v)
    GET  /metrics                      Prometheus (serving.metrics)

Bad input is a 4xx with {"error": "what was wrong"}; every body carries model_version.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving import metrics
from serving.follow import ModelHolder
from serving.protocol import ProtocolError, infer_response, model_metadata, parse_infer

log = logging.getLogger("serving.server")

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")


class ServerConfig:
    def __init__(self, model: str, *, max_body_bytes: int = 8 << 20, max_batch: int = 256,
                 max_k: int = 100):
        self.model, self.max_body_bytes = model, max_body_bytes
        self.max_batch, self.max_k = max_batch, max_k


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128   # the stdlib's 5 drops connections under a burst
    holder: ModelHolder
    config: ServerConfig


_REQUEST_LINE = re.compile(rb"([A-Z]+) (/\S*) HTTP/1\.([01])\r?\n\Z")
_MAX_HEADERS = 100


class _Headers(dict):
    """Request headers by lower-cased name; the first of a repeated header wins, as in
    the stdlib's message class."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: a connection per client, not per request
    default_request_version = "HTTP/1.0"   # errors on garbled request lines still get a status line
    timeout = 120                    # an idle keep-alive connection gives its thread back
    server: _Server

    def setup(self):
        super().setup()
        # Headers and body go out in one write; no Nagle delay on small responses.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # access logs off: they cost more than an inference
        log.debug("%s " + fmt, self.address_string(), *args)

    def parse_request(self) -> bool:
        """A plain HTTP/1.x request line gets its headers read into a dict here; the
        stdlib's email parser took about 0.13 ms of the 2 ms a one-image request costs.
        Anything unusual goes to the stdlib, which answers it as before."""
        m = _REQUEST_LINE.match(self.raw_requestline)
        if m is None:
            return super().parse_request()
        self.command, self.path = m.group(1).decode(), m.group(2).decode("iso-8859-1")
        self.request_version = "HTTP/1." + chr(m.group(3)[0])
        self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        headers = self.headers = _Headers()
        for _ in range(_MAX_HEADERS + 1):
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = line.decode("iso-8859-1").partition(":")
            if len(line) > 65536 or not sep or name != name.strip():   # folded or malformed
                self.close_connection = True
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad header line")
                return False
            headers.setdefault(name.lower(), value.strip())
        else:
            self.close_connection = True
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
            return False
        conn = headers.get("connection", "").lower()
        self.close_connection = conn == "close" or (self.request_version == "HTTP/1.0" and conn != "keep-alive")
        if headers.get("expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    # ---- responses ----

    def _send(self, status: int, body: dict, model=None) -> None:
        if model is None:
            model = self.server.holder.current
        if "model_version" not in body:
            body["model_version"] = str(model.version) if model is not None else None
        if getattr(self, "command", None) == "POST":
            metrics.INFER_REQUESTS.labels(self.server.config.model, str(status)).inc()
        self._send_bytes(status, json.dumps(body, separators=(",", ":")).encode(), "application/json")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
                f"Content-Length: {len(data)}"]
        if self.close_connection:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)

    def _error(self, status: int, message: str, model=None) -> None:
        self._send(status, {"error": message}, model)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's errors (bad request line, unsupported method...) in JSON too."""
        self.close_connection = True
        self._error(int(code), message or HTTPStatus(code).phrase)

    # ---- routing ----

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _guard(self, fn):
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # never a traceback to the client; the log has it
            log.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            self._error(500, "internal error")

    def _get(self):
        path = self.path.split("?", 1)[0]
        holder, cfg = self.server.holder, self.server.config
        if path == "/v2/health/live":
            return self._send(200, {"live": True})
        if path == "/v2/health/ready":
            return self._ready()
        if path == "/metrics":
            current = holder.current
            return self._send_bytes(200, *metrics.exposition(cfg.model, current.version if current else None))
        if path in ("/v2", "/v2/"):
            return self._send(200, {"name": "ctbot-serving", "version": "1", "extensions": []})
        m = _MODEL_PATH.match(path)
        if not m:
            return self._error(404, f"no route GET {path}")
        model = holder.current
        if not self._model_ok(m, model):
            return
        if m.group(3) == "/ready":
            return self._ready(model)
        if m.group(3) == "/infer":
            return self._error(405, "infer takes POST")
        meta = model_metadata(cfg.model, model.version if model else None, cfg.max_batch, cfg.max_k)
        if model is None:
            meta["state"] = self._why_not_ready()
        else:   # how this version searches and embeds, for whoever tunes it
            meta["parameters"]["serving"] = {**model.how, "gallery": model.gallery_size}
        return self._send(200, meta, model)

    def _post(self):
        path = self.path.split("?", 1)[0]
        cfg = self.server.config
        m = _MODEL_PATH.match(path)
        if not m or m.group(3) != "/infer":
            self._drain_or_close()
            return self._error(404 if not m else 405, f"no route POST {path}")
        # One read of holder.current: this request finishes on this model whatever the
        # follower swaps in meanwhile.
        model = self.server.holder.current
        body = self._read_body(cfg.max_body_bytes, model)
        if body is None:
            return
        if not self._model_ok(m, model):
            return
        if model is None:
            return self._error(503, f"not ready: {self._why_not_ready()}")
        t0 = time.perf_counter()
        try:
            x, k, rid, outputs = parse_infer(body, max_batch=cfg.max_batch, max_k=cfg.max_k,
                                             json_length=self.headers.get("Inference-Header-Content-Length"))
        except ProtocolError as e:
            return self._error(e.status, e.message, model)
        if k > model.gallery_size:
            return self._error(400, f"parameter k={k} is more than the {model.gallery_size} "
                                    f"gallery images of v{model.version}", model)
        t1 = time.perf_counter()
        result = model.predict(x, k)
        t2 = time.perf_counter()
        self._send(200, infer_response(cfg.model, model.version, result, outputs, rid), model)
        metrics.infer_done(cfg.model, t1 - t0, t2 - t1, time.perf_counter() - t2)

    # ---- helpers ----

    def _model_ok(self, m, model) -> bool:
        name, version = m.group(1), m.group(2)
        if name != self.server.config.model:
            self._error(404, f"unknown model {name!r}: this server serves {self.server.config.model!r}")
            return False
        if version is not None and (model is None or version not in (str(model.version), f"v{model.version}")):
            served = f"v{model.version}" if model else "no version yet"
            self._error(404, f"version {version!r} of {name!r} is not served here (serving {served})")
            return False
        return True

    def _ready(self, model=None):
        model = model or self.server.holder.current
        if model is None:
            return self._send(503, {"ready": False, "reason": self._why_not_ready()})
        return self._send(200, {"ready": True, "name": self.server.config.model}, model)

    def _why_not_ready(self) -> str:
        h = self.server.holder
        if h.alias_version is None:
            return "no production model yet"
        return h.last_error or f"loading v{h.alias_version}"

    def _read_body(self, limit: int, model) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._error(411, "send a Content-Length; chunked bodies are not accepted", model)
            return None
        raw = self.headers.get("Content-Length")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except (TypeError, ValueError):
            self.close_connection = True
            self._error(411 if raw is None else 400, f"a valid Content-Length is required, got {raw!r}", model)
            return None
        if n > limit:
            # Not reading a body that large: the connection closes instead of draining it.
            self.close_connection = True
            self._error(413, f"request body of {n} bytes is over the {limit}-byte limit", model)
            return None
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            return None
        return body

    def _drain_or_close(self):
        n = self.headers.get("Content-Length")
        if n and n.isdigit() and int(n) <= self.server.config.max_body_bytes:
            self.rfile.read(int(n))
        else:
            self.close_connection = True


class ModelServer:
    """The HTTP server around a holder; start() returns once it listens."""

    def __init__(self, holder: ModelHolder, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080):
        self.httpd = _Server((host, port), Handler)
        self.httpd.holder, self.httpd.config = holder, config
        self.holder, self.config = holder, config
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                         name="serve-model-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)
