"""Buttons: on new-data alerts, run messages, reports and the App Home tab.

Each ack()s at once (an empty 200) and does its work as a background job: call the
service (which audits who did what), then update the message the button was on so
everyone in the channel sees the outcome and nobody clicks the same thing twice.
Failures go to the clicker only, as an ephemeral reply through the response_url. A
click on the Home tab has no message and no response_url: it runs the very same job,
and its outcome or failure is shown at the top of the clicker's Home.
"""
from __future__ import annotations

import contextlib
import functools
import time

from bot import blocks, ids
from bot.blocks.common import esc
from bot.blocks.events import run_metadata
from bot.listeners.guard import error_reply, replying_on_error
from bot.listeners.parse import is_ascii_number
from core.access import Actor


class Click:
    """What a block_actions payload says: who clicked which button on which message."""

    def __init__(self, body: dict):
        action = (body.get("actions") or [{}])[0]
        self.action_id = action.get("action_id", "")
        self.value = action.get("value") or ""
        user = body.get("user") or {}
        self.channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id", "")
        team = (body.get("team") or {}).get("id") or user.get("team_id", "")
        self.user = Actor(user.get("id", ""), self.channel, team)
        message = body.get("message") or {}
        self.ts = message.get("ts") or (body.get("container") or {}).get("message_ts", "")
        self.blocks = message.get("blocks") or []
        self.response_url = body.get("response_url", "")
        self.in_view = (body.get("container") or {}).get("type") == "view"   # the Home tab
        if self.in_view:   # one effect per button of this rendering of the view: its hash changes on publish
            self.ts = "view:" + str((body.get("view") or {}).get("hash") or (body.get("container") or {}).get("view_id"))


def _private(ctx, click: Click):
    """Error replies go to the clicker only and leave the message alone."""
    if click.in_view:
        return _on_home_error(ctx, click)
    return replying_on_error(ctx.respond(click.response_url), "that button",
                             response_type="ephemeral", replace_original=False)


@contextlib.contextmanager
def _on_home_error(ctx, click: Click):
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the clicker must learn why, on their Home
        _home(ctx).notice(str(click.user), error_reply(exc, "that button")["text"].removeprefix("⚠️ "), ok=False)


def _home(ctx):
    from bot.homes import HomeTab
    return HomeTab(ctx.service, ctx.client, ctx.settings)


def _update(ctx, click: Click, note: str, drop: tuple[str, ...] | None, run=None) -> None:
    """Show on the clicked message what happened, and by whom; a run's message gets its
    ctbot_run metadata anew (Slack keeps the old metadata on an update without it)."""
    if click.channel and click.ts and click.blocks:
        extra = {"metadata": run_metadata(run, f"run-{run.run_id}")} if run is not None else {}
        ctx.client.chat_update(channel=click.channel, ts=click.ts,
                               **blocks.fit_message(blocks.resolved(click.blocks, note, drop=drop)), **extra)


def _tell_clicker(ctx, click: Click, message: dict) -> None:
    if click.in_view:
        _home(ctx).notice(str(click.user), message.get("text") or "", ok=True)
        return
    ctx.respond(click.response_url)(**blocks.fit_message(message), response_type="ephemeral",
                                    replace_original=False)


# ---- jobs: job(ctx, body) ----------------------------------------------------------------

def once_per_button(action: str):
    """For a button with an effect: the clicker must be on ``action``'s access list, and
    there is one effect per button of a message, however many clicks, clickers or
    repeated deliveries: the first allowed click claims it; later ones are told what
    happened. A click whose job fails frees the button again."""
    return functools.partial(_once_per_button, action)


def _once_per_button(action: str, job):
    @functools.wraps(job)   # picklable by name: jobs run in worker processes
    def guarded(ctx, body: dict) -> None:
        c = Click(body)
        key = f"{c.channel}:{c.ts}:{c.action_id}:{c.value}"
        claimed = False
        with _private(ctx, c):
            owner = ctx.service.get_run(c.value).requested_by if action == "cancel" else ""
            ctx.service.authorize(action, c.user, owner=owner)   # refused: told privately, nothing changes
            first = ctx.service.claim_effect(key, c.user)
            if first is not None:
                done = first.get("outcome") or "is still being handled"
                _tell_clicker(ctx, c, blocks.info(f"Already done: <@{first.get('by')}> clicked this first and "
                                                  f"{esc(done)}."))
            claimed = first is None
        if not claimed:
            return
        outcome = None
        try:
            outcome = job(ctx, body)
        finally:
            if outcome:
                ctx.service.settle_effect(key, c.user, outcome)
            else:
                ctx.service.release_effect(key)
        if outcome and c.in_view:
            _home(ctx).notice(str(c.user), f"You {esc(outcome)}.", ok=True)
    return guarded



def _run_from_alert(ctx, body: dict, mode: str, what: str) -> str:
    c = Click(body)
    with _private(ctx, c):
        # The alert id is the dedupe key: two clicks (or two people, on either button) start one run.
        run = ctx.service.request_training(f"new data (alert {c.value}), {what} by <@{c.user}>",
                                           {"mode": mode}, c.user, trigger="new_data", dedupe_key=c.value)
        _update(ctx, c, f":rocket: <@{c.user}> started run `{esc(run.run_id)}` from this alert ({what}).", None)
        return f"started run {run.run_id}"


@once_per_button("train")
def retrain_new_data(ctx, body: dict) -> str | None:
    return _run_from_alert(ctx, body, "full", "retrain")


@once_per_button("train")
def refresh_new_data(ctx, body: dict) -> str | None:
    return _run_from_alert(ctx, body, "refresh", "refresh gallery")


