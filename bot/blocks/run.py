"""A run's one message (progress, then the final report) and the details in its thread."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bot import ids
from bot.blocks.common import (
    STATE_ICON,
    actions,
    bullets,
    button,
    code_table,
    confirm,
    context,
    duration,
    esc,
    fields,
    header,
    msg,
    pct,
    pp,
    section,
    user,
    when,
)
from bot.blocks.limits import clip
from bot.blocks.overview import as_run, elapsed
from core.serving_client import serving_text
from core.types import RunRecord
from steps.layout import STEPS
from steps.results import TRIAL_PREFIX as TRIAL_STEP  # a sweep trial's step file

MAX_WARNINGS_SHOWN = 15


def _trigger(run: RunRecord) -> str:
    """What started the run and who. ``reason`` is written by ctbot itself and may hold
    mentions, so it is not escaped."""
    who = user(run.requested_by)
    by = "" if who in (run.reason or "") else f" · by {who}"
    return f"{esc(run.trigger)} · {esc(run.reason or '')}{by}"


def _step_line(name: str, st: dict | None) -> str:
    st = st or {}
    state = st.get("state") or "pending"
    line = f"{STATE_ICON.get(state, '▫️')} *{name}*"
    if st.get("seconds") is not None and state != "running":
        line += f" · {duration(st['seconds'])}"
    summary = st.get("summary") if isinstance(st.get("summary"), dict) else {}
    if name.startswith("train") and summary.get("epochs"):
        # Step files come from pipeline pods: show what parses, never fail on what doesn't.
        line += f" · epoch {esc(str(summary.get('epoch', 0)))[:12]}/{esc(str(summary['epochs']))[:12]}"
        for key, label in (("loss", "loss"), ("val_top1", "val top-1"), ("train_acc", "train acc")):
            value = _number(summary.get(key))
            if value is not None:
                line += f" · {label} {value:.3f}"
    if state == "failed" and st.get("error"):
        line += f"\n      {esc(st['error'])[:300]}"
    return line


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _links(run: RunRecord) -> str:
    return f"<{run.external_url}|KFP run>" if run.external_url else ""


def run_progress(run: RunRecord, steps: dict, now: float) -> dict:
    """The run's message while it is queued or running; ``now`` keeps this pure."""
    run = as_run(run)
    trials = sorted((s for s in steps if s.startswith(TRIAL_STEP)),
                    key=lambda s: int(s[len(TRIAL_STEP):]) if s[len(TRIAL_STEP):].isdigit() else 1 << 30)
    names = [n for s in STEPS for n in ([s, *trials] if s == "train" else [s])]   # a sweep's trials under train
    names += [s for s in steps if s not in names]
    lines = [("    " if n in trials else "") + _step_line(n, steps.get(n)) for n in names]
    blocks = [header(f"🏋️ Training run {run.run_id}"),
              section("\n".join(lines)),
              context(_trigger(run), f"{run.state} · elapsed {elapsed(run, now)}", _links(run))]
    if run.active:
        blocks.append(actions(
            button("View run", ids.VIEW_RUN, run.run_id),
            button("Cancel run", ids.CANCEL_RUN, run.run_id, style="danger",
                   confirm_with=confirm("Cancel this run?", f"Run `{run.run_id}` stops and nothing is deployed.",
                                        "Cancel run")),
            block_id=f"run:{run.run_id}"[:255]))
    running = next((n for n in names if (steps.get(n) or {}).get("state") == "running"), None)
    text = f"Training run {run.run_id}: {run.state}" + (f", {running}" if running else "")
    return msg(text, blocks)


def _worst(per_class: dict, k: int = 3) -> str:
    worst = sorted(per_class.items(), key=lambda kv: kv[1])[:k]
    return ", ".join(f"`{esc(c)}` {pct(a, 1)}" for c, a in worst) or "–"


def _params_text(params: dict) -> str:
    """The parameters that differ from TrainParams' defaults; the rest is noise."""
    from steps.params import TrainParams  # pure dataclass, no torch
    defaults = {k: d["default"] for k, d in TrainParams.describe().items()}
    changed = {k: v for k, v in (params or {}).items() if k not in defaults or defaults[k] != v}
    if not changed:
        return "defaults"
    rest = ", the rest default" if len(changed) < len(params) else ""
    return " ".join(f"`{esc(k)}={esc(v)}`" for k, v in changed.items()) + rest


