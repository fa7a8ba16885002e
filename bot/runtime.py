"""The bot process: the Bolt app behind its server, plus the scheduler.

    proc = ctbot.wiring.build_bot(deps)
    proc.start()        # HTTP (or Socket Mode when SLACK_APP_TOKEN is set) + the scheduler
    ...
    proc.stop()
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from core.config import Settings, reveal

HEAVY_MODULES = ("torch", "faiss")


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

    def health(self) -> dict:
        problems = self.service.health()
        return {"ok": not problems, "mode": "socket" if reveal(self.settings.slack_app_token) else "http",
                "scheduler": bool(self.scheduler), "imports": heavy_imports(), **problems}

    def start(self, host: str | None = None, port: int | None = None) -> BotProcess:
        from bot.server import serve_http, serve_socket_mode
        if hasattr(self.app.background, "start"):
            self.app.background.start()     # workers warm up while the server starts
        if reveal(self.settings.slack_app_token):
            self.socket = serve_socket_mode(self.app, reveal(self.settings.slack_app_token))
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
