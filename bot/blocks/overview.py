"""Read-only overviews: /ct status, /ct runs, /ct data, /ct schedule."""
from __future__ import annotations

from bot.blocks.common import (
    STATE_ICON,
    context,
    duration,
    esc,
    fields,
    header,
    msg,
    pct,
    section,
    size,
    user,
    when,
)
from bot.blocks.limits import MAX_SECTION_TEXT
from core.serving_client import serving_text
from core.types import RunRecord


def as_run(x) -> RunRecord | None:
    if x is None or isinstance(x, RunRecord):
        return x
    return RunRecord.from_dict(x)


def run_line(run: RunRecord) -> str:
    """One line per run: icon, id, state, trigger, who, when, result."""
    bits = [f"{STATE_ICON.get(run.state, '•')} `{esc(run.run_id)}` *{run.state}*",
            esc(run.trigger), user(run.requested_by), when(run.created_at)]
    if run.top1 is not None:
        bits.append(f"top-1 {pct(run.top1)}")
    if run.decision:
        bits.append(run.decision + (f" → v{run.model_version}" if run.model_version else ""))
    if run.state == "failed" and run.failed_step:
        bits.append(f"failed at {esc(run.failed_step)}")
    return " · ".join(bits)


def _chunks(lines: list[str], limit: int = MAX_SECTION_TEXT - 100) -> list[str]:
    """Join lines into texts that each fit one section."""
    out, cur = [], ""
    for line in lines:
        if cur and len(cur) + 1 + len(line) > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line[:limit]
    return out + ([cur] if cur else [])


def schedule_text(status: dict) -> str:
    if status.get("schedule_paused"):
        return ":double_vertical_bar: weekly retrain *paused*"
    nxt = status.get("next_retrain")
    return f":calendar: next weekly retrain {when(nxt)}" if nxt else ":calendar: weekly retrain on"


def pending_text(pending: dict | None) -> str:
    pending = pending or {}
    n = int(pending.get("objects") or 0)
    if not n:
        return "no new data since the last training"
    since = f" since {when(pending['since'])}" if pending.get("since") else ""
    return f"{n} new object(s), {size(pending.get('bytes'))}{since}"


def status_message(status: dict) -> dict:
    active = as_run(status.get("active"))
    prod = status.get("production")
    blocks = [header("ctbot status")]
    if active:
        steps = status.get("steps") or {}
        done = sum(1 for s in steps.values() if (s or {}).get("state") in ("done", "skipped"))
        running = [k for k, s in steps.items() if (s or {}).get("state") == "running"]
        now = f", now *{esc(running[0])}*" if running else ""
        started = active.started_at or active.created_at
        blocks.append(section(f"*Active run* `{esc(active.run_id)}` ({active.state}{now}, "
                              f"{done}/{max(len(steps), 7)} steps done)\n"
                              f"{esc(active.reason)} · since {when(started)}"))
    else:
        blocks.append(section("*Active run*: none"))
    prod_text = (f"v{prod.get('version')} · top-1 {pct(prod.get('top1'))} · since {when(prod.get('updated_at'))}"
                 if prod else "no model in production yet")
    pairs = [("Production", prod_text), ("Schedule", schedule_text(status)),
             ("Pending data", pending_text(status.get("pending")))]
    if status.get("serving"):
        pairs.append(("Model server", serving_field(status["serving"], prod)))
    blocks += fields(pairs)
    owed = status.get("owed") or {}
    if owed.get("count"):
        blocks.append(section(f":hourglass: *Owed to Slack*: {owed['count']} message(s), the oldest waiting "
                              f"{duration(owed.get('oldest_seconds') or 0)}; they go out in order when Slack answers"))
    undelivered = status.get("undelivered") or []
    if undelivered:
        lines = "\n".join(f"• {esc(f.get('what'))}: {esc(f.get('error'))} ({when(f.get('at'))})"
                          + (f" — {esc(f['detail'][:120])}" if f.get("detail") else "") for f in undelivered)
        blocks.append(section(f":warning: *Not delivered to Slack*, given up after retrying for a day "
                              f"(`outbox.give_up_hours`):\n{lines}"))
    text = (f"Active run {active.run_id} ({active.state})" if active else "No active run") + \
           f"; production {('v' + str(prod.get('version'))) if prod else 'none'}"
    return msg(text, blocks)


