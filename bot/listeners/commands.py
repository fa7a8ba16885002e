"""The slash command (default `/ct`).

The ack runs on the request thread and only does pure work: parse, validate and answer
help and bad input right away. Everything that touches Redis, the store or the runner
runs afterwards on app.background and answers through the response_url, so the ack
never waits on training or I/O.
"""
from __future__ import annotations

import contextlib
import functools
import logging

from bot import blocks
from bot.blocks.common import esc
from bot.listeners.form_open import on_train_without_arguments
from bot.listeners.guard import STATE_ERRORS, error_reply, replying_on_error, state_lost_reply
from bot.listeners.parse import Parsed, UnknownSubcommand, UsageError, parse, sweep_size, sweep_trials
from core.access import Actor
from core.errors import ParamError, ServiceError
from steps.crashpoints import crash_point

log = logging.getLogger(__name__)

WORKING = {"train": "Starting a training run", "sweep": "Starting a sweep", "status": "Checking", "runs": "Fetching runs", "history": "Reading the model history",
           "data": "Looking at the data", "deploy": "Promoting", "rollback": "Rolling back",
           "schedule": "Updating the schedule", "cancel": "Canceling", "audit": "Reading the audit"}


@functools.lru_cache(maxsize=4)
def _help(command: str) -> dict:
    """The help reply never changes within a process: build it once."""
    from steps.params import TrainParams  # torch-free by contract
    return blocks.fit_message(blocks.help_message(command, TrainParams.describe()))


def register(app, service, settings) -> None:
    command = settings.slash_command

    def on_command(ack, body: dict):
        """Answer at once: the final text when there is nothing slow to do, else 'working
        on it' and the rest in the background. The command is recorded in Redis before
        that promise, so a crash after the ack resumes it instead of dropping it."""
        reply, parsed = _quick(service, body.get("text", ""), command)
        if parsed is not None and parsed.sub == "train" and not parsed.args:
            on_train_without_arguments(app, service, settings, body, ack, actor_of(body))   # the form
            return
        if parsed is None:
            ack(**reply)
            return
        try:
            service.authorize(None, actor_of(body))      # the workspace and channel: pure, fast
            fresh = service.accept_command(command_id(body), _durable(body))
        except Exception as e:  # noqa: BLE001 - nothing was changed; say why, specifically
            ack(**error_reply(e, f"`{command} {parsed.sub}`"))
            return
        ack(**reply)
        if fresh:   # a repeated delivery (X-Slack-Retry-Num) is acked, not run twice
            app.background.submit(run_command, parsed, body, what=f"{command} {parsed.sub}")

    app.command(command)(on_command)


def actor_of(body: dict) -> Actor:
    return Actor(body.get("user_id", ""), body.get("channel_id", ""), body.get("team_id", ""))


def command_id(body: dict) -> str:
    """Slack gives every invocation its own trigger_id, and a retry repeats it."""
    return body.get("trigger_id") or f"{body.get('user_id')}:{body.get('response_url')}"


def _durable(body: dict) -> dict:
    keep = ("text", "user_id", "channel_id", "team_id", "response_url", "trigger_id", "command")
    return {k: body.get(k, "") for k in keep}


def run_command(ctx, parsed: Parsed, body: dict) -> None:
    """The slow part (a background job). Every answer replaces the 'working on it' reply."""
    command = ctx.settings.slash_command
    cmd_id = command_id(body)
    crash_point("after_ack")   # acked (the HTTP reply has gone), nothing done yet
    respond = ctx.respond(body["response_url"])
    what = f"`{command} {parsed.sub}`"
    left_open = False
    with replying_on_error(respond, what, replace_original=True):
        try:
            record = ctx.service.command_started(cmd_id)
            out = _execute(ctx.service, ctx.client, ctx.settings, parsed, actor_of(body), cmd_id, record)
        except STATE_ERRORS as e:
            # Recorded by the ack, so never "nothing was changed": left open, the resume
            # job carries it out once Redis answers (its effects are idempotent).
            left_open, out = True, state_lost_reply(e, what)
        respond(**blocks.fit_message(out), replace_original=True)
    if left_open:
        return
    # Answered, with the result or a specific error: either way the command is settled.
    with contextlib.suppress(Exception):
        ctx.service.finish_command(cmd_id)


def resume_interrupted(ctx) -> int:
    """Commands accepted but never finished (the process died after the ack): run them
    again. Their effects are idempotent per command id, so a half-done one completes
    rather than repeats. Returns how many were resumed."""
    n = 0
    for record in ctx.service.interrupted_commands():
        body = record.get("payload") or {}
        try:
            parsed = parse(body.get("text", ""), ctx.settings.slash_command)
        except Exception:  # it parsed when it was accepted; if not now, just close it
            ctx.service.finish_command(record["id"])
            continue
        log.warning("resuming interrupted command %s (%s)", record["id"], parsed.sub)
        run_command(ctx, parsed, body)
        n += 1
    return n


def _quick(service, text: str, command: str) -> tuple[dict, Parsed | None]:
    """(the ack reply, the parsed command when slow work remains, else None)."""
    reply, parsed = _classify(service, text, command)
    return (reply if parsed is None and reply is _help(command) else blocks.fit_message(reply)), parsed