@dataclass(frozen=True)
class _Final:
    """What every outcome's builder reads: the report, falling back to the run record."""
    run: RunRecord
    report: dict
    status: str
    metrics: dict
    top1: float | None
    prod: dict | None
    decision: str | None
    reason: str | None
    version: int | None
    data: dict
    counts: dict

    @classmethod
    def of(cls, run: RunRecord, report: dict) -> _Final:
        data = report.get("data") or {}
        metrics = report.get("metrics") or {}
        return cls(run=run, report=report, status=report.get("status") or run.state,
                   metrics=metrics, top1=metrics.get("top1", run.top1),
                   prod=report.get("production") or None,
                   decision=report.get("decision") or run.decision,
                   # a deploy held by a moved production: the service's words name who moved it
                   reason=(report.get("held") and run.decision_reason) or report.get("reason")
                   or run.decision_reason,
                   version=report.get("model_version") or run.model_version,   # approved after the report
                   data=data, counts=data.get("counts") or {})


def _outcome(f: _Final) -> str:
    if f.status == "succeeded":
        if f.run.approval:
            return "approval"
        return "deployed" if f.decision == "deploy" else "held"
    return "canceled" if f.status == "canceled" else "failed"


def final_report(run: RunRecord, report: dict) -> dict:
    """The run's message once it finished: results, decision and what to do next."""
    f = _Final.of(as_run(run), report or {})
    return with_serving_line(_BUILDERS[_outcome(f)](f), f)


def with_serving_line(view: dict, f: _Final) -> dict:
    """A deployed report's line on what the model server answers (report["serving"],
    added by the deliverer when serving.url is set), above the buttons."""
    serving = f.report.get("serving")
    if not serving or _outcome(f) != "deployed":
        return view
    text = serving_text(serving, f.version)
    lagging = serving.get("error") or f.version not in (serving.get("versions") or [])
    line = context((":warning: " if lagging else ":satellite_antenna: ") + esc(text))
    blocks = list(view["blocks"])
    at = len(blocks) - 1 if blocks and blocks[-1].get("type") == "actions" else len(blocks)
    return {**view, "blocks": blocks[:at] + [line] + blocks[at:]}


def _deployed(f: _Final) -> dict:
    title = "🚀 deployed" + (f" as v{f.version}" if f.version else "")
    rollback = []
    if f.version:
        rollback.append(button("Roll back", ids.ROLLBACK, str(f.version), style="danger",
                               confirm_with=confirm("Roll back production?",
                                                    f"Production moves from v{f.version} back to the previous version.",
                                                    "Roll back")))
    return _finished(f, f"✅ Run {f.run.run_id}: {title}", _results(f), rollback)


def _held(f: _Final) -> dict:
    promote = []
    if f.decision == "hold":  # a run that never decided has nothing to promote
        promote.append(button("Promote anyway", ids.PROMOTE, f.run.run_id, style="primary",
                              confirm_with=confirm("Promote a held model?",
                                                   f"Run `{f.run.run_id}` was held: {esc(f.reason or '')}. "
                                                   "Publish it to production anyway?", "Promote")))
    return _finished(f, f"✅ Run {f.run.run_id}: ✋ held", _results(f), promote)


APPROVAL_TITLE = {"pending": "⏸️ awaiting approval", "approved": "🚀 approved", "rejected": "🚫 rejected",
                  "expired": "⌛ approval expired"}


def _approval(f: _Final) -> dict:
    """A deploy that waits for an approver; once decided, stamped and without buttons."""
    run = f.run
    title = APPROVAL_TITLE.get(run.approval, run.approval)
    if run.approval == "approved" and f.version:
        title += f" → v{f.version}"
    stamp = {"pending": "Evaluation says deploy; an approver decides. Only the approve list may answer.",
             "approved": f"Approved by <@{esc(run.approval_by)}> at {when(run.approval_at)}"
                         + (f" → *v{f.version}* is production" if f.version else ""),
             "rejected": f"Rejected by <@{esc(run.approval_by)}> at {when(run.approval_at)}; nothing was deployed.",
             "expired": f"Nobody answered before {when(run.approval_at)}; nothing was deployed. "
                        f"An approver can still publish it with `/ct deploy {esc(run.run_id)}`."}.get(run.approval, "")
    buttons = []
    if run.approval == "pending":
        buttons = [button("Approve deploy", ids.APPROVE_DEPLOY, run.run_id, style="primary",
                          confirm_with=confirm("Approve this deploy?", f"Run `{run.run_id}` becomes production.",
                                               "Approve")),
                   button("Reject", ids.REJECT_DEPLOY, run.run_id, style="danger")]
    return _finished(f, f"✅ Run {run.run_id}: {title}", [*_results(f), section(stamp)], buttons)


def _failed(f: _Final) -> dict:
    return _finished(f, f"{STATE_ICON.get(f.status, '❌')} Run {f.run.run_id}: {f.status}", _failure(f), [])


