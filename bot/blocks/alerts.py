"""The new-data alert and how it looks once someone acted on it."""
from __future__ import annotations

import copy

from bot import ids
from bot.blocks.common import actions, button, context, duration, esc, fields, header, msg, section, size
from core.types import NewData


def _expected(seconds: float | None) -> str:
    return f"~{duration(seconds)}" if seconds is not None else "no run yet"


def new_data_alert(found: NewData, alert_id: str, *, auto_retrain: bool = False,
                   expected: dict | None = None) -> dict:
    """``expected``: mode -> the median seconds of its last runs (core.ct_policy), shown on
    the buttons so the choice between a refresh and a retrain is an informed one."""
    expected = expected or {}
    n = len(found.keys)
    shown = "\n".join(f"• `{esc(k)}`" for k in found.keys[:8])
    if n > 8:
        shown += f"\n…and {n - 8} more"
    blocks = [header(f"📦 {n} new data object(s)"),
              section(f"{n} new object(s), {size(found.total_bytes)}, arrived in the data prefix:\n{shown}")]
    if found.counts:
        blocks += fields([("Images per class",
                           " ".join(f"`{esc(k)}`:{v}" for k, v in sorted(found.counts.items(),
                                                                        key=lambda kv: str(kv[0]))))])
    if auto_retrain:
        blocks.append(context("Auto-retrain is on: a run starts on its own."))
    else:
        refresh, full = expected.get("refresh"), expected.get("full")
        blocks.append(context(
            f"*Refresh gallery* ({_expected(refresh)}): production's weights embed the new images into "
            f"its gallery, no training. *Retrain* ({_expected(full)}): a full run on all the data. "
            "Times: the median of the last runs of that mode."))
        blocks.append(actions(
            button(f"Refresh gallery ({_expected(refresh)})", ids.REFRESH_NEW_DATA, alert_id, style="primary"),
            button(f"Retrain ({_expected(full)})", ids.RETRAIN_NEW_DATA, alert_id),
            button("Dismiss", ids.DISMISS_ALERT, alert_id),
            block_id=f"alert:{alert_id}"[:255]))
    blocks.append(context(f"fingerprint `{esc(found.fingerprint[:24])}` · alert `{esc(alert_id)}`"))
    return msg(f"{n} new data object(s) ({size(found.total_bytes)}) — retrain?", blocks)


def fire_failed(fire_id: str, text: str) -> dict:
    """A weekly or new-data run that could not start, with a Retry button (one effect
    however many clicks: the fire's own claim, core/fires.py)."""
    return msg(text, [section(f":warning: {esc(text)}"),
                      actions(button("Retry", ids.RETRY_FIRE, fire_id, style="primary"),
                              block_id=f"fire:{fire_id}"[:255]),
                      context(f"fire `{esc(fire_id)}`")])


def resolved(blocks: list[dict], note: str, text: str = "", drop: tuple[str, ...] | None = None) -> dict:
    """The original message with a note saying who did what. Buttons in ``drop`` go
    (all buttons when None), so nobody clicks the same thing twice."""
    kept = []
    for b in blocks:
        b = copy.deepcopy(b)
        if b.get("type") == "actions":
            if drop is None:
                continue
            b["elements"] = [e for e in b.get("elements") or [] if e.get("action_id") not in drop]
            if not b["elements"]:
                continue
        kept.append(b)
    # Keep the buttons last, where people expect them.
    tail = [b for b in kept[-1:] if b.get("type") == "actions"]
    head = kept[: len(kept) - len(tail)]
    return msg(text or note, head + [context(note)] + tail)
