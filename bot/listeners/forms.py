"""The training form's submission: validated on the ack path with the text form's checks
(errors go next to their fields, ``response_action: errors``); a good one is recorded as
the command `train <tokens>` under the form's view id and handed to the same job as the
text command, so it is done once however often Slack delivers it, and resumed after a
crash like any accepted command. bot/listeners/form_open.py opens the form.
"""
from __future__ import annotations

import json

from bot import blocks, ids
from bot.blocks.forms import PRESET_BLOCK, form_tokens
from bot.blocks.limits import clip
from bot.listeners.commands import _execute as execute
from bot.listeners.commands import actor_of, run_command
from bot.listeners.guard import error_reply
from bot.listeners.parse import parse
from core.access import Actor
from core.errors import ServiceError


def register(app, service, settings) -> None:
    @app.view(ids.TRAIN_FORM)
    def on_train_form(ack, body: dict):
        view = body.get("view") or {}
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
        except ValueError:
            meta = {}
        user = body.get("user") or {}
        actor = Actor(user.get("id", ""), meta.get("c", ""), user.get("team_id") or (body.get("team") or {}).get("id", ""))
        from steps.params import TrainParams
        tokens, errors = form_tokens((view.get("state") or {}).get("values") or {}, TrainParams.describe(),
                                     service.parse_params)
        if errors:
            ack(response_action="errors", errors=errors)
            return
        cmd_id = f"form:{view.get('id', '')}"
        command = {"text": " ".join(["train", *tokens]), "user_id": str(actor), "channel_id": actor.channel,
                   "team_id": actor.team, "response_url": meta.get("r", ""), "trigger_id": cmd_id,
                   "command": settings.slash_command}
        try:
            service.authorize("train", actor)
            fresh = service.accept_command(cmd_id, command)
        except Exception as e:  # noqa: BLE001 - shown in the form, which stays open
            text = str(e) if isinstance(e, ServiceError) else blocks.fit_message(error_reply(e, "the form"))["text"]
            ack(response_action="errors", errors={PRESET_BLOCK: clip(text.removeprefix("⚠️ "), 300)})
            return
        ack()
        if fresh:   # opened by /ct train: answered through its response_url; from the Home tab: on the Home
            job = run_command if command["response_url"] else run_form_from_home
            app.background.submit(job, parse(command["text"], settings.slash_command), command, what="train form")


def run_form_from_home(ctx, parsed, command: dict) -> None:
    """A form opened from the Home tab has no response_url: the outcome goes on the
    submitter's Home instead. Otherwise the text command's own execution."""
    from bot.homes import HomeTab
    home, cmd_id, user = HomeTab(ctx.service, ctx.client, ctx.settings), command["trigger_id"], command["user_id"]
    try:
        record = ctx.service.command_started(cmd_id)
        out = execute(ctx.service, ctx.client, ctx.settings, parsed, actor_of(command), cmd_id, record)
        home.notice(user, out.get("text") or "", ok=True)
    except Exception as e:  # noqa: BLE001 - the submitter must learn why, on their Home
        home.notice(user, error_reply(e, "the training form")["text"].removeprefix("⚠️ "), ok=False)
    ctx.service.finish_command(cmd_id)
