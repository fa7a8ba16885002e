"""The training form: `/ct train` with no arguments opens it; its submission starts one
run exactly as `/ct train key=value …` would.

Opening: Slack's trigger_id must be exchanged (views.open) within 3 s of the command, so
the call is made right after the ack on a small thread pool of its own, never behind
the slow background queue. Submitting: validated on the ack path with the text form's
checks (errors go next to their fields, ``response_action: errors``); a good one is
recorded as the command `train <tokens>` under the form's view id and handed to the
same job as the text command, so it is done once however often Slack delivers it, and
resumed after a crash like any accepted command.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

from bot import blocks, ids
from bot.blocks.forms import PRESET_BLOCK, form_tokens, train_form
from bot.blocks.limits import clip
from bot.listeners.guard import error_reply
from bot.listeners.parse import parse
from core.access import Actor
from core.errors import ServiceError

log = logging.getLogger(__name__)

_opener: ThreadPoolExecutor | None = None


def _open_pool() -> ThreadPoolExecutor:
    global _opener
    if _opener is None:
        _opener = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ctbot-views")
    return _opener


def train_form_view(settings, meta: dict) -> dict:
    from steps.params import PRESETS, TrainParams  # torch-free by contract
    return train_form(TrainParams.describe(), PRESETS, private_metadata=meta, command=settings.slash_command)


def open_train_form(client, settings, trigger_id: str, meta: dict, on_failure=None) -> None:
    """views.open right away on the opener pool; ``on_failure(message)`` tells the user
    when Slack refuses (an expired trigger, a Slack outage)."""
    def run():
        try:
            client.views_open(trigger_id=trigger_id, view=train_form_view(settings, meta))
        except Exception as e:   # noqa: BLE001 - the user must hear why no form appeared
            log.warning("views.open of the training form failed: %s", e)
            if on_failure is not None:
                on_failure(blocks.error(
                    "Slack did not open the training form"
                    f" ({getattr(getattr(e, 'response', None), 'get', lambda _k: None)('error') or type(e).__name__}).",
                    f"`{settings.slash_command} train key=value …` starts a run without it."))
    _open_pool().submit(run)


def on_train_without_arguments(app, service, settings, body: dict, ack, actor: Actor) -> None:
    """`/ct train` alone: refuse at once if the user may not train, else ack (nothing to
    show) and open the form."""
    try:
        service.authorize("train", actor)
    except Exception as e:  # noqa: BLE001 - Forbidden, or Redis down for the audit
        ack(**error_reply(e, f"`{settings.slash_command} train`"))
        return
    ack()
    respond = _responder(body.get("response_url", ""))
    open_train_form(app.client, settings, body.get("trigger_id", ""),
                    {"c": body.get("channel_id", ""), "r": body.get("response_url", "")},
                    on_failure=respond)


def _responder(response_url: str):
    def respond(message: dict) -> None:
        if not response_url:
            return
        from slack_bolt.context.respond import Respond
        try:
            Respond(response_url=response_url)(**blocks.fit_message(message), response_type="ephemeral")
        except Exception:  # noqa: BLE001 - nothing left to tell the user with
            log.warning("could not tell the user why the form did not open", exc_info=True)
    return respond


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
        if fresh:
            from bot.listeners.commands import run_command
            app.background.submit(run_command, parse(command["text"], settings.slash_command), command,
                                  what="train form")
