"""The training service: the one object every trigger goes through.

Slash commands, buttons, the weekly tick and the new-data tick all call it, so the
rules live in one place: validated params, one active run per model (a Redis lock),
a frozen data snapshot per run, an audit entry for every action, and one Slack message
per run that the run watch keeps up to date.

pipelines/ and steps/ are imported inside methods: they may pull in kfp, and the
bot process should pay for that only when it actually starts a run.
"""
from __future__ import annotations

import time

from core.access import AccessPolicy
from core.commands import CommandEffects
from core.config import Settings
from core.errors import Conflict, ParamError, ServiceError, UnknownRun
from core.gate import Gate, who
from core.notify import SafeNotifier
from core.queries import RunQueries
from core.registry_gate import RegistryGate
from core.run_follow import RunFollow
from core.run_start import RunStart
from core.service_base import (
    COMMAND_START_GRACE,
    COMMAND_TTL,
    DEDUPE_TTL,
    EFFECT_PENDING_TTL,
    FINISH_TTL,
    LOCK_TTL,
    QUEUED_TIMEOUT,
    SERVING_SETTLE_SECONDS,
    SNAPSHOT_MAX_URIS,
)
from core.state import StateStore
from core.types import Notifier

__all__ = ["LOCK_TTL", "DEDUPE_TTL", "FINISH_TTL", "COMMAND_TTL", "COMMAND_START_GRACE", "EFFECT_PENDING_TTL", "SNAPSHOT_MAX_URIS", "QUEUED_TIMEOUT", "SERVING_SETTLE_SECONDS", "TrainingService", "ServiceError", "ParamError", "UnknownRun", "Conflict", "who"]


class TrainingService(RunStart, RunFollow, RegistryGate, CommandEffects, RunQueries):
    """The facade every trigger calls. Its concerns live in mixins, one module each:
    core/run_start.py, core/run_follow.py, core/registry_gate.py and core/commands.py;
    the run queries in core/queries.py."""

    def __init__(self, settings: Settings, state: StateStore, store, runner,
                 notifier: Notifier | None = None, *, clock=time.time, next_retrain=None, access=None):
        self.settings = settings
        self.state = state
        self.store = store
        self.runner = runner
        self.notifier = SafeNotifier(notifier)
        self.clock = clock
        self.next_retrain = next_retrain   # () -> datetime | None, the weekly schedule's
        self.access = access or AccessPolicy(settings.access)
        self.gate = Gate(settings.deploy, self.access, settings.slash_command)
        self.model = settings.model_name
