"""Assemble runs/<run_id>/report.json from what the steps left in the store.

The pipeline's exit task (``finalize``) calls ``finalize_run``; so do the runners when a
run ended without one (killed process, canceled run). Exit tasks cannot read inner task
outputs in KFP v2, so everything comes from the store: step status JSONs, the data card
and the candidate package's metrics.json and params.json.
"""
from __future__ import annotations

import time

from pipelines.status import mark
from steps import layout
from steps.results import read_steps, read_trials

SUCCEEDED, FAILED, CANCELED = "SUCCEEDED", "FAILED", "CANCELED"
# steps that must be done for a run to count as succeeded; deploy is conditional
REQUIRED = layout.STEPS[:-1]


def _state(steps: dict, step: str) -> str | None:
    return (steps.get(step) or {}).get("state")


def outcome(steps: dict, pipeline_state: str, pipeline_error: str = "") -> tuple[str, str | None, str | None]:
    """(status, failed_step, error) from the step states and the pipeline's own verdict.
    A step that wrote 'failed' names itself; otherwise a failed pipeline is blamed on
    the step left 'running' (killed) or the first one that never reported."""
    if pipeline_state == CANCELED:
        running = next((s for s in layout.STEPS if _state(steps, s) == "running"), None)
        return "canceled", running, pipeline_error or "canceled"
    failed = next((s for s in layout.STEPS if _state(steps, s) == "failed"), None)
    if failed:
        return "failed", failed, f"{failed}: {steps[failed].get('error') or 'failed'}"
    unfinished = next((s for s in layout.STEPS if _state(steps, s) == "running"), None)
    # "skipped" before the exit task ran: a step the run's mode leaves out (refresh: train)
    missing = next((s for s in REQUIRED if _state(steps, s) not in ("done", "skipped")), None)
    if pipeline_state != SUCCEEDED or unfinished or missing:
        culprit = unfinished or missing or "finalize"
        why = pipeline_error or "step ended without reporting a result"
        return "failed", culprit, f"{culprit}: {why}"
    return "succeeded", None, None


def assemble(run_id: str, model: str, *, steps: dict, card: dict | None, metrics: dict | None,
             params: dict | None, status: str, failed_step: str | None, error: str | None,
             trials: dict | None = None, lineage: dict | None = None, now: float | None = None) -> dict:
    """Pure: the report.json document (schema in docs/architecture.md)."""
    now = time.time() if now is None else now
    card = card or {}
    metrics = metrics or {}
    summary = {s: (steps.get(s) or {}).get("summary") or {} for s in layout.STEPS}
    evaluation = {**summary["evaluate"], **metrics}
    counts = card.get("counts") or {}
    starts = [d["started_at"] for d in steps.values() if d.get("started_at")]
    timings = {s: steps[s]["seconds"] for s in layout.STEPS
               if s in steps and steps[s].get("seconds") is not None}
    eval_info = card.get("eval") or summary["ingest"].get("eval") or {}
    deployed = summary["deploy"] if _state(steps, "deploy") == "done" else {}
    # Production moved between evaluate and deploy: the run holds (steps.deploy.deploy_candidate).
    held = deployed.get("held")
    report = {
        "run_id": run_id,
        "model": model,
        "status": status,
        "params": params or {},
        "data": {
            "n": card.get("n", sum(int(v) for v in counts.values()) if counts else None),
            "counts": counts,
            "sources": card.get("sources", []),
            "fingerprint": card.get("fingerprint"),
            "cache": card.get("cache"),   # objects read anew vs taken from the shard cache
            # data preparation's own compute (no task start-up) and the bytes it read
            "prep": {**(card.get("prep") or {}), "validate_seconds": summary["validate"].get("seconds")},
        },
        "eval": {"uri": eval_info.get("uri"), "n": eval_info.get("n"),
                 "fingerprint": eval_info.get("fingerprint")},
        "validation": {"warnings": summary["validate"].get("warnings", [])},
        "timings": timings,
        "total_seconds": round(now - min(starts), 3) if starts else None,
        "metrics": ({"top1": evaluation["top1"], "per_class": evaluation.get("per_class", {}),
                     "confusion": evaluation.get("confusion", [])}
                    if evaluation.get("top1") is not None else None),
        "production": evaluation.get("production"),
        "decision": "hold" if held else evaluation.get("decision"),
        "reason": deployed.get("reason") if held else evaluation.get("reason"),
        "model_version": deployed.get("version"),
        "failed_step": failed_step,
        "error": error,
        "finished_at": now,
        **reuse_section(params, lineage, summary),
    }
    if held:
        report["held"] = held
    if trials:
        report["trials"] = [{"trial": i, "state": d.get("state"), "seconds": d.get("seconds"),
                             "params": (d.get("summary") or {}).get("params"),
                             "val_top1": (d.get("summary") or {}).get("val_top1")}
                            for i, d in trials.items()]
    return report


