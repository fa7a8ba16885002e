"""The model server's HTTP front: serving.asgi's app on uvicorn (httptools' C parser,
uvloop), with serving.limits' protocol layer.

Two ways to run it:
  - ModelServer: one uvicorn server on a thread of this process, around a holder the
    caller owns (start_serving, the tests, `serve-model --workers 1`);
  - run_workers: N worker processes (uvicorn's supervisor) sharing the listening
    sockets bound here; each loads the production model and follows the alias itself.
    The supervisor restarts a worker that dies; SIGTERM drains them all.

Either way: a second listener (``probe_port``) answers only the health probes and
/metrics, with its own connection cap, so a flood on the inference port or a queue of
batches cannot make Kubernetes think the pod is dead. SIGTERM (or stop()) closes the
listeners, lets requests in flight finish (up to ``graceful_seconds``), then exits.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace

from core.httpserver import bind, raise_open_files_limit
from serving.asgi import InferenceApp, ServerConfig
from serving.follow import ModelHolder
from serving.limits import HttpLimits, LimitedConfig

log = logging.getLogger("serving.server")

__all__ = ["ModelServer", "ServerConfig", "WorkerSpec", "run_workers"]


def _uvicorn_config(app, limits: HttpLimits, workers: int = 1) -> LimitedConfig:
    raise_open_files_limit(limits.max_connections + limits.max_probe_connections + 256)   # workers inherit it
    return LimitedConfig(app, limits=limits, loop="uvloop", lifespan="on", workers=workers, interface="asgi3",
                         log_config=None, access_log=False, server_header=False, proxy_headers=False, backlog=2048)


def _url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


class ModelServer:
    """uvicorn on a thread of this process; start() returns once it listens."""

    def __init__(self, holder: ModelHolder, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080, *,
                 limits: HttpLimits | None = None, probe_port: int | None = None, infer_threads: int = 2,
                 graceful_seconds: float = 25.0):
        self.holder, self.host = holder, host
        self.sockets = [bind(host, port)]
        if probe_port is not None:
            self.sockets.append(bind(host, probe_port))
            probe_port = self.sockets[1].getsockname()[1]
        config.probe_port = probe_port
        self.config = config
        self._address = self.sockets[0].getsockname()[:2]   # still known after stop()
        limits = replace(limits or HttpLimits(), max_body_bytes=config.max_body_bytes, probe_port=probe_port,
                         shutdown_seconds=graceful_seconds)
        self.app = InferenceApp(holder, config, infer_threads=infer_threads)
        import uvicorn
        self.uvicorn = uvicorn.Server(_uvicorn_config(self.app, limits))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    @property
    def url(self) -> str:
        return _url(self.host, self.address[1])

    @property
    def probe_url(self) -> str | None:
        return _url(self.host, self.config.probe_port) if self.config.probe_port is not None else None

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": self.sockets},
                                        name="serve-model-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the model server did not start listening")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, return."""
        self.uvicorn.should_exit = True
        if self._thread:
            self._thread.join(timeout=self.uvicorn.config.timeout_graceful_shutdown + 10)
        for s in self.sockets:
            s.close()


# ---- several worker processes ----

@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process builds its model server from (pickled to it)."""
    store: str
    model: str
    poll_seconds: float = 2.0
    max_body_bytes: int = 8 << 20
    max_batch: int = 256
    threads: int = 1
    infer_threads: int = 2
    search: str = "ivf"
    redis_url: str = ""
    notice_channel: str = ""
    probe_port: int | None = None
    log_level: str = "INFO"
    batch_wait_ms: float = 0.0
    max_batch_images: int = 64


class WorkerApp:
    """The ASGI app of one worker process: built there on the first (lifespan) call, so
    only this small spec crosses the process boundary."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self._app: InferenceApp | None = None

    def __getstate__(self):
        return {"spec": self.spec, "_app": None}

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            self._app = self._build()
        await self._app(scope, receive, send)

    def _build(self) -> InferenceApp:
        from serving.follow import AliasFollower, subscribe_redis
        from serving.model import MAX_K, load_version, set_threads
        from steps.storage import open_store

        spec = self.spec
        logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        store = open_store(spec.store)
        holder = ModelHolder()
        follower = AliasFollower(store, spec.model, holder, poll_seconds=spec.poll_seconds,
                                 loader=lambda v: load_version(store, spec.model, v, search=spec.search))

        def startup():
            set_threads(spec.threads)
            follower.check()
            follower.start()
            if spec.redis_url and spec.notice_channel:
                subscribe_redis(spec.redis_url, spec.notice_channel, follower)

        config = ServerConfig(spec.model, max_body_bytes=spec.max_body_bytes, max_batch=spec.max_batch, max_k=MAX_K,
                              probe_port=spec.probe_port, batch_wait_ms=spec.batch_wait_ms,
                              max_batch_images=spec.max_batch_images)
        return InferenceApp(holder, config, infer_threads=spec.infer_threads, startup=startup, shutdown=follower.stop)


def run_workers(spec: WorkerSpec, workers: int, host: str, port: int, *, limits: HttpLimits | None = None,
                probe_port: int | None = None, graceful_seconds: float = 25.0, on_ready=None) -> int:
    """Serve with ``workers`` processes until SIGTERM/SIGINT; returns an exit status.
    on_ready(url, probe_url, what) is called once every worker has loaded its model."""
    from uvicorn.supervisors.multiprocess import Multiprocess

    sockets = [bind(host, port)]
    if probe_port is not None:
        sockets.append(bind(host, probe_port))
        probe_port = sockets[1].getsockname()[1]
    spec = replace(spec, probe_port=probe_port)
    limits = replace(limits or HttpLimits(), max_body_bytes=spec.max_body_bytes, probe_port=probe_port,
                     shutdown_seconds=graceful_seconds)
    url = _url(host, sockets[0].getsockname()[1])
    probe_url = _url(host, probe_port) if probe_port is not None else None
    metrics_dir = tempfile.mkdtemp(prefix="ctbot-serving-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir   # inherited by the workers
    started = {"ok": False}

    class Workers(Multiprocess):
        def terminate_all(self) -> None:
            # Our copies first: once the workers close theirs too, connections are refused
            # instead of waiting in a backlog nobody accepts from any more.
            for s in sockets:
                s.close()
            super().terminate_all()

        def init_processes(self) -> None:
            super().init_processes()
            for process in self.processes:
                if not process.wait_until_ready(600, self.should_exit):
                    log.error("a model server worker did not start; stopping")
                    self.should_exit.set()
                    return
            started["ok"] = True
            if on_ready:
                on_ready(url, probe_url, _what_is_served(url if host not in ("0.0.0.0", "::", "") else
                                                         _url("127.0.0.1", sockets[0].getsockname()[1]), spec.model))

    try:
        Workers(_uvicorn_config(WorkerApp(spec), limits, workers), sockets).run()
    finally:
        for s in sockets:
            s.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if started["ok"] else 1


def _what_is_served(url: str, model: str) -> str:
    """'<model> vN', or why nothing is, as the server itself says it."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{model}", timeout=30) as r:
            meta = json.loads(r.read())
    except OSError as e:
        return f"{model}: metadata unreadable ({e}); not ready"
    if meta.get("versions"):
        return f"{model} v{meta['versions'][-1]}"
    return f"{model}: {meta.get('state') or 'no production model yet'}; not ready"