def _canceled(f: _Final) -> dict:
    # Shown like a failure: the step it stopped in and the report's "canceled by ..." error.
    return _failed(f)


_BUILDERS = {"deployed": _deployed, "held": _held, "failed": _failed, "canceled": _canceled,
             "approval": _approval}


def _results(f: _Final) -> list:
    """Metrics, decision and facts of a run that finished evaluating."""
    prod, top1 = f.prod, f.top1
    delta = (top1 - prod["top1"]) if (prod and prod.get("top1") is not None and top1 is not None) else None
    vs = f" ({pp(delta)} vs production v{prod.get('version')})" if delta is not None else \
        " (no production model to compare)"
    # evaluate's reasons already open with the decision ("hold: top-1 ...").
    why = (f.reason or "").removeprefix(f"{f.decision}:").strip()
    return [section(f"*kNN top-1* {pct(top1)}{vs}\n*Decision*: {esc(f.decision or '–')} — {esc(why)}"),
            *fields([
                ("Worst classes", _worst(f.metrics.get("per_class") or {})),
                ("Model version", f"v{f.version}" if f.version else "not published"),
                ("Data", f"{f.data.get('n', sum(f.counts.values()) if f.counts else '–')} images from "
                         f"{len(f.data.get('sources') or f.run.data_uris or [])} object(s)"),
                ("Duration", duration(f.report.get("total_seconds"))),
            ])]


def _failure(f: _Final) -> list:
    failed = f.report.get("failed_step") or f.run.failed_step
    err = f.report.get("error") or f.run.error or "no error message"
    return [section(f"*Failed step*: {esc(failed or '–')}\n```{esc(err)[:2500]}```"),
            *fields([("Duration", duration(f.report.get("total_seconds")))])]


def _reuse(f: _Final) -> list:
    """What the run reused: its mode, weights from which version, images added to the
    gallery and from which objects, data read anew vs cached, time saved against the last
    full run (the deliverer adds run_seconds and last_full to the report)."""
    report = f.report
    mode = report.get("mode") or (f.run.params or {}).get("mode")
    if not mode:
        return []
    reuse = report.get("reuse") or {}
    parts = [f"mode *{esc(mode)}*"]
    if reuse.get("weights_from") is not None:
        parts.append(f"weights from v{esc(reuse['weights_from'])}")
    if mode == "refresh" and reuse.get("added_images") is not None:
        objects = [str(o).rsplit("/", 1)[-1] for o in reuse.get("added_objects") or []]
        shown = ", ".join(f"`{esc(o)}`" for o in objects[:3]) + (f" +{len(objects) - 3}" if len(objects) > 3 else "")
        parts.append(f"+{reuse['added_images']} gallery images from {len(objects)} object(s)"
                     + (f": {shown}" if shown else ""))
    cache = f.data.get("cache") or {}
    if cache:
        parts.append(f"data: {cache.get('objects_new', 0)} object(s) read, {cache.get('objects_cached', 0)} from the cache")
    took, last = report.get("run_seconds"), report.get("last_full") or {}
    if took is not None:
        line = f"took {duration(took)}"
        if mode != "full" and last.get("seconds"):
            line += (f", {duration(max(0.0, last['seconds'] - took))} less than the last full run "
                     f"`{esc(last.get('run_id'))}` ({duration(last['seconds'])})")
        parts.append(line)
    return [context(" · ".join(parts))]

def winning_trial(trials: list) -> int | None:
    """The trial select_best keeps: the highest validation top-1 (first on a tie)."""
    scored = [t for t in trials if isinstance(t, dict) and _number(t.get("val_top1")) is not None]
    return max(scored, key=lambda t: _number(t["val_top1"]))["trial"] if scored else None


def trials_table(trials: list) -> str:
    """A sweep's trials: the parameters that differ, validation top-1, training time, the winner."""
    trials = [t for t in trials or [] if isinstance(t, dict)]
    params = [t.get("params") if isinstance(t.get("params"), dict) else {} for t in trials]
    keys = sorted({k for p in params for k in p if len({str(q.get(k)) for q in params}) > 1}, key=str)
    best = winning_trial(trials)
    rows = [[("★ " if t.get("trial") == best else "  ") + str(t.get("trial")),
             " ".join(f"{k}={p.get(k)}" for k in keys) or "–",
             pct(_number(t.get("val_top1"))), duration(_number(t.get("seconds"))), str(t.get("state") or "–")]
            for t, p in zip(trials, params, strict=True)]
    return code_table([[clip(c, 60) for c in r] for r in rows], ["trial", "parameters", "val top-1", "time", "state"])


