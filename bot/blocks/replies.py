"""Short ephemeral replies: errors, acknowledgements, results, help."""
from __future__ import annotations

import copy
import functools
import json

from bot.blocks.common import code_table, context, esc, header, msg, section

SUBCOMMANDS = {
    "help": ("", "this help"),
    "train": ("[key=value …]", "start a training run now with these parameters; alone, it opens a form"),
    "sweep": ("key=v1,v2 …", "one run training every combination (a|b|c for values with commas); "
                             "the best by validation top-1 is evaluated and deployed like a run"),
    "status": ("", "active run, production model, schedule and pending data"),
    "runs": ("[N]", "the last N runs (default 10, at most 50)"),
    "history": ("[N]", "the model's last N versions: top-1, run, who deployed or rolled back to each, when"),
    "data": ("", "new data waiting for training, and what recent runs trained on"),
    "deploy": ("<run>", "promote a run's candidate model to production"),
    "rollback": ("[version]", "point production back to the previous (or the given) version"),
    "schedule": ("[pause|resume]", "show, pause or resume the weekly retrain"),
    "cancel": ("<run>", "cancel an active run"),
    "audit": ("[N]", "who did what, when and where: the last N entries (approvers only)"),
}


def error(text: str, hint: str = "") -> dict:
    """A specific, actionable error. Never a stack trace. ``text`` may hold mentions and
    `code`; stray <, > and & are escaped."""
    blocks = [section(f":warning: {esc(text)}")]
    if hint:
        blocks.append(context(hint))
    return msg(f"⚠️ {text}", blocks)


def info(text: str, *notes: str) -> dict:
    """A one-line reply; ``text`` is mrkdwn the caller has already escaped."""
    return msg(text, [section(text)] + ([context(*notes)] if notes else []))


def working(what: str) -> dict:
    """'Working on it': the ack of every slow command, so it is cached (don't mutate)."""
    return _working(what)


@functools.lru_cache(maxsize=256)
def _working(what: str) -> dict:
    return info(f":hourglass_flowing_sand: {what}…")


def unknown_subcommand(command: str, sub: str, suggestions: list[str]) -> dict:
    did_you_mean = (" Did you mean " + " or ".join(f"`{command} {s}`" for s in suggestions) + "?"
                    if suggestions else "")
    return error(f"Unknown subcommand “{sub}”.{did_you_mean}",
                 f"Subcommands: {', '.join(f'`{s}`' for s in SUBCOMMANDS)}. Try `{command} help`.")


def other_command(command: str, served: str) -> dict:
    """The answer to a slash command routed to ctbot that it does not serve."""
    return error(f"ctbot does not serve `{command[:40]}`: its command is `{served}`.",
                 f"Try `{served} help`. Whoever runs ctbot can point `{command[:40]}` elsewhere in the "
                 "app's settings, or set `slash_command` to serve it.")


def help_message(command: str, params: dict) -> dict:
    """Usage of every subcommand and the training parameters (cached: it never changes)."""
    return copy.deepcopy(_help_message(command, json.dumps(params, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _help_message(command: str, params_json: str) -> dict:
    params = json.loads(params_json)
    return _build_help(command, params)


def _build_help(command: str, params: dict) -> dict:
    """Usage of every subcommand and the training parameters with defaults and ranges.

    ``params`` is ``TrainParams.describe()``: {name: {type, default, range, help}}."""
    usage = "\n".join(f"`{command} {name}{(' ' + args) if args else ''}` — {what}"
                      for name, (args, what) in SUBCOMMANDS.items())
    rows = []
    for name, d in params.items():
        rng = d.get("range") or []
        shown = "|".join(map(str, rng)) if rng and isinstance(rng[0], str) else (
            f"{rng[0]}…{rng[1]}" if len(rng) == 2 else "")
        rows.append([name, str(d.get("default")), shown])
    helps = "\n".join(f"• `{n}`: {esc(d.get('help', ''))}" for n, d in params.items())
    blocks = [
        header("ctbot: continuous training from Slack"),
        section(usage),
        section("*Training parameters* (`" + command + " train epochs=3 lr=0.01`)\n"
                + code_table(rows, ["name", "default", "range"])),
        section(helps),
        context("Buttons that deploy, roll back or cancel always ask for confirmation. "
                "Everything is recorded in the audit log with who did it."),
    ]
    return msg(f"{command} help: " + ", ".join(SUBCOMMANDS), blocks)