@once_per_button("train")
def dismiss_alert(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        ctx.service.dismiss_alert(c.value, by=c.user)
        _update(ctx, c, f":wave: Dismissed by <@{c.user}>; the data stays pending for the next run.", None)
        return "dismissed the alert"


@once_per_button("deploy")
def promote(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        version = ctx.service.promote(c.value, by=c.user)
        _update(ctx, c, f":rocket: <@{c.user}> promoted this run to production as *v{version}*.", (ids.PROMOTE,),
                run=ctx.service.get_run(c.value))
        return f"promoted it as v{version}"


@once_per_button("rollback")
def rollback(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        shown = int(c.value) if is_ascii_number(c.value) else None
        moved = ctx.service.rollback(None, by=c.user, expect_production=shown)
        _update(ctx, c, f":rewind: <@{c.user}> rolled production back from v{moved.get('from')} "
                        f"to v{moved.get('to')}.", (ids.ROLLBACK,))
        return f"rolled production back to v{moved.get('to')}"


@once_per_button("cancel")
def cancel_run(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        # The service re-renders the run's message (state canceled) through the notifier.
        ctx.service.cancel(c.value, by=c.user)
        return f"canceled run {c.value}"


@once_per_button("approve")
def approve_deploy(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        # The service stamps the report (buttons gone) through the outbox.
        version = ctx.service.approve(c.value, by=c.user)
        return f"approved it: v{version} is production"


@once_per_button("approve")
def reject_deploy(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        ctx.service.reject(c.value, by=c.user)
        return "rejected it"


@once_per_button("rollback")
def rollback_to(ctx, body: dict) -> str | None:
    """The Home tab's *Roll back to this*: the version, if production is still the one
    the Home showed (compare-and-set, like `/ct rollback`)."""
    c = Click(body)
    with _private(ctx, c):
        version, _, shown = c.value.partition(":")
        moved = ctx.service.rollback(int(version), by=c.user, expect_production=int(shown))
        return f"rolled production back from v{moved.get('from')} to v{moved.get('to')}"


@once_per_button("schedule")
def pause_schedule(ctx, body: dict) -> str | None:
    with _private(ctx, Click(body)):
        ctx.service.set_schedule_paused(True, by=Click(body).user)
        return "paused the weekly retrain"


@once_per_button("schedule")
def resume_schedule(ctx, body: dict) -> str | None:
    with _private(ctx, Click(body)):
        ctx.service.set_schedule_paused(False, by=Click(body).user)
        return "resumed the weekly retrain"


def view_run(ctx, body: dict) -> None:
    c = Click(body)
    with _private(ctx, c):
        ctx.service.authorize(None, c.user)    # reading only; the workspace and channel still count
        run = ctx.service.get_run(c.value)
        steps = {name: {"state": state} for name, state in (run.progress or {}).items()}
        _tell_clicker(ctx, c, blocks.run_details(run, steps, time.time()))


@once_per_button("train")
def retrain(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        old = ctx.service.get_run(c.value)
        run = ctx.service.request_training(f"retrain of {old.run_id} by <@{c.user}>", old.params, c.user,
                                           trigger="manual")
        _tell_clicker(ctx, c, blocks.info(f":rocket: Started run `{esc(run.run_id)}` with the parameters of "
                                          f"`{esc(old.run_id)}`."))
        return f"started run {run.run_id}"


@once_per_button("train")
def retry_fire(ctx, body: dict) -> str | None:
    c = Click(body)
    with _private(ctx, c):
        # Through the fire's own claim: a click racing the catch-up (or a second click
        # elsewhere) cannot start a second run.
        out = ctx.service.retry_fire(c.value, by=c.user)
        if out.outcome == "launched":
            note = f":rocket: <@{c.user}> retried it: run `{esc(out.run.run_id)}` started."
        elif out.outcome == "queued":
            note = f":hourglass: <@{c.user}> retried it: queued behind the active run."
        elif out.outcome == "retrying":
            note = f":repeat: <@{c.user}> retried it; it failed again ({esc(out.detail)}) and is retried on its own."
        elif out.outcome == "error":
            _tell_clicker(ctx, c, blocks.error(f"It still could not start: {out.detail}"))
            return None   # the button stays: the fire is failed and announced again
        elif out.run is not None:
            note = f"Already started as run `{esc(out.run.run_id)}` ({esc(out.detail)})."
        else:
            note = f"Nothing to retry: {esc(out.detail or out.outcome)}."
        _update(ctx, c, note, None)
        return note


def register(app, service, settings) -> None:
    for action_id, job in JOBS.items():
        app.action(action_id)(_acking(app, job))


def _acking(app, job):
    """A listener that acks, then runs ``job(ctx, body)`` in the background."""
    def listener(ack, body):
        ack()
        app.background.submit(job, body, what=job.__name__)
    listener.__name__ = f"on_{job.__name__}"
    return listener


JOBS = {ids.RETRAIN_NEW_DATA: retrain_new_data, ids.REFRESH_NEW_DATA: refresh_new_data,
        ids.DISMISS_ALERT: dismiss_alert, ids.PROMOTE: promote,
        ids.ROLLBACK: rollback, ids.CANCEL_RUN: cancel_run, ids.VIEW_RUN: view_run, ids.RETRAIN: retrain,
        ids.APPROVE_DEPLOY: approve_deploy, ids.REJECT_DEPLOY: reject_deploy, ids.HOME_ROLLBACK_TO: rollback_to,
        ids.HOME_PAUSE: pause_schedule, ids.HOME_RESUME: resume_schedule, ids.RETRY_FIRE: retry_fire}
