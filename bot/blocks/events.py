"""Message metadata on run messages: what other apps can read without parsing text.

Every run message carries ``{"event_type": "ctbot_run", "event_payload": {...}}``, set
when it is posted and again on every update, so it always says what the message shows.
docs/run-events.md describes the payload for apps that follow ctbot's runs.
"""
from __future__ import annotations

from core.types import RunRecord

RUN_EVENT = "ctbot_run"


def run_metadata(run: RunRecord, key: str = "") -> dict:
    """The ctbot_run metadata of ``run``'s message. Fields not known yet (top1 before
    evaluation, version before a deploy) are left out rather than null. ``key`` is the
    delivery key that lets the notifier find a post whose reply was lost."""
    payload = {"run_id": run.run_id, "model": run.model, "status": run.state, "trigger": run.trigger,
               "requested_by": run.requested_by, "decision": run.decision or ""}
    if run.top1 is not None:
        payload["top1"] = round(float(run.top1), 6)
    if run.model_version is not None:
        payload["version"] = int(run.model_version)
    if run.approval:
        payload["approval"] = run.approval
    if key:
        payload["key"] = key
    return {"event_type": RUN_EVENT, "event_payload": payload}
