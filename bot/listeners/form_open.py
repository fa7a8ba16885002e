"""Opening the training form: `/ct train` with no arguments, and the Home tab's *Train…*.

Slack's trigger_id must be exchanged (views.open) within 3 s of the command or click, so
the call is made right after the ack on a small thread pool of its own, never behind
the slow background queue. bot/listeners/forms.py takes the submission.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from bot import blocks
from bot.blocks.forms import train_form
from bot.listeners.guard import error_reply
from core.access import Actor

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


