"""Slack's retries and double clicks: a command is accepted once and done once, and a
button's effect happens once per message; plus the small schedule and alert actions.

A mixin of core.service.TrainingService, which holds the state, store, runner,
notifier and settings it uses (see the facade's docstring)."""
from __future__ import annotations

from core.gate import who
from core.service_base import COMMAND_START_GRACE, COMMAND_TTL, DEDUPE_TTL, EFFECT_PENDING_TTL


class CommandEffects:
    def accept_command(self, cmd_id: str, payload: dict) -> bool:
        """Durable before the ack says "Starting…"; False for a repeated delivery."""
        return self.state.accept_command(cmd_id, payload, COMMAND_TTL)

    def command_started(self, cmd_id: str) -> dict:
        """Mark a command's job as running; returns its record (with any plan from an
        earlier, interrupted try)."""
        record = self.state.command(cmd_id)
        self.state.update_command(cmd_id, state="running", started_at=self.clock())
        return record

    def plan_command(self, cmd_id: str, **plan) -> None:
        self.state.update_command(cmd_id, **plan)

    def finish_command(self, cmd_id: str) -> None:
        self.state.finish_command(cmd_id)

    def interrupted_commands(self) -> list[dict]:
        """Accepted commands whose job never ran, or died: to be resumed or answered."""
        out = []
        grace = min(COMMAND_START_GRACE, self.settings.command_stale_seconds)
        for cmd_id in self.state.open_commands(older_than=grace):
            record = self.state.command(cmd_id)
            if not record:
                self.state.finish_command(cmd_id)
                continue
            started = float(record.get("started_at") or 0)
            if record.get("state") == "accepted" or self.clock() - started > self.settings.command_stale_seconds:
                out.append({"id": cmd_id, **record})
        return out

    def claim_effect(self, key: str, by: str) -> dict | None:
        """None when ``by`` may go ahead; else what the first actor did ({by, outcome})."""
        return self.state.claim_effect(key, by, EFFECT_PENDING_TTL)

    def settle_effect(self, key: str, by: str, outcome: str) -> None:
        self.state.settle_effect(key, by, outcome, DEDUPE_TTL)

    def release_effect(self, key: str) -> None:
        self.state.release_effect(key)

    def dismiss_alert(self, alert_id: str, by: str) -> None:
        self.state.audit("alert_dismissed", by, alert_id=alert_id)

    def retry_fire(self, fire_id: str, by: str):
        """The Retry button on a fire that could not start (the caller has authorized the
        clicker for ``train``): through the fires' own claims (core/fires.py), so a click
        racing the catch-up or another replica still makes one run. A FireOutcome."""
        from core.fires import Fires
        return Fires(self).retry(fire_id, str(by))

    def set_schedule_paused(self, paused: bool, by: str, *, attempt: str = "") -> None:
        """``attempt`` names the request (a command id): a resumed command announces once."""
        self.state.set_schedule_paused(paused)
        self.state.audit("schedule_paused" if paused else "schedule_resumed", by)
        self.notifier.say(f"{who(by)} {'paused' if paused else 'resumed'} the weekly retrain.",
                          key=f"schedule-{attempt}" if attempt else None)
