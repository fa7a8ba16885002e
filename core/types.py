"""Domain types shared by bot/, scheduler/ and pipelines/ (no network clients here)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed", "canceled")


@dataclass
class RunRecord:
    run_id: str
    model: str
    trigger: str                 # manual | weekly | new_data | promote
    reason: str                  # human words: "/ct train by <@U123>", "weekly retrain 2026-W47"
    requested_by: str            # Slack user id, or "scheduler"
    params: dict = field(default_factory=dict)
    data_uris: list = field(default_factory=list)
    state: str = "queued"        # queued | running | succeeded | failed | canceled
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    runner: str = "local"
    external_id: str = ""        # local: pid; kfp: run id
    external_url: str = ""       # link to the KFP run when remote
    slack_channel: str = ""      # the one message updated in place
    slack_ts: str = ""
    progress: dict = field(default_factory=dict)   # step -> state
    decision: str = ""           # deploy | hold
    decision_reason: str = ""
    top1: float | None = None
    model_version: int | None = None
    error: str = ""
    failed_step: str = ""
    # deploy.require_approval: pending | approved | rejected | expired ("" = not needed)
    approval: str = ""
    approval_by: str = ""
    approval_at: float | None = None
    approval_expect: dict = field(default_factory=dict)   # what the report showed: {production}

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class NewData:
    """What a data-watch tick found: the new objects since the cursor."""
    keys: list                   # store keys, oldest first
    total_bytes: int
    fingerprint: str             # dedupe key of the new-object set
    counts: dict = field(default_factory=dict)  # per-class counts when cheaply known


class Notifier(Protocol):
    """How the service and ticks talk to people. bot/ implements it on Slack."""

    def run_started(self, run: RunRecord) -> tuple[str, str]:
        """Post the run's one message; returns (channel, ts)."""

    def run_progress(self, run: RunRecord, steps: dict) -> None:
        """Update the message in place. steps: step -> step-status dict (see steps.layout)."""

    def run_finished(self, run: RunRecord, report: dict, confusion_png: bytes | None) -> None:
        """Final report in the message, details and the confusion matrix in its thread."""

    def new_data(self, found: NewData, alert_id: str) -> None:
        """New-data alert with Retrain now / Dismiss buttons."""

    def say(self, text: str, key: str | None = None) -> None:
        """A plain line in the channel (audit-worthy events: promote, rollback...); with
        ``key``, said once however often it is asked."""

    def fire_failed(self, fire_id: str, text: str) -> None:
        """A scheduled or automatic run that could not start, with a Retry button."""
