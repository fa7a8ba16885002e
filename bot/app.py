"""The Bolt app factory. Network clients are built by the caller and passed in."""
from __future__ import annotations

import logging

from slack_bolt import App
from slack_sdk import WebClient

from bot.background import JobContext, ThreadBackground
from bot.listeners import actions, commands, forms, home, other_commands
from bot.slack_client import with_rate_limit_retries
from core.config import Settings, reveal

log = logging.getLogger(__name__)


class _DropTokenNotice(logging.Filter):
    """Bolt warns "token will be unused" whenever SLACK_BOT_TOKEN is in the environment
    and a client is passed in, which is exactly how ctbot is meant to run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


def _bolt_logger() -> logging.Logger:
    logger = logging.getLogger("bot.bolt")
    if not any(isinstance(f, _DropTokenNotice) for f in logger.filters):
        logger.addFilter(_DropTokenNotice())
    return logger


class BotApp(App):
    """A Bolt App that also owns where its listeners send slow work (``background``:
    a ThreadBackground or ProcessBackground, see bot/background.py)."""

    background: object


def create_app(settings: Settings, service, client: WebClient, background=None) -> BotApp:
    """A Bolt App wired to ``service``. It makes no network call here; on its first
    request Bolt calls auth.test once through ``client``. Slow work runs on
    ``background`` (default: a thread pool in this process with this service)."""
    app = BotApp(
        signing_secret=reveal(settings.slack_signing_secret),
        client=with_rate_limit_retries(client),
        token_verification_enabled=False,
        # Listeners run on the request thread: they ack and hand slow work to
        # app.background, so nothing slow ever sits between a request and its ack.
        process_before_response=True,
        logger=_bolt_logger(),
    )
    app.background = background or ThreadBackground(JobContext(service, app.client, settings))
    for module in (commands, actions, forms, home, other_commands):   # other_commands last: it matches any command
        module.register(app, service, settings)

    @app.error
    def on_error(error, body, logger):
        # Reached only by bugs in an ack path; Slack then shows its generic failure.
        logger.error("unhandled error for %s", (body or {}).get("type") or "command", exc_info=error)

    return app
