"""The bot process: Slack client, notifier, training service, scheduler, Bolt app, server.

    proc = build(Settings.from_env())
    proc.start()        # HTTP (or Socket Mode when SLACK_APP_TOKEN is set) + the scheduler
    ...
    proc.stop()

Every network client is created here, in the entry point, never at import time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from slack_sdk import WebClient

from core.config import Settings
from bot.app import create_app, with_rate_limit_retries
from bot.notifier import SlackNotifier

HEAVY_MODULES = ("torch", "faiss")


def heavy_imports() -> dict[str, bool]:
    """Whether torch/faiss got imported into this process (they must not be)."""
    return {name: name in sys.modules for name in HEAVY_MODULES}


@dataclass
class BotProcess:
    settings: Settings
    client: WebClient
    notifier: SlackNotifier
    service: object
    app: object
    scheduler: object | None = None
    server: object | None = None          # bot.server.HttpServer in HTTP mode
    socket: object | None = None          # SocketModeHandler in Socket Mode

    def health(self) -> dict:
        ok, detail = True, {}
        try:
            self.service.state.r.ping()
        except Exception as e:   # report, don't raise: /healthz must answer
            ok, detail["redis"] = False, type(e).__name__
        return {"ok": ok, "mode": "socket" if self.settings.slack_app_token else "http",
                "scheduler": bool(self.scheduler), "imports": heavy_imports(), **detail}

    def start(self, host: str | None = None, port: int | None = None) -> "BotProcess":
        from bot.server import serve_http, serve_socket_mode
        if hasattr(self.app.background, "start"):
            self.app.background.start()     # workers warm up while the server starts
        if self.settings.slack_app_token:
            self.socket = serve_socket_mode(self.app, self.settings.slack_app_token)
        else:
            self.server = serve_http(self.app, host or self.settings.http_host,
                                     self.settings.http_port if port is None else port, health=self.health)
        if self.scheduler is not None:
            self.scheduler.start()
        return self

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.server is not None:
            self.server.shutdown()
        if self.socket is not None:
            self.socket.close()
        self.app.background.shutdown(wait=False)


def slack_client(settings: Settings) -> WebClient:
    kwargs = {"base_url": settings.slack_api_url} if settings.slack_api_url else {}
    return with_rate_limit_retries(WebClient(token=settings.slack_bot_token or None, **kwargs))


def check_settings(settings: Settings) -> None:
    missing = [name for name, value in (("SLACK_BOT_TOKEN", settings.slack_bot_token),
                                        ("REDIS_URL", settings.redis_url)) if not value]
    if not settings.slack_app_token and not settings.slack_signing_secret:
        missing.append("SLACK_SIGNING_SECRET (or SLACK_APP_TOKEN for Socket Mode)")
    if missing:
        raise SystemExit("ctbot serve: missing settings: " + ", ".join(missing))


def build_service(settings: Settings, notifier, *, state=None, store=None, runner=None):
    """The training service (and the unstarted scheduler around it, which also tells the
    service when the next weekly retrain is)."""
    from scheduler.app import build as build_scheduler
    return build_scheduler(settings, notifier, state=state, store=store, runner=runner)[0]


def build(settings: Settings, *, with_scheduler: bool = True, job_workers: int = 2, runner=None,
          state=None, store=None, client: WebClient | None = None) -> BotProcess:
    """The bot process. Slow work runs in ``job_workers`` niced worker processes that
    build their own service from ``settings`` (0: threads in this process, with this
    process's service, runner, state and store)."""
    from bot.background import ProcessBackground
    from scheduler.app import build as build_scheduler

    check_settings(settings)
    client = client or slack_client(settings)
    notifier = SlackNotifier(client, settings.slack_channel, settings)
    service, scheduler = build_scheduler(settings, notifier, state=state, store=store, runner=runner)
    background = ProcessBackground(settings, workers=job_workers) if job_workers else None
    app = create_app(settings, service, client, background=background)
    return BotProcess(settings, client, notifier, service, app, scheduler if with_scheduler else None)
