"""The App Home tab: status and recent runs, refreshed whenever someone opens it."""
from __future__ import annotations

from bot import blocks
from bot.blocks.limits import fit


def home_view(status: dict, runs: list) -> dict:
    status_blocks = blocks.status_message(status)["blocks"]
    runs_blocks = blocks.runs_message(runs)["blocks"]
    return {"type": "home", "blocks": fit(status_blocks + [{"type": "divider"}] + runs_blocks)}


def publish_home(ctx, event: dict) -> None:
    """Background job: render and publish the opener's Home tab."""
    ctx.client.views_publish(user_id=event["user"], view=home_view(ctx.service.status(), ctx.service.list_runs(10)))


def register(app, service, settings) -> None:
    @app.event("app_home_opened")
    def on_home_opened(ack, event):
        ack()
        if event.get("tab") in (None, "home"):
            app.background.submit(publish_home, event, what="home tab")
