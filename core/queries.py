"""What the training service answers without changing anything: runs, the active run,
production, pending data and health. Slack's status, runs and data commands, App Home
and the probes read through here."""
from __future__ import annotations

import logging

from core.errors import UnknownRun
from core.outbox import Outbox
from core.serving_client import serving_status
from core.types import RunRecord
from steps import layout
from steps.deploy import read_alias
from steps.results import read_report, read_steps

log = logging.getLogger("ctbot.service")


class RunQueries:
    """Mixed into TrainingService; needs settings, state, store, model and next_retrain."""

    def health(self) -> dict:
        """{} when the state store answers, else {"redis": <error type>}; never raises."""
        try:
            self.state.ping()
        except Exception as e:   # report, don't raise: the probe must answer
            return {"redis": type(e).__name__}
        return {}

    def get_run(self, run_id: str) -> RunRecord:
        run = self.state.get_run(run_id) if run_id else None
        if run is None:
            raise UnknownRun(run_id)
        return run

    def list_runs(self, n: int = 10) -> list[RunRecord]:
        return self.state.list_runs(n)

    def active_run(self) -> RunRecord | None:
        holder = self.state.lock_holder(self.model)
        run = self.state.get_run(holder) if holder else None
        if run and run.active:
            return run
        for run_id in self.state.active_run_ids():
            run = self.state.get_run(run_id)
            if run and run.active and run.model == self.model:
                return run
        return None

    def status(self) -> dict:
        active, outbox = self.active_run(), Outbox(self.state)
        return {
            "active": active,
            "steps": self._read_steps(active.run_id) if active else {},
            "production": self.production(),
            "next_retrain": self._next_retrain(),
            "schedule_paused": self.state.schedule_paused(),
            "pending": self.state.pending(),
            "undelivered": outbox.failures(3),   # Slack messages given up on
            "owed": {"count": outbox.pending_count(), "oldest_seconds": outbox.oldest_age()},
            "serving": self.serving(),
        }

    def serving(self, expect: int | None = None, wait: float = 0.0) -> dict | None:
        """What the model server answers ({url, versions, error}); None without serving.url."""
        return serving_status(self.settings.serving.url, self.model, expect=expect, wait=wait)

    def audit_log(self, n: int = 20, since: str | None = None) -> list[dict]:
        """The last ``n`` audit entries (after ``since``, an ISO time, if given), oldest first."""
        entries = self.state.read_audit(n)
        if since:
            entries = [e for e in entries if str(e.get("at", "")) >= since]
        return list(reversed(entries))

    def data_summary(self) -> dict:
        """Pending data; the data cards of recent runs, the last training and production."""
        runs = self.state.list_runs(20)
        last = next((r for r in runs if r.state == "succeeded"), None)
        recent = []
        for r in runs:
            card = self.store.get_json(layout.data_card_key(r.run_id)) if not r.active else None
            if card:
                recent.append({"run_id": r.run_id, **card})
            if len(recent) == 5:
                break
        prod = self.production()
        return {
            "prefix": self.store.uri(self.settings.data_prefix),
            "pending": self.state.pending(),
            "recent": recent,
            "last_trained": None if last is None else {
                "run_id": last.run_id, "finished_at": last.finished_at,
                "data_card": self.store.get_json(layout.data_card_key(last.run_id))},
            "production": None if prod is None else {
                "version": prod["version"],
                "data_card": self.store.get_json(
                    layout.package_key(self.model, prod["version"], layout.DATA_CARD_JSON))},
        }

    def production(self) -> dict | None:
        alias = read_alias(self.store, self.model)
        if not alias or alias.get("version") is None:
            return None
        version = int(alias["version"])
        top1 = alias.get("top1")
        if top1 is None:
            metrics = self.store.get_json(layout.package_key(self.model, version, layout.METRICS_JSON))
            top1 = (metrics or {}).get("top1")
        return {"version": version, "top1": top1, "updated_at": alias.get("updated_at")}

    def pending_approvals(self, n: int = 5) -> list[RunRecord]:
        """Runs whose deploy waits for an approver, oldest first."""
        runs = [self.state.get_run(r) for r in self.state.r.smembers(self.state.k("approvals"))]
        return sorted((r for r in runs if r is not None and r.approval == "pending"),
                      key=lambda r: r.created_at)[:n]

    def model_history(self, n: int = 10) -> dict:
        """Production and the last ``n`` versions it went through, newest first: each with
        its top-1, the run it came from, who published it and every later move to it
        (rollbacks), and whether its package is still there to roll back to. Read from the
        production alias's history (steps.deploy), the one record of what served when."""
        from steps.deploy import list_versions
        alias = read_alias(self.store, self.model) or {}
        available = set(list_versions(self.store, self.model))
        versions: dict[int, dict] = {}
        for h in alias.get("history") or []:
            v = int(h["version"])
            row = versions.setdefault(v, {"version": v, "top1": h.get("top1"), "run_id": h.get("run_id"),
                                          "moves": []})
            row["top1"] = row["top1"] if row["top1"] is not None else h.get("top1")
            row["run_id"] = row["run_id"] or h.get("run_id")
            row["moves"].append({k: h.get(k) for k in ("action", "by", "at", "approved_by", "from") if h.get(k)})
        current = alias.get("version")
        rows = sorted(versions.values(), key=lambda r: r["version"], reverse=True)[:n]
        for row in rows:
            row["available"] = row["version"] in available
            row["production"] = row["version"] == current
        return {"production": self.production(), "versions": rows,
                "last_move": (alias.get("history") or [None])[-1]}

    def _next_retrain(self):
        if self.next_retrain is None:
            return None
        try:
            return self.next_retrain()
        except Exception:
            log.exception("next_retrain failed")
            return None

    def _read_steps(self, run_id: str) -> dict:
        try:
            return read_steps(self.store, run_id) or {}
        except Exception:
            log.exception("reading steps of %s failed", run_id)
            return {}

    def _read_report(self, run_id: str) -> dict | None:
        try:
            return read_report(self.store, run_id)
        except Exception:
            log.exception("reading the report of %s failed", run_id)
            return None