def reuse_section(params: dict | None, lineage: dict | None, summary: dict) -> dict:
    """The run's mode and what it reused: weights from which version, images added to the
    gallery and from which objects (from the package's lineage.json, else the steps)."""
    lineage = dict(lineage or {})
    train = summary.get("train") or {}
    embed = summary.get("embed") or {}
    mode = lineage.get("mode") or train.get("mode") or embed.get("mode") or (params or {}).get("mode") or "full"
    weights_from = lineage.get("weights_from", train.get("weights_from", embed.get("weights_from")))
    reuse = {"weights_from": weights_from}
    if mode == "refresh":
        reuse["added_images"] = lineage.get("added_images", embed.get("added_images"))
        reuse["added_objects"] = lineage.get("added_objects", [])
    return {"mode": mode, "reuse": reuse}


def finalize_run(store, run_id: str, *, model: str, params: dict | None = None,
                 pipeline_state: str = SUCCEEDED, pipeline_error: str = "",
                 write: bool = True) -> dict:
    """Close the run's books: mark the steps that never ran, write report.json. A run
    canceled from Slack keeps its canceled report: the exit task, which may see the
    terminated pods as FAILED, never turns it into a failure or a success."""
    existing = store.get_json(layout.report_key(run_id)) if write else None
    if existing and existing.get("status") == "canceled":
        return existing
    steps = read_steps(store, run_id)
    status, failed_step, error = outcome(steps, pipeline_state, pipeline_error)

    # Leave every step in a final state, so progress displays never hang on 'running'.
    for step in layout.STEPS:
        state = _state(steps, step)
        if state == "running":
            why = "canceled" if status == "canceled" else (pipeline_error or "did not finish")
            doc = dict(steps[step], state="failed", error=why, finished_at=time.time())
            store.put_json(layout.step_key(run_id, step), doc)
            steps[step] = doc
        elif state is None:
            if step == "deploy" and status == "succeeded":
                ev = (steps.get("evaluate") or {}).get("summary") or {}
                summary = {"reason": ev.get("reason") or f"decision {ev.get('decision')}"}
            else:
                summary = {"reason": f"not run: {failed_step} {status}"}
            steps[step] = mark(store, run_id, step, "skipped", summary=summary)

    metrics = store.get_json(layout.candidate_key(run_id, layout.METRICS_JSON))
    lineage = store.get_json(layout.candidate_key(run_id, "lineage.json"))
    if (lineage or {}).get("mode") == "refresh" or (params or {}).get("mode") == "refresh":
        run_params = _full_params(params)   # the package's params.json is production's training
    else:
        run_params = (store.get_json(layout.candidate_key(run_id, layout.PARAMS_JSON))
                      or (steps.get("train") or {}).get("summary", {}).get("params")
                      or _full_params(params))
    report = assemble(run_id, model, steps=steps, card=store.get_json(layout.data_card_key(run_id)),
                      metrics=metrics, params=run_params, status=status,
                      failed_step=failed_step, error=error, trials=read_trials(store, run_id),
                      lineage=lineage)
    if write:
        store.put_json(layout.report_key(run_id), report)
    return report


def _full_params(overrides: dict | None) -> dict:
    """The overrides with the defaults filled in, when training never got to say."""
    from steps.params import TrainParams  # torch-free
    try:
        return TrainParams.from_dict(overrides).to_dict()
    except ValueError:
        return dict(overrides or {})
