"""The bot process: the Bolt app behind its server, plus the scheduler.

    proc = ctbot.wiring.build_bot(deps)
    proc.start()        # HTTP (or Socket Mode when SLACK_APP_TOKEN is set) + the scheduler
    ...
    proc.stop()

Health: ``live()`` (/livez) is the process answering at all; ``health()`` (/readyz,
/healthz) asks Redis and the store, so an outage takes the pod out of the Service
without restarting it. In Socket Mode the probes and /metrics are still served on
http_port (``probes``), with no Slack route.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from core import metrics
from core.config import Settings, reveal

log = logging.getLogger(__name__)

HEAVY_MODULES = ("torch", "faiss")
STORE_CHECK_SECONDS = 10.0   # the store's readiness listing is asked at most this often


def heavy_imports() -> dict[str, bool]:
    """Whether torch/faiss got imported into this process (they must not be)."""
    return {name: name in sys.modules for name in HEAVY_MODULES}


@dataclass
class BotProcess:
    settings: Settings
    client: object
    notifier: object
    service: object
    app: object
    scheduler: object | None = None
    server: object | None = None          # bot.server.HttpServer in HTTP mode
    socket: object | None = None          # SocketModeHandler in Socket Mode
    probes: object | None = None          # bot.server.HttpServer of /livez, /readyz, /metrics in Socket Mode
    _store_checked: tuple | None = field(default=None, repr=False)   # (monotonic time, problem)

    def health(self) -> dict:
        """Readiness: Redis (the service's own check) and the store answer, and the job
        workers are up (a command acked before them would wait for their start)."""
        problems = dict(self.service.health())
        starting = getattr(self.app.background, "starting", None)
        if starting is not None and (jobs := starting()):
            problems["jobs"] = jobs
        store_problem = self._store_problem()
        if store_problem:
            problems["store"] = store_problem
        if "redis" in problems:
            metrics.dependency_error("redis")
        return {"ok": not problems, "mode": "socket" if reveal(self.settings.slack_app_token) else "http",
                "scheduler": bool(self.scheduler), "imports": heavy_imports(), **problems}

    def _store_problem(self) -> str:
        """'' when the store answers a listing; asked at most every STORE_CHECK_SECONDS
        (readiness runs every half second; a LIST costs money on S3)."""
        now = time.monotonic()
        if self._store_checked is not None and now - self._store_checked[0] < STORE_CHECK_SECONDS:
            return self._store_checked[1]
        problem = ""
        store = getattr(self.service, "store", None)
        if store is not None:
            try:
                # one cheap listing that fails on a missing bucket or bad credentials,
                # which a HEAD of a missing key would not
                next(iter(store.list("readyz/", start_after="readyz/~")), None)
            except Exception as e:   # report, don't raise: the probe must answer
                problem = type(e).__name__
                metrics.dependency_error("s3")
        self._store_checked = (now, problem)
        return problem

    def start(self, host: str | None = None, port: int | None = None) -> BotProcess:
        from bot.server import Readiness, serve_http, serve_socket_mode
        if hasattr(self.app.background, "start"):
            self.app.background.start()     # workers warm up while the server starts
        try:
            metrics.seed(self.service.list_runs(50))
        except Exception as e:   # metrics must never keep the bot from starting
            log.warning("could not seed metrics from past runs: %s", e)
        metrics.follow_production(self.service.production)   # promotes and rollbacks run in job workers
        host = host or self.settings.http_host
        port = self.settings.http_port if port is None else port
        ready = Readiness(self.health)
        if reveal(self.settings.slack_app_token):
            self.probes = serve_http(None, host, port, health=ready, http=self.settings.http)
            self.socket = serve_socket_mode(self.app, reveal(self.settings.slack_app_token))
        else:
            self.server = serve_http(self.app, host, port, health=ready, http=self.settings.http)
        if self.scheduler is not None:
            self.scheduler.start()
        return self

    def stop(self) -> None:
        """SIGTERM: stop accepting, answer the requests in flight, let the jobs their acks
        promised finish, then return (Kubernetes' grace period bounds the whole)."""
        metrics.follow_production(None)
        if self.server is not None:
            self.server.shutdown()
        if self.socket is not None:
            self.socket.close()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        self.app.background.shutdown(wait=True)
        if self.probes is not None:
            self.probes.shutdown()
