"""The App Home tab and `/ct history`: production, the active run, approvals, the model's
history, the schedule and recent runs, with the buttons the viewer may use.

Pure. ``can`` is the set of actions the viewer may take (core.access names: train,
cancel, approve, rollback, schedule); a button for anything else is not shown.
"""
from __future__ import annotations

from bot import ids
from bot.blocks.common import (
    actions,
    button,
    confirm,
    context,
    divider,
    esc,
    fields,
    header,
    msg,
    pct,
    section,
    user,
    when,
)
from bot.blocks.limits import fit_view
from bot.blocks.overview import _chunks, as_run, pending_text, run_line, schedule_text, serving_field
from core.types import RunRecord

MOVE_WORDS = {"deploy": "deployed", "promote": "promoted", "rollback": "rolled back to"}


def _move(m: dict | None) -> str:
    if not m:
        return "–"
    approved = f", approved by {user(m['approved_by'])}" if m.get("approved_by") else ""
    return f"{MOVE_WORDS.get(m.get('action'), esc(m.get('action')))} by {user(m.get('by') or '')} " \
           f"{when(m.get('at'))}{approved}"


def version_line(row: dict) -> str:
    """One version: number, top-1, its run, who published it and each later move to it."""
    first, later = (row.get("moves") or [None])[0], (row.get("moves") or [])[1:]
    bits = [f"*v{row['version']}*" + (" · :large_green_circle: *production*" if row.get("production") else ""),
            f"top-1 {pct(row.get('top1'))}", f"run `{esc(row.get('run_id') or '?')}`", _move(first)]
    if later:
        bits.append(_move(later[-1]) + (f" ({len(later)}x)" if len(later) > 1 else ""))
    if not row.get("available"):
        bits.append("_pruned_")
    return " · ".join(bits)


def history_blocks(history: dict, can_rollback: bool) -> list[dict]:
    prod = (history.get("production") or {}).get("version")
    rows = history.get("versions") or []
    if not rows:
        return [section("No model has been published yet.")]
    out = []
    for row in rows:
        accessory = None
        if can_rollback and row.get("available") and not row.get("production") and prod is not None:
            accessory = button("Roll back to this", ids.HOME_ROLLBACK_TO, f"{row['version']}:{prod}",
                               confirm_with=confirm(f"Make v{row['version']} production?",
                                                    f"Production moves from v{prod} to v{row['version']}, "
                                                    "unless someone moved it meanwhile.", "Roll back"))
        out.append(section(version_line(row), accessory=accessory))
    return out


def history_message(history: dict, command: str = "/ct") -> dict:
    """`/ct history [N]`: the same history as the Home tab, without buttons."""
    rows = history.get("versions") or []
    blocks = [header(f"Model history: the last {len(rows)} version(s)")] if rows else []
    blocks += [section(t) for t in _chunks([version_line(r) for r in rows])] if rows else \
        [section("No model has been published yet. A run that deploys, or `/ct deploy <run>`, publishes v1.")]
    blocks.append(context(f"`{command} rollback <version>` makes one of them production again; "
                          "the Home tab has buttons."))
    prod = (history.get("production") or {}).get("version")
    return msg(f"Model history: production v{prod}" if prod else "Model history: nothing published", blocks)


def _production_blocks(status: dict, history: dict) -> list[dict]:
    prod = status.get("production")
    if not prod:
        return [section("*Production*: no model yet. `/ct train` starts the first run.")]
    pairs = [("Production", f"*v{prod.get('version')}* · top-1 {pct(prod.get('top1'))}"),
             ("Since", when(prod.get("updated_at"))),
             ("Moved by", _move(history.get("last_move")))]
    if status.get("serving"):
        pairs.append(("Model server", serving_field(status["serving"], prod)))
    return fields(pairs)


def _active_blocks(active: RunRecord | None, steps: dict, can_cancel: bool) -> list[dict]:
    if active is None:
        return [section("*Active run*: none")]
    done = sum(1 for s in steps.values() if (s or {}).get("state") in ("done", "skipped"))
    running = [k for k, s in steps.items() if (s or {}).get("state") == "running"]
    now = ""
    if running:
        summary = (steps[running[0]] or {}).get("summary") or {}
        epoch = f" epoch {summary['epoch']}/{summary.get('epochs', '?')}" if "epoch" in summary else ""
        now = f", now *{esc(running[0])}*{epoch}"
    text = (f"*Active run* `{esc(active.run_id)}` ({active.state}{now}, {done}/{max(len(steps), 7)} steps done)\n"
            f"{esc(active.reason)} · since {when(active.started_at or active.created_at)}")
    accessory = button("Cancel", ids.CANCEL_RUN, active.run_id, style="danger",
                       confirm_with=confirm("Cancel this run?", f"Run `{esc(active.run_id)}` stops now.",
                                            "Cancel run")) if can_cancel else None
    return [section(text, accessory=accessory)]


def _approval_blocks(waiting: list, can_approve: bool) -> list[dict]:
    out = []
    for run in waiting:
        out.append(section(f":hourglass: *Waiting for approval*: run `{esc(run.run_id)}` · top-1 {pct(run.top1)} · "
                           f"by {user(run.requested_by)} · finished {when(run.finished_at)}"))
        if can_approve:
            out.append(actions(
                button("Approve", ids.APPROVE_DEPLOY, run.run_id, style="primary",
                       confirm_with=confirm("Deploy this model?", f"Run `{esc(run.run_id)}` becomes production.",
                                            "Approve", danger=False)),
                button("Reject", ids.REJECT_DEPLOY, run.run_id, style="danger",
                       confirm_with=confirm("Reject this model?", "Nothing is deployed.", "Reject"))))
    return out


def home_view(status: dict, runs: list, history: dict, approvals: list, can: set, *,
              viewer: str = "", notice: dict | None = None) -> dict:
    """The Home tab as ``viewer`` sees it: every section, the buttons in ``can`` (plus
    Cancel on their own run), and ``notice`` ({text, ok}) from their last click."""
    active = as_run(status.get("active"))
    blocks = [header("ctbot: continuous training")]
    if notice and notice.get("text"):
        icon = ":white_check_mark:" if notice.get("ok") else ":warning:"
        blocks.append(section(f"{icon} {notice['text']}"))
    if "train" in can:
        blocks.append(actions(button("Train…", ids.HOME_TRAIN, "form", style="primary")))
    blocks += [divider(), *_production_blocks(status, history), divider()]
    can_cancel = active is not None and ("cancel" in can or str(viewer) == active.requested_by)
    blocks += _active_blocks(active, status.get("steps") or {}, can_cancel)
    blocks += _approval_blocks([as_run(r) for r in approvals], "approve" in can)
    blocks += [divider(), header("Model history"), *history_blocks(history, "rollback" in can), divider()]
    paused = bool(status.get("schedule_paused"))
    toggle = None
    if "schedule" in can:
        toggle = button("Resume", ids.HOME_RESUME, "resume", style="primary") if paused else \
            button("Pause", ids.HOME_PAUSE, "pause")
    blocks.append(section(f"*Schedule*: {schedule_text(status)}\n*Pending data*: {pending_text(status.get('pending'))}",
                          accessory=toggle))
    runs = [as_run(r) for r in runs]
    blocks += [divider(), header(f"Last {len(runs)} run(s)" if runs else "Runs")]
    blocks += [section(t) for t in _chunks([run_line(r) for r in runs])] if runs else [section("No runs yet.")]
    return fit_view({"type": "home", "blocks": blocks})