def serving_field(serving: dict, prod: dict | None) -> str:
    """What the model server answers; a warning when it lags production."""
    version = prod.get("version") if prod else None
    text = esc(serving_text(serving, version))
    lagging = serving.get("error") or (version is not None and version not in (serving.get("versions") or []))
    return f":warning: {text}" if lagging else text


def runs_message(runs: list) -> dict:
    runs = [as_run(r) for r in runs]
    if not runs:
        return msg("No runs yet.", [section("No runs yet. Start one with `/ct train`.")])
    blocks = [header(f"Last {len(runs)} run(s)")]
    blocks += [section(t) for t in _chunks([run_line(r) for r in runs])]
    return msg(f"Last {len(runs)} run(s): " + ", ".join(r.run_id for r in runs[:10]), blocks)


AUDIT_SKIP = {"action", "who", "at", "id", "channel", "team", "outcome"}


def audit_line(e: dict) -> str:
    """One audit entry as a line people can read: when, who, what, where, outcome."""
    details = ", ".join(f"{k}={v}" for k, v in e.items() if k not in AUDIT_SKIP)
    where = f" in <#{e['channel']}>" if e.get("channel") else ""
    who = f"<@{e['who']}>" if e.get("who", "")[:1] in ("U", "W") else esc(e.get("who") or "?")
    outcome = " · *refused*" if e.get("outcome") == "refused" else ""
    return f"`{esc(str(e.get('at', ''))[:19])}` {who} *{esc(e.get('action'))}*{where}{outcome}" + \
        (f" — {esc(details)}" if details else "")


def audit_message(entries: list[dict]) -> dict:
    """``entries`` oldest first."""
    if not entries:
        return msg("The audit is empty.", [section("Nothing has been audited yet.")])
    blocks = [header(f"Audit: the last {len(entries)} entries")]
    blocks += [section(t) for t in _chunks([audit_line(e) for e in entries])]
    return msg(f"Audit: the last {len(entries)} entries", blocks)


def schedule_message(status: dict) -> dict:
    return msg(schedule_text(status).split(" ", 1)[1].replace("*", ""),
               [section(schedule_text(status)),
                context("`/ct schedule pause` or `/ct schedule resume` to change it.")])


def _counts_text(counts: dict | None) -> str:
    if not counts:
        return "–"
    return " ".join(f"`{esc(k)}`:{v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))


def _card_text(card: dict | None) -> str:
    if not card:
        return "no data card"
    counts = card.get("counts") or {}
    n = card.get("n") or sum(int(v) for v in counts.values())
    src = card.get("sources") or []
    fp = str(card.get("fingerprint") or "")[:19]
    return (f"{n} images from {len(src)} object(s)" + (f" · `{esc(fp)}`" if fp else "")
            + ("\nper class: " + _counts_text(counts) if counts else ""))


def data_message(summary: dict) -> dict:
    """``summary`` from TrainingService.data_summary(): {prefix, pending: {objects, bytes,
    since}, last_trained: {run_id, finished_at, data_card} | None, production: {version,
    data_card} | None}."""
    pending = summary.get("pending") or {}
    where = f" in `{esc(summary['prefix'])}`" if summary.get("prefix") else ""
    blocks = [header("Training data"), section(f"*Waiting for training*{where}: {pending_text(pending)}")]
    last = summary.get("last_trained")
    prod = summary.get("production")
    pairs = []
    if last:
        pairs.append((f"Last trained: run {esc(last.get('run_id'))}",
                      f"{when(last.get('finished_at'))}\n{_card_text(last.get('data_card'))}"))
    if prod:
        pairs.append((f"Production: v{prod.get('version')}", _card_text(prod.get("data_card"))))
    if pairs:
        blocks += fields(pairs)
    else:
        blocks.append(context("No model has been trained yet. `/ct train` starts the first run."))
    return msg(f"Pending data: {pending_text(pending)}", blocks)


def elapsed(run: RunRecord, now: float) -> str:
    start = run.started_at or run.created_at
    end = run.finished_at or now
    return duration(max(0.0, end - start)) if start else "–"
