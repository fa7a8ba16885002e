"""The model server assembled in this process: holder, alias follower, uvicorn on a
thread. The caller passes the store in (ctbot.wiring builds it), so nothing here opens
a network client. Several worker processes: serving.server.run_workers."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from serving.follow import AliasFollower, ModelHolder, subscribe_redis
from serving.limits import HttpLimits
from serving.server import ModelServer, ServerConfig

log = logging.getLogger("serving")


@dataclass
class Serving:
    holder: ModelHolder
    follower: AliasFollower
    server: ModelServer

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def probe_url(self) -> str | None:
        return self.server.probe_url

    def stop(self) -> None:
        """Requests in flight finish first (the server's graceful shutdown)."""
        self.server.stop()
        self.follower.stop()


def start_serving(store, model: str, *, host: str = "127.0.0.1", port: int = 8080,
                  poll_seconds: float = 2.0, max_body_bytes: int = 8 << 20, max_batch: int = 256,
                  threads: int = 1, search: str = "ivf", redis_url: str = "", notice_channel: str = "",
                  workdir: str | None = None, probe_port: int | None = None, infer_threads: int = 2,
                  limits: HttpLimits | None = None, graceful_seconds: float = 25.0,
                  batch_wait_ms: float = 0.0, max_batch_images: int = 64) -> Serving:
    """Load the production version (if any) before listening, so a server that answers
    is already ready; then follow the alias in the background."""
    from serving.model import MAX_K, load_version, set_threads
    from serving.search import check_mode

    set_threads(threads)
    check_mode(search)
    holder = ModelHolder()
    follower = AliasFollower(store, model, holder, poll_seconds=poll_seconds, workdir=workdir,
                             loader=lambda v: load_version(store, model, v, workdir, search=search))
    follower.check()
    config = ServerConfig(model, max_body_bytes=max_body_bytes, max_batch=max_batch, max_k=MAX_K,
                          batch_wait_ms=batch_wait_ms, max_batch_images=max_batch_images)
    server = ModelServer(holder, config, host, port, limits=limits, probe_port=probe_port,
                         infer_threads=infer_threads, graceful_seconds=graceful_seconds).start()
    follower.start()
    if redis_url and notice_channel:
        subscribe_redis(redis_url, notice_channel, follower)
    return Serving(holder, follower, server)
