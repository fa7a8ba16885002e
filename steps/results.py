"""Read a run's results from the store. The bot only ever looks here, so it does not
care which runner ran the pipeline. Cheap to import: no kfp, no torch."""
from __future__ import annotations

import json

from steps.layout import STEPS, confusion_png_key, report_key, run_prefix

TRIAL_PREFIX = "train-trial-"


def _step_docs(store, run_id: str) -> dict[str, dict]:
    prefix = run_prefix(run_id) + "steps/"
    out = {}
    for obj in store.list(prefix):
        name = obj.key[len(prefix):]
        if not name.endswith(".json") or "/" in name:
            continue
        try:
            out[name[:-len(".json")]] = json.loads(store.get_bytes(obj.key))
        except (KeyError, ValueError):
            continue  # deleted or half-written between list and get
    return out


def read_steps(store, run_id: str) -> dict[str, dict]:
    """step -> status dict for the seven pipeline steps that have written one, in
    pipeline order. Sweep trials are left out (see ``read_trials``)."""
    docs = _step_docs(store, run_id)
    return {s: docs[s] for s in STEPS if s in docs}


def read_trials(store, run_id: str) -> dict[int, dict]:
    """Sweep trial index -> its status dict (empty for runs without a sweep)."""
    docs = _step_docs(store, run_id)
    trials = {}
    for name, doc in docs.items():
        if name.startswith(TRIAL_PREFIX) and name[len(TRIAL_PREFIX):].isdigit():
            trials[int(name[len(TRIAL_PREFIX):])] = doc
    return dict(sorted(trials.items()))


def read_report(store, run_id: str) -> dict | None:
    return store.get_json(report_key(run_id))


def read_confusion_png(store, run_id: str) -> bytes | None:
    try:
        return store.get_bytes(confusion_png_key(run_id))
    except KeyError:
        return None
