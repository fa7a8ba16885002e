"""Following runs: polling the runner and the run's step files, updating the run's
Slack message, finishing a run exactly once, and cancelling one.

A mixin of core.service.TrainingService, which holds the state, store, runner,
notifier and settings it uses (see the facade's docstring)."""
from __future__ import annotations

import json
import logging

from core import metrics
from core.errors import Conflict, ServiceError
from core.gate import who
from core.service_base import FINISH_TTL, LOCK_TTL, QUEUED_TIMEOUT
from core.types import FINAL_STATES, RunRecord
from steps import layout
from steps.crashpoints import crash_point

log = logging.getLogger("ctbot.service")


class RunFollow:
    def refresh(self, run_id: str) -> RunRecord:
        """Poll the runner and the run's step files; update the record and the run's
        Slack message. Safe to call from several replicas: the final report is posted once."""
        run = self.get_run(run_id)
        if not run.active:
            return run
        if not run.external_id:
            # Recorded but never submitted (the process stopped in between): after a
            # while, close it so it no longer holds the lock.
            if self.clock() - run.created_at < QUEUED_TIMEOUT:
                return run
            return self._finish(run, "failed", {}, run.progress,
                                error="never submitted: the service stopped before starting it")
        try:
            status = self.runner.poll(run.run_id, run.external_id)
        except Exception:
            log.exception("poll of %s failed; will retry", run_id)
            status = "running"
        steps = self._read_steps(run_id)
        progress = {name: (st or {}).get("state", "") for name, st in steps.items()}
        if status not in FINAL_STATES:
            self.state.refresh_lock(run.model, run_id, LOCK_TTL)
            metrics.run_started(run)
            if progress != run.progress:
                run = self.state.update_run(run_id, only_if_active=True, progress=progress) or run
            # Epoch, loss and val accuracy change within a step: compare the summaries too.
            # The deliverer throttles and always sends the latest state.
            sig = json.dumps({k: [(v or {}).get("state"), (v or {}).get("summary")] for k, v in steps.items()},
                             sort_keys=True, default=str)
            if self.state.swap_marker(f"progress:{run_id}", sig, LOCK_TTL) != sig:
                self.notifier.run_progress(run, steps)
            return run
        return self._finish(run, status, steps, progress)

    def _finish(self, run: RunRecord, status: str, steps: dict, progress: dict,
                error: str = "") -> RunRecord:
        claim = f"dedupe:finished:{run.run_id}"
        # A short claim, made permanent at the end: a crash half-way lets a later refresh
        # finish the run instead of leaving it "running" for ever.
        if not self.state.once(claim, self.settings.finish_retry_seconds):
            return self.get_run(run.run_id)  # another replica (or a cancel) finished it
        crash_point("report_before_post")
        # Owed to Slack before the run counts as finished: the report survives a crash.
        self.notifier.run_finished(run, None, None)
        report = None if error else self._read_report(run.run_id)
        fields = {"progress": progress, "finished_at": self.clock()}
        if error:
            fields.update(state="failed", error=error)
        elif status == "canceled":
            fields["state"] = "canceled"
        elif report is None:
            fields["state"] = "failed"
            fields["error"] = (f"the runner says {status} but the pipeline wrote no "
                               f"{layout.report_key(run.run_id)}")
        else:
            ok = status == "succeeded" and report.get("status", "succeeded") == "succeeded"
            fields.update(state="succeeded" if ok else "failed",
                          decision=report.get("decision") or "",
                          decision_reason=report.get("reason") or "",
                          top1=(report.get("metrics") or {}).get("top1"),
                          model_version=report.get("model_version"),
                          failed_step=report.get("failed_step") or "",
                          error=report.get("error") or ("" if ok else f"the runner says {status}"))
            if ok and fields["decision"] == "deploy" and fields["model_version"] is None \
                    and self.settings.deploy.require_approval:
                # The pipeline did not publish: an approver decides, bound to the production
                # the report shows (what evaluate compared against).
                fields.update(approval="pending",
                              approval_expect={"production": (report.get("production") or {}).get("version")})
            if ok and report.get("held"):
                fields["decision_reason"] = self._held_reason(run.run_id, report["held"])
        run = self.state.update_run(run.run_id, **fields)
        self.state.hold(claim, FINISH_TTL)
        if run.approval == "pending":
            self.state.r.sadd(self.state.k("approvals"), run.run_id)
            self._mirror_approval(run)
            self.state.audit("approval_requested", run.requested_by, run_id=run.run_id, top1=run.top1)
        self.state.release_lock(run.model, run.run_id)
        if run.state == "succeeded":
            self.state.clear_pending(upto=run.created_at)
        if report and run.state == "succeeded" and (run.model_version is not None or report.get("held")):
            self._audit_pipeline_deploy(run, report)
        self.state.audit("run_finished", "scheduler", run_id=run.run_id, state=run.state,
                         decision=run.decision or None, version=run.model_version,
                         error=run.error or None)
        self.notifier.run_progress(run, steps)       # now final: the deliverer sends the report
        metrics.run_finished(run)
        return run

    def cancel(self, run_id: str, by: str) -> RunRecord:
        run = self.get_run(run_id)
        if not run.active:
            raise Conflict(f"Run `{run_id}` already {run.state}; nothing to cancel.", run=run)
        if run.external_id:
            try:
                self.runner.cancel(run.run_id, run.external_id, by=by)
            except Exception as e:
                log.exception("cancel of %s failed", run_id)
                raise ServiceError(f"Could not cancel run `{run_id}`: {e}") from e
        self.state.once(f"dedupe:finished:{run_id}", FINISH_TTL)  # the run watch won't re-post it
        run = self.state.update_run(run_id, state="canceled", finished_at=self.clock(),
                                    error=f"canceled by {by}")
        self.state.release_lock(run.model, run_id)
        metrics.run_finished(run)
        self.state.audit("cancel", by, run_id=run_id)
        self.notifier.run_progress(run, self._read_steps(run_id))
        self.notifier.say(f"{who(by)} canceled run `{run_id}`.")
        return run
