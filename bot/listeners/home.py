"""The App Home tab: published when someone opens it and after each of their clicks
(bot/homes.py republishes everyone's when something changes). Its *Train…* button opens
the training form right away; its other buttons are the channel's (bot/listeners/actions.py)."""
from __future__ import annotations

from bot import blocks, ids
from bot.listeners.form_open import open_train_form
from bot.listeners.guard import error_reply
from core.access import Actor


def publish_home(ctx, event: dict, team: str = "") -> None:
    """Background job: render and publish the opener's Home tab."""
    from bot.homes import HomeTab
    HomeTab(ctx.service, ctx.client, ctx.settings).publish(event["user"], team)


def register(app, service, settings) -> None:
    @app.event("app_home_opened")
    def on_home_opened(ack, event, body):
        ack()
        if event.get("tab") in (None, "home"):
            app.background.submit(publish_home, event, body.get("team_id", ""), what="home tab")

    @app.action(ids.HOME_TRAIN)
    def on_train_button(ack, body: dict):
        """Open the form now: the click's trigger_id expires in 3 s."""
        ack()
        who = body.get("user") or {}
        actor = Actor(who.get("id", ""), "", who.get("team_id") or (body.get("team") or {}).get("id", ""))
        from bot.homes import HomeTab
        home = HomeTab(service, app.client, settings)
        try:
            service.authorize("train", actor)
        except Exception as e:  # noqa: BLE001 - shown on their Home
            home.notice(str(actor), blocks.fit_message(error_reply(e, "Train…"))["text"].removeprefix("⚠️ "),
                        ok=False)
            return
        open_train_form(app.client, settings, body.get("trigger_id", ""), {"c": "", "r": "", "t": actor.team},
                        on_failure=lambda m: home.notice(str(actor), m.get("text", "").removeprefix("⚠️ "), ok=False))
