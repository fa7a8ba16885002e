"""uvicorn with the limits it does not enforce itself, run on a thread of its own.

uvicorn's httptools protocol already rejects ambiguous framing (llhttp: Content-Length
with Transfer-Encoding, duplicate or non-decimal lengths, bad chunk sizes) with 400 and
a closed connection; it closes idle keep-alive connections and answers 503 over
``limit_concurrency``. It has no limit on the size or number of request headers and no
deadline for receiving a request, so one client sending a byte a second holds a
connection for ever. ``LimitedHttpToolsProtocol`` adds those three (431, 431, 408),
each answered and the connection closed without reading the rest. docs/http.md lists
which limit comes from where.

    server = HttpServer([Listener(app, sock, limits)]).start()   # serves on its own thread
    server.stop()     # stop accepting, finish requests in flight (bounded), return
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("ctbot.http")


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16 << 10
    max_headers: int = 100
    max_connections: int = 1000
    request_seconds: float = 10.0
    keepalive_seconds: float = 5.0
    shutdown_seconds: float = 20.0

    @classmethod
    def from_section(cls, http) -> Limits:
        """From core.config.HttpSection (the body limit is the app's: it knows the route)."""
        return cls(http.max_header_bytes, http.max_headers, http.max_connections, http.request_seconds,
                   http.keepalive_seconds, http.shutdown_seconds)


class Refused(Exception):
    """Raised from a parser callback: answer ``status`` and close the connection."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a head-size limit, a header-count limit and a
    whole-request deadline. ``limits`` is set on a subclass per listener (protocol_for)."""

    limits: Limits = Limits()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._in_head, self._head_bytes, self._raw_head_bytes, self._n_headers = True, 0, 0, 0
        self._deadline: asyncio.TimerHandle | None = None
        self._receiving_head = self._draining = False
        self._arm_deadline()        # a connection that never sends a whole request is closed too

    def connection_lost(self, exc) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    # -- the deadline for receiving a whole request ---------------------------------------

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.request_seconds, self._request_timed_out)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.response_started:
            self.transport.close()      # it is being answered already; nothing more to say
            return
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True   # the app's receive() now gets http.disconnect
            cycle.message_event.set()
        self._refuse(408, "the request was not received in time")

    # -- head size and header count ---------------------------------------------------------

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.limits.max_header_bytes:
            raise Refused(431, "request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._raw_head_bytes, self._n_headers = True, 0, 0, 0
        self._receiving_head = True
        self._arm_deadline()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._n_headers += 1
        if self._n_headers > self.limits.max_headers:
            raise Refused(431, "too many request headers")
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = self._receiving_head = False
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def shutdown(self) -> None:
        """Graceful stop: a request whose head is still arriving is in flight too (uvicorn
        would drop it); it is answered, then the connection closes. Its deadline bounds it."""
        self._draining = True
        if self._receiving_head and (self.cycle is None or self.cycle.response_complete):
            return
        super().shutdown()

    def on_message_complete(self) -> None:
        self._disarm_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and not self.cycle.more_body:
            return
        # answered before the whole body came (413 and the like): it is not read on
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._in_head:
            # httptools buffers a header line whole before any callback sees it, so the raw
            # bytes of an unfinished head are bounded here (at most one read past the limit).
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.limits.max_header_bytes + len(data):
                self._refuse(431, "request headers too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__
            if isinstance(refused, Refused):
                self._refuse(refused.status, refused.reason)
            else:   # a bug in a callback: say 400, log it once with its traceback
                log.error("HTTP parser callback failed", exc_info=refused)
                self._refuse(400, "invalid HTTP request")
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            self._refuse(400, f"invalid HTTP request: {e}")
        else:
            if self._in_head and self._raw_head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "request headers too large")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with a one-line reason and close: the rest is never read."""
        self._disarm_deadline()
        if self.transport.is_closing():
            return
        log.debug("refused %s from %s: %s", status, self.client, reason)
        body = (reason + "\n").encode("ascii", "replace")
        self.transport.write(b"".join([STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                                       b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body]))
        self.transport.close()


def protocol_for(limits: Limits) -> type[LimitedHttpToolsProtocol]:
    return type("CtbotHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it from getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


@dataclass
class Listener:
    app: object            # an ASGI application
    sock: socket.socket
    limits: Limits
    max_connections: int | None = None    # None: limits.max_connections

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]


def raise_open_files_limit(wanted: int) -> None:
    """Each connection is a file descriptor: lift the soft limit towards the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as e:   # not fatal: fewer connections, then 503s
        log.warning("could not raise the open-files limit: %s", e)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:   # uvloop is not built for this platform
        return asyncio.new_event_loop()


class HttpServer:
    """uvicorn servers, one per listener, sharing one event loop on a thread."""

    def __init__(self, listeners: list[Listener], name: str = "ctbot-http"):
        self.listeners, self.name = listeners, name
        self.servers = [uvicorn.Server(uvicorn.Config(
            lst.app, http=protocol_for(lst.limits), lifespan="off", log_config=None, access_log=False,
            proxy_headers=False, server_header=False, interface="asgi3",
            limit_concurrency=lst.max_connections or lst.limits.max_connections,
            timeout_keep_alive=lst.limits.keepalive_seconds,   # a float works: it is only call_later's
            timeout_graceful_shutdown=lst.limits.shutdown_seconds)) for lst in listeners]
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30) -> HttpServer:
        raise_open_files_limit(sum(lst.max_connections or lst.limits.max_connections for lst in self.listeners) + 256)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error:
            raise RuntimeError(f"HTTP server did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        loop = new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:   # noqa: BLE001 - reported to start()'s caller
            self._error = e
            self._started.set()
            log.exception("HTTP server stopped")
        finally:
            loop.close()

    async def _serve(self) -> None:
        tasks = [asyncio.ensure_future(s.serve(sockets=[lst.sock])) for s, lst in zip(self.servers, self.listeners,
                                                                                        strict=True)]
        while not all(s.started for s in self.servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        self._started.set()
        await asyncio.gather(*tasks)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to shutdown_seconds), return."""
        for s in self.servers:
            s.should_exit = True
        if self._thread is not None:
            self._thread.join(max(lst.limits.shutdown_seconds for lst in self.listeners) + 5)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