def _finished(f: _Final, title: str, body: list, buttons: list) -> dict:
    """The frame all outcomes share: title, trigger, body, data and params, buttons."""
    run = f.run
    blocks = [header(title), context(_trigger(run), f"finished {when(run.finished_at)}", _links(run)), *body]
    trials = f.report.get("trials")
    if isinstance(trials, list) and trials:
        blocks.append(section(f"*Sweep: {len(trials)} trials* (★ the best by validation top-1, evaluated above)\n"
                              + trials_table(trials[:40])))
    if f.counts:
        blocks.append(context("per class: " + " ".join(f"`{esc(k)}`:{v}" for k, v in
                                                       sorted(f.counts.items(), key=lambda kv: str(kv[0])))))
    blocks.append(context("params: " + _params_text(f.report.get("params") or run.params)))
    blocks += _reuse(f)
    blocks.append(actions(*buttons, button("View run", ids.VIEW_RUN, run.run_id),
                          button("Retrain", ids.RETRAIN, run.run_id), block_id=f"report:{run.run_id}"[:255]))
    text = f"Run {run.run_id} {f.status}" + (
        f": top-1 {pct(f.top1)}, {f.decision}" if f.status == "succeeded" else "")
    return msg(text, blocks)


def thread_details(run: RunRecord, report: dict, steps: dict | None = None) -> dict:
    """Per-step timings, per-class accuracy and validation warnings, for the run's thread."""
    run = as_run(run)
    report = report or {}
    timings = dict(report.get("timings") or {})
    for name, st in (steps or {}).items():
        if name not in timings and (st or {}).get("seconds") is not None:
            timings[name] = st["seconds"]
    blocks = [section(f"*Details of run* `{esc(run.run_id)}`")]
    if timings:
        # report.json is stored with sorted keys: show the steps in pipeline order.
        order = [n for n in STEPS if n in timings] + sorted(n for n in timings if n not in STEPS)
        rows = [[name, duration(timings[name]), f"{float(timings[name]):.1f}s"] for name in order]
        blocks.append(section("*Step timings*\n" + code_table(rows, ["step", "time", "seconds"])))
    per_class = (report.get("metrics") or {}).get("per_class") or {}
    if per_class:
        confusion = (report.get("metrics") or {}).get("confusion") or []
        rows = []
        for i, (cls, acc) in enumerate(sorted(per_class.items(), key=lambda kv: str(kv[0]))):
            n = sum(confusion[i]) if i < len(confusion) and isinstance(confusion[i], list) else ""
            rows.append([str(cls), f"{100 * float(acc):6.2f}%", str(n), "█" * int(round(float(acc) * 20))])
        blocks.append(section("*Per-class kNN top-1*\n" + code_table(rows, ["class", "top-1", "n", ""])))
    warnings = (report.get("validation") or {}).get("warnings") or []
    if warnings:
        shown = bullets([clip(esc(w), 400) for w in warnings], max_items=MAX_WARNINGS_SHOWN)
        blocks.append(section(f"*Validation warnings ({len(warnings)})*\n{shown}"))
    else:
        blocks.append(context("no validation warnings"))
    ev = report.get("eval") or {}
    if ev:
        blocks.append(context(f"eval set: {ev.get('n', '–')} images · `{esc(ev.get('uri', ''))}` · "
                              f"`{esc(str(ev.get('fingerprint', ''))[:24])}`"))
    return msg(f"Details of run {run.run_id}", blocks)


def run_details(run: RunRecord, steps: dict | None, now: float) -> dict:
    """Ephemeral answer to *View run*: the run record at a glance."""
    run = as_run(run)
    blocks = [header(f"Run {run.run_id}")]
    blocks += fields([
        ("State", f"{STATE_ICON.get(run.state, '•')} {run.state}"),
        ("Trigger", _trigger(run)),
        ("Created", when(run.created_at)),
        ("Elapsed", elapsed(run, now)),
        ("Runner", esc(run.runner) + (f" · {_links(run)}" if run.external_url else "")),
        ("Result", (f"top-1 {pct(run.top1)} · {esc(run.decision)} · {esc(run.decision_reason)}"
                    if run.top1 is not None else "–")),
        ("Model version", f"v{run.model_version}" if run.model_version else "–"),
        ("Data objects", str(len(run.data_uris or []))),
    ])
    if steps:
        names = list(STEPS) + [s for s in steps if s not in STEPS]
        blocks.append(section("\n".join(_step_line(n, steps.get(n)) for n in names)))
    if run.error:
        blocks.append(section(f"*Error* ({esc(run.failed_step or '?')})\n```{esc(run.error)[:2500]}```"))
    blocks.append(context("params: " + _params_text(run.params)))
    return msg(f"Run {run.run_id}: {run.state}", blocks)

