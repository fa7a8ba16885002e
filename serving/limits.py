"""The limits uvicorn and httptools do not enforce by themselves, as a thin layer over
uvicorn's httptools protocol (its parser, llhttp, still does all the parsing).

What comes from where (docs/serving.md has the table):
  - llhttp (httptools) refuses ambiguous framing on its own: Transfer-Encoding with
    Content-Length, two Content-Lengths, lengths that are not plain ASCII digits
    (``+5``, ``5_0``, ``٥``), obs-folded headers, bad chunk sizes. Answered 400 here,
    with llhttp's reason, and the connection closed.
  - uvicorn: the keep-alive idle timeout (``timeout_keep_alive``), the listen backlog,
    the graceful-shutdown deadline.
  - this module: the head's size (431) and header count (431), the body size (413,
    from Content-Length before a byte of the body is read, or counted as chunks
    arrive), a deadline for receiving a whole request from its first byte, or from
    the connection's opening for the first one (408), concurrent connections per
    listener (over: closed at once), a Host header on HTTP/1.1 (400), no body on
    GET/HEAD (400).
Each answer is written straight to the transport and the connection closed, without
reading the rest and without a traceback in the log.
"""
from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("serving.limits")


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 16 << 10      # request line and headers together
    max_headers: int = 100
    max_body_bytes: int = 8 << 20
    max_connections: int = 1000           # per worker process, on the inference listener
    max_probe_connections: int = 64       # per worker process, on the probe listener
    keepalive_seconds: float = 5.0        # an idle keep-alive connection is closed after this
    request_seconds: float = 30.0         # a whole request (head and body) must arrive within this
    probe_port: int | None = None         # the listener that answers only probes and /metrics


class LimitedConfig(Config):
    """uvicorn's Config carrying our limits to every connection's protocol (and, pickled,
    to worker processes)."""

    def __init__(self, app, *, limits: HttpLimits, **kwargs):
        super().__init__(app, http=LimitedHttpProtocol, timeout_keep_alive=limits.keepalive_seconds, **kwargs)
        self.limits = limits


class _Rejected(Exception):
    """Stops llhttp mid-feed once a limit has been answered."""


def _counts(server_state) -> dict:
    # Connections per listener kind, shared by every protocol of one uvicorn server.
    if not hasattr(server_state, "ctbot_connections"):
        server_state.ctbot_connections = {"main": 0, "probe": 0}
    return server_state.ctbot_connections


class LimitedHttpProtocol(HttpToolsProtocol):
    def __init__(self, config: LimitedConfig, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits: HttpLimits = config.limits
        self._kind = "main"
        self._rejected = False
        self._deadline = None          # TimerHandle: the request-receiving deadline
        self._in_head = True
        self._head_raw = 0             # bytes received while the head is incomplete
        self._head_parsed = 0          # bytes of request line and headers parsed
        self._header_count = 0
        self._body_bytes = 0
        self._cycle_is_current = False   # self.cycle belongs to the request being received

    # ---- connections ----

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # uvicorn writes a response's head and body separately: without this the body
            # can wait on the client's delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = (transport.get_extra_info("sockname") or (None, None))[1]
        self._kind = "probe" if port is not None and port == self.limits.probe_port else "main"
        counts = _counts(self.server_state)
        counts[self._kind] += 1
        cap = self.limits.max_probe_connections if self._kind == "probe" else self.limits.max_connections
        if counts[self._kind] > cap:   # over the cap: closed before a byte is read
            self._rejected = True
            transport.abort()
            return
        self._arm_deadline()

    def connection_lost(self, exc) -> None:
        _counts(self.server_state)[self._kind] -= 1
        self._disarm_deadline()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.request_seconds, self._request_timed_out)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self._reject(408, f"the request did not arrive within {self.limits.request_seconds:g}s")

    def _reject(self, status: int, message: str) -> None:
        """Answer now, close, read nothing more."""
        self._rejected = True
        self._disarm_deadline()
        cycle = self.cycle if self._cycle_is_current else None   # else: an earlier request's
        if cycle is not None:
            if cycle.response_started:   # too late for a status: just close
                self.transport.close()
                return
            cycle.disconnected = True   # the app's receive() ends, its send() writes nothing
            cycle.message_event.set()
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                                       b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body]))
        self.transport.close()
        log.debug("%s %s: %s", self.client, status, message)

    # ---- bytes in ----

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._rejected or self.transport.is_closing():
            return
        if self._in_head:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not served here")
            return
        except httptools.HttpParserError as e:
            if not self._rejected:   # llhttp's own refusal: ambiguous or malformed framing
                self._reject(400, f"malformed HTTP request: {e}")
            return
        if self._in_head and self._head_raw > self.limits.max_header_bytes:
            self._reject(431, f"request head over the {self.limits.max_header_bytes}-byte limit")

    # ---- parser callbacks ----

    def on_message_begin(self) -> None:
        self._in_head, self._head_parsed, self._header_count, self._body_bytes = True, 0, 0, 0
        self._cycle_is_current = False
        self._arm_deadline()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_parsed += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_parsed += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            self._reject(431, f"more than {self.limits.max_headers} header fields")
            raise _Rejected
        if self._head_parsed > self.limits.max_header_bytes:
            self._reject(431, f"request head over the {self.limits.max_header_bytes}-byte limit")
            raise _Rejected
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_raw = False, 0
        problem = self._framing_problem()
        if problem:
            self._reject(*problem)
            raise _Rejected
        super().on_headers_complete()
        self._cycle_is_current = True

    def _framing_problem(self) -> tuple[int, str] | None:
        names = {name for name, _ in self.headers}
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            return 505, f"HTTP/{version} is not served here: use HTTP/1.1"
        if version == "1.1" and b"host" not in names:
            return 400, "an HTTP/1.1 request needs a Host header"
        length = next((v for n, v in self.headers if n == b"content-length"), None)
        coding = b",".join(v for n, v in self.headers if n == b"transfer-encoding")
        chunked = bool(coding)
        if chunked and coding.strip().lower() != b"chunked":   # nothing here decodes gzip and the like
            return 501, f"Transfer-Encoding {coding.decode('latin-1')!r} is not supported: send chunked or a length"
        method = self.parser.get_method()
        if method in (b"GET", b"HEAD") and (chunked or (length is not None and length.strip() != b"0")):
            return 400, f"a {method.decode()} request has no body"
        if length is not None and int(length) > self.limits.max_body_bytes:   # llhttp checked its digits
            return 413, (f"request body of {int(length)} bytes is over the {self.limits.max_body_bytes}-byte "
                         "limit")
        return None

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:   # chunked: counted as it arrives
            self._reject(413, f"request body over the {self.limits.max_body_bytes}-byte limit")
            raise _Rejected
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm_deadline()
        self._in_head, self._head_raw = True, 0   # what comes next is the next request's head
        super().on_message_complete()
