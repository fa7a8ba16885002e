"""The model server's limits on top of core.httpserver's protocol layer (the bot's too):
that layer bounds the head's size and header count (431) and the time to receive a
whole request (408); this one adds what an inference API needs besides.

What comes from where (docs/serving.md has the table):
  - llhttp (httptools) refuses ambiguous framing on its own: Transfer-Encoding with
    Content-Length, two Content-Lengths, lengths that are not plain ASCII digits
    (``+5``, ``5_0``, ``٥``), obs-folded headers, bad chunk sizes: 400, closed.
  - uvicorn: the keep-alive idle timeout, the listen backlog, the graceful-shutdown
    deadline.
  - core.httpserver: head size and header count (431), the request deadline (408).
  - here: the body size (413, from Content-Length before a byte of the body is read, or
    counted as chunks arrive), open connections per listener (over: closed at once, and
    the probe listener has its own cap), Host on HTTP/1.1 (400), no body on GET/HEAD
    (400), no transfer coding but chunked (501), HTTP/1.0 and 1.1 only (505).
Each answer is written straight to the transport and the connection closed, without
reading the rest and without a traceback in the log.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from uvicorn.config import Config

from core.httpserver import LimitedHttpToolsProtocol, Limits, Refused


@dataclass(frozen=True)
class HttpLimits(Limits):
    request_seconds: float = 30.0         # a whole request (head and body) must arrive within this
    shutdown_seconds: float = 25.0        # on SIGTERM, how long requests in flight may still take
    max_body_bytes: int = 8 << 20
    max_probe_connections: int = 64       # per worker process, on the probe listener
    probe_port: int | None = None         # the listener that answers only probes and /metrics


class LimitedConfig(Config):
    """uvicorn's Config carrying our limits to every connection's protocol (and, pickled,
    to worker processes: a class made per listener would not pickle)."""

    def __init__(self, app, *, limits: HttpLimits, **kwargs):
        super().__init__(app, http=ModelServerProtocol, timeout_keep_alive=limits.keepalive_seconds,
                         timeout_graceful_shutdown=limits.shutdown_seconds, **kwargs)
        self.limits = limits


def _counts(server_state) -> dict:
    # Connections per listener kind, shared by every protocol of one uvicorn server.
    if not hasattr(server_state, "ctbot_connections"):
        server_state.ctbot_connections = {"main": 0, "probe": 0}
    return server_state.ctbot_connections


class ModelServerProtocol(LimitedHttpToolsProtocol):
    def __init__(self, config: LimitedConfig, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits: HttpLimits = config.limits
        self._kind, self._counted, self._body_bytes = "main", False, 0

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # uvicorn writes a response's head and body separately: without this the body
            # can wait on the client's delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = (transport.get_extra_info("sockname") or (None, None))[1]
        self._kind = "probe" if port is not None and port == self.limits.probe_port else "main"
        counts = _counts(self.server_state)
        cap = self.limits.max_probe_connections if self._kind == "probe" else self.limits.max_connections
        if counts[self._kind] >= cap:   # over the cap: closed before a byte is read
            self.transport = transport
            transport.abort()
            return
        counts[self._kind] += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if not self._counted:
            return
        _counts(self.server_state)[self._kind] -= 1
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._body_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._check_framing()
        super().on_headers_complete()

    def _check_framing(self) -> None:
        names = {name for name, _ in self.headers}
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise Refused(505, f"HTTP/{version} is not served here: use HTTP/1.1")
        if version == "1.1" and b"host" not in names:
            raise Refused(400, "an HTTP/1.1 request needs a Host header")
        length = next((v for n, v in self.headers if n == b"content-length"), None)
        coding = b",".join(v for n, v in self.headers if n == b"transfer-encoding")
        if coding and coding.strip().lower() != b"chunked":   # nothing here decodes gzip and the like
            raise Refused(501, f"Transfer-Encoding {coding.decode('latin-1')!r} is not supported: "
                               "send chunked or a length")
        method = self.parser.get_method()
        if method in (b"GET", b"HEAD") and (coding or (length is not None and length.strip() != b"0")):
            raise Refused(400, f"a {method.decode()} request has no body")
        if length is not None and int(length) > self.limits.max_body_bytes:   # llhttp checked its digits
            raise Refused(413, f"request body of {int(length)} bytes is over the {self.limits.max_body_bytes}-byte "
                               "limit")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:   # chunked: counted as it arrives
            raise Refused(413, f"request body over the {self.limits.max_body_bytes}-byte limit")
        super().on_body(body)