def _classify(service, text: str, command: str) -> tuple[dict, Parsed | None]:
    try:
        p = parse(text, command)
        if p.sub == "help":
            return _help(command), None
        if p.sub == "train":
            service.parse_params(p.args)     # pure: raises ParamError listing valid keys
        if p.sub == "sweep":
            sweep_plan(service, p.args, command)    # checked before anything starts
        what = "Checking the schedule" if p.sub == "schedule" and not p.action else \
            WORKING[p.sub] + (f" `{esc(p.run_id)}`" if p.run_id else "")
        return blocks.working(what), p
    except UnknownSubcommand as e:
        return blocks.unknown_subcommand(command, e.sub, e.suggestions), None
    except UsageError as e:
        return blocks.error(str(e), e.hint), None
    except ParamError as e:
        return blocks.error(str(e), f"`{command} help` lists every parameter with its range."), None
    except ServiceError as e:
        return blocks.error(str(e)), None
    except Exception as e:  # noqa: BLE001 - never let a bug become Slack's "dispatch_failed"
        return error_reply(e, f"`{command}`"), None


# The access list each subcommand needs (None: reading only; the channel still counts).
NEEDS = {"train": "train", "sweep": "train", "deploy": "deploy", "rollback": "rollback", "cancel": "cancel", "audit": "approve"}


def _execute(service, client, settings, p: Parsed, who: Actor, cmd_id: str = "", record: dict | None = None) -> dict:
    """Carry out a parsed command; returns the reply (with response_type for public ones)."""
    action = "schedule" if p.sub == "schedule" and p.action else NEEDS.get(p.sub)
    owner = ""
    if p.sub == "cancel":
        owner = service.get_run(p.run_id).requested_by
    service.authorize(action, who, owner=owner, run_id=p.run_id if p.sub == "deploy" else "")
    if p.sub == "audit":
        return blocks.audit_message(service.audit_log(p.n))
    if p.sub == "status":
        return blocks.status_message(service.status())
    if p.sub == "runs":
        return blocks.runs_message(service.list_runs(p.n))
    if p.sub == "history":
        return blocks.history_message(service.model_history(p.n), settings.slash_command)
    if p.sub == "data":
        return blocks.data_message(service.data_summary())
    if p.sub == "sweep":
        trials = sweep_plan(service, p.args, settings.slash_command)
        run = service.request_training(f"{settings.slash_command} sweep by <@{who}>", {}, who, trigger="manual",
                                       dedupe_key=f"cmd:{cmd_id}" if cmd_id else None, sweep=trials)
        link = _permalink(client, run.slack_channel, run.slack_ts)
        where = f" — follow it <{link}|here>" if link else ""
        shown = ", ".join(" ".join(f"`{k}={v}`" for k, v in t["params"].items()) for t in trials)
        return blocks.info(f":rocket: Started sweep run `{run.run_id}` with {len(trials)} trials: {shown}{where}.",
                           "The best by validation top-1 is evaluated and deployed like a single run.")
    if p.sub == "train":
        params = service.parse_params(p.args)
        run = service.request_training(f"{settings.slash_command} train by <@{who}>", params, who,
                                       trigger="manual", dedupe_key=f"cmd:{cmd_id}" if cmd_id else None)
        link = _permalink(client, run.slack_channel, run.slack_ts)
        where = f" — follow it <{link}|here>" if link else ""
        shown = " ".join(f"`{k}={v}`" for k, v in params.items()) or "default parameters"
        return blocks.info(f":rocket: Started run `{run.run_id}` with {shown}{where}.",
                           f"`{settings.slash_command} cancel {run.run_id}` stops it.")
    # The service says promotions, rollbacks, cancels and schedule changes in the channel
    # (notifier.say) and audits them, so the person who typed the command gets a private receipt.
    if p.sub == "deploy":
        version = service.promote(p.run_id, by=who, attempt=f"cmd:{cmd_id}" if cmd_id else "")
        return blocks.info(f":rocket: Promoted run `{esc(p.run_id)}` to production as *v{version}*.")
    if p.sub == "rollback":
        # The production version this command saw, kept with it: a resumed or repeated
        # rollback can't move production a second time.
        seen = (record or {}).get("expect_production")
        if seen is None:
            seen = (service.production() or {}).get("version")
            if cmd_id:
                service.plan_command(cmd_id, expect_production=seen if seen is not None else "")
        moved = service.rollback(p.version, by=who, expect_production=int(seen) if seen not in (None, "") else None)
        return blocks.info(f":rewind: Production rolled back from v{moved.get('from')} to *v{moved.get('to')}*.")
    if p.sub == "cancel":
        run = service.cancel(p.run_id, by=who)
        return blocks.info(f":no_entry_sign: Canceled run `{esc(run.run_id)}`.")
    if p.sub == "schedule":
        if p.action:
            service.set_schedule_paused(p.action == "pause", by=who, attempt=f"cmd:{cmd_id}" if cmd_id else "")
            return blocks.info(f":calendar: Weekly retrain {'paused' if p.action == 'pause' else 'resumed'}.")
        return blocks.schedule_message(service.status())
    raise AssertionError(f"unhandled subcommand {p.sub}")


def sweep_plan(service, args: list[str], command: str) -> list[dict]:
    """The trials of `/ct sweep key=v1,v2 …` as the pipeline takes them, each checked like
    `/ct train`; ParamError when there are more than sweep.max_trials or one is invalid."""
    most = service.settings.sweep.max_trials
    n = sweep_size(args)
    if n > most:
        raise ParamError(f"That sweep makes {n} combinations; at most {most} are allowed (sweep.max_trials).")
    trials = []
    for i, tokens in enumerate(sweep_trials(args)):
        try:
            trials.append({"trial": i, "params": service.parse_params(tokens)})
        except ParamError as e:
            raise ParamError(f"Trial {i + 1} ({' '.join(tokens)}): {e}") from None
    return trials


def _permalink(client, channel: str, ts: str) -> str:
    if not (channel and ts):
        return ""
    try:
        return client.chat_getPermalink(channel=channel, message_ts=ts).get("permalink", "")
    except Exception:  # a missing link is not worth failing the reply
        log.warning("chat.getPermalink failed for %s/%s", channel, ts, exc_info=True)
        return ""
