"""Slash commands other than ctbot's own: a second command name pointed at the same URL,
or a command renamed in Slack but not in the config. Bolt would answer 404, which Slack
shows as a bare "dispatch_failed"; this says which command ctbot serves instead."""
from __future__ import annotations

import re

from bot import blocks


def register(app, service, settings) -> None:
    """Register after the real command: Bolt runs the first listener that matches."""
    served = settings.slash_command

    @app.command(re.compile(r".*"))
    def on_other_command(ack, body: dict):
        ack(**blocks.fit_message(blocks.other_command(str(body.get("command") or "?"), served)))
