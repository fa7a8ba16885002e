"""The registry gate: every path that publishes or moves `production` (promote,
`/ct deploy`, approvals, rollback, the pipeline's deploy step when its run finishes)
asks core/gate.py and is audited with the rule that decided.

A mixin of core.service.TrainingService, which holds the state, store, runner,
notifier and settings it uses (see the facade's docstring)."""
from __future__ import annotations

import logging
import uuid

from core import metrics
from core.access import Actor, Forbidden, GroupLookupFailed
from core.errors import Conflict, ServiceError
from core.gate import Decision, who
from core.service_base import DEDUPE_TTL, EFFECT_PENDING_TTL, SERVING_SETTLE_SECONDS, message
from core.serving_client import serving_text
from core.types import RunRecord
from steps import layout

log = logging.getLogger("ctbot.service")


class RegistryGate:
    def promote(self, run_id: str, by: str, *, attempt: str = "") -> int:
        """`/ct deploy` and *Promote anyway*: publish a finished run's candidate package as
        the next production version, if the gate allows (a run awaiting approval needs an
        approver, whose deploy then counts as the approval). ``attempt`` names the request
        (a command id, a click): a retry of the same request carries on where a crash
        stopped it; any other is refused."""
        run = self._publishable(run_id)
        decision = self._decide("deploy", by, lambda: self.gate.publish(run, by), run_id)
        if decision.approves:
            return self._approve(run, by, decision, attempt=attempt, via="deploy")
        version = self._publish(run, by, attempt=attempt, action="promote")
        note = f"promoted to v{version} by {who(by)}"
        self.state.update_run(run_id, model_version=version,
                              decision_reason="; ".join(x for x in (run.decision_reason, note) if x))
        self.state.audit("promote", by, run_id=run_id, version=version, rule=decision.rule)
        metrics.production(version, run.top1)
        served = self._production_moved(version)
        self.notifier.say(f"{who(by)} promoted run `{run_id}`: {self.model} v{version} is now production.{served}")
        return version

    def _publishable(self, run_id: str) -> RunRecord:
        run = self.get_run(run_id)
        if run.active:
            raise Conflict(f"Run `{run_id}` is still {run.state}; promote it once it has finished.", run=run)
        if run.state != "succeeded":
            raise Conflict(f"Run `{run_id}` {run.state}; only a successful run's model can be promoted.", run=run)
        if run.model_version is not None:
            raise Conflict(f"Run `{run_id}` is already published as {self.model} v{run.model_version}; "
                           f"`{self.settings.slash_command} rollback {run.model_version}` makes it "
                           "production again.", run=run)
        prefix = layout.candidate_prefix(run_id)
        if next(iter(self.store.list(prefix)), None) is None:
            raise ServiceError(f"Run `{run_id}` has no model package at `{self.store.uri(prefix)}`.")
        return run

    def _decide(self, action: str, by, decide, run_id: str = "") -> Decision:
        """Ask the gate (``decide()``); audit a refusal with its rule and raise Forbidden."""
        try:
            decision = decide()
        except GroupLookupFailed as e:
            decision = Decision(False, f"access: the {e.group} group could not be resolved", str(e))
        if not decision.allowed:
            self.state.audit("refused", by, requested=action, run_id=run_id or None, outcome="refused",
                             rule=decision.rule, reason=decision.message)
            raise Forbidden(decision.message)
        return decision

    def _publish(self, run: RunRecord, by: str, *, attempt: str, action: str, approved_by: str = "",
                 expect=None) -> int:
        """One publish per run, whoever asks and however often (promote, approve)."""
        from steps.deploy import ANY, StaleAlias, publish
        run_id = run.run_id
        attempt = attempt or uuid.uuid4().hex
        first = self.state.claim_effect(f"promote:{run_id}", attempt, EFFECT_PENDING_TTL)
        if first is not None and first.get("by") != attempt:
            raise Conflict(f"Run `{run_id}` is already being promoted.", run=run)
        try:
            version = publish(self.store, self.model, layout.candidate_prefix(run_id), run_id=run_id, by=by,
                              approved_by=approved_by, keep=self.settings.keep_versions, action=action,
                              expect_version=ANY if expect is None else expect["production"],
                              metrics={"top1": run.top1} if run.top1 is not None else None)
        except StaleAlias as e:
            self.release_effect(f"promote:{run_id}")
            raise Conflict(f"{message(e)}: production changed since this report was posted.", run=run) from e
        except (ValueError, KeyError) as e:
            self.release_effect(f"promote:{run_id}")
            raise ServiceError(f"Could not {'deploy' if approved_by else 'promote'} run `{run_id}`: "
                               f"{message(e)}") from e
        self.state.settle_effect(f"promote:{run_id}", attempt, f"promoted it as v{version}", DEDUPE_TTL)
        return version

    def rollback(self, version: int | None, by: str, *, expect_production: int | None = None) -> dict:
        """Move production back (to ``version``, or to the previous one); returns {from, to}.
        ``expect_production``: the version the actor saw (a report's button); if production
        has moved since, nothing is rolled back."""
        from steps.deploy import StaleAlias, rollback
        decision = self._decide("rollback", by, lambda: self.gate.rollback(by, expect_production))
        try:
            moved = rollback(self.store, self.model, to_version=version, by=by, expect_version=expect_production)
        except StaleAlias as e:
            raise Conflict(f"{message(e)}. Use `{self.settings.slash_command} rollback [version]` "
                           "to choose explicitly.") from e
        except (ValueError, KeyError) as e:
            raise ServiceError(f"Could not roll back {self.model}: {message(e)}") from e
        self.state.audit("rollback", by, rule=decision.rule, **{"from": moved.get("from"), "to": moved.get("to")})
        prod = self._production_now()
        metrics.production(moved.get("to"), (prod or {}).get("top1") if (prod or {}).get("version") == moved.get("to")
                           else None)
        served = self._production_moved(moved.get("to"))
        self.notifier.say(f"{who(by)} rolled {self.model} back from v{moved.get('from')} "
                            f"to v{moved.get('to')}.{served}")
        return moved

    def _production_now(self) -> dict | None:
        try:
            return self.production()
        except Exception:   # the move is done; the gauge catches up on the next scrape
            log.warning("could not read the %s alias after a move", self.model, exc_info=True)
            return None

    def _held_reason(self, run_id: str, held: dict) -> str:
        from steps.deploy import moved_reason
        return (f"{moved_reason(held, mention=who)}; compare again with "
                f"`{self.settings.slash_command} deploy {run_id}`")

    def _audit_pipeline_deploy(self, run: RunRecord, report: dict) -> None:
        """The pipeline's deploy step passed (or held at) the registry's compare-and-set;
        the bot records that decision, and production's new state, when the run finishes."""
        compared = (report.get("production") or {}).get("version")
        if report.get("held"):
            self.state.audit("deploy_held", "pipeline", run_id=run.run_id, outcome="refused",
                             rule="compare-and-set: production moved since evaluate compared against it",
                             expected=compared, current=report["held"].get("current"), reason=run.decision_reason)
            return
        self.state.audit("deploy", "pipeline", run_id=run.run_id, version=run.model_version,
                         rule="compare-and-set: production was still the version evaluate compared against",
                         compared_with=compared if compared is not None else "none")
        metrics.production(run.model_version, run.top1)

    def _production_moved(self, version) -> str:
        """Notify the model server at once, then say what it answers (" (...)" or "")."""
        try:
            self.state.r.publish(self.state.k("alias", self.model), str(version))
        except Exception:  # the server's alias poll covers a lost notice
            log.warning("could not publish the %s alias notice", self.model, exc_info=True)
        try:
            text = serving_text(self.serving(expect=version, wait=SERVING_SETTLE_SECONDS), version)
        except Exception:  # the announcement goes out regardless
            log.warning("reading the model server failed", exc_info=True)
            text = ""
        return f" ({text})" if text else ""

    def authorize(self, action: str | None, actor: Actor, *, owner: str = "", run_id: str = "") -> None:
        """Raise Forbidden (audited, nothing changed) unless ``actor`` may do ``action``
        from where they asked; ``action`` None checks only the workspace and channel.
        ``run_id`` (deploy): an approver off the deploy list may still `/ct deploy` a run
        awaiting approval, since that is approving it; the gate then decides."""
        rule = "access: workspace and channel" if action is None else f"access: the {action} list"
        try:
            why = self.access.place_refusal(actor) if action is None else \
                self.access.refusal(action, actor, owner=owner)
            if why and action == "deploy" and run_id and not self.access.place_refusal(actor) \
                    and self._approving(run_id, actor):
                why = None
        except GroupLookupFailed as e:   # fail closed, and say it was the lookup that failed
            why, rule = str(e), f"access: the {e.group} group could not be resolved"
        if why:
            # action None is the ack's own check: its audit must not wait on a hung Redis
            audit = self.state.audit_quick if action is None else self.state.audit
            audit("refused", actor, requested=action or "read", outcome="refused", rule=rule, reason=why)
            raise Forbidden(why)

    def _approving(self, run_id: str, actor: Actor) -> bool:
        run = self.state.get_run(run_id)
        return bool(run and run.approval in ("pending", "expired") and self.access.allowed("approve", actor))

    def approve(self, run_id: str, by: Actor) -> int:
        """*Approve deploy*: publish a run awaiting approval (or whose approval expired), if
        production is still what its report showed; returns the version. Refused for the
        requester unless deploy.allow_self_approval."""
        self.authorize("approve", by)
        run = self._awaiting(run_id)
        decision = self._decide("approve", by, lambda: self.gate.approve(run, by), run_id)
        return self._approve(run, by, decision, via="approve")

    def _approve(self, run: RunRecord, by, decision: Decision, *, attempt: str = "", via: str) -> int:
        run_id = run.run_id
        newer = next((r for r in self.list_runs(20) if r.created_at > run.created_at and r.state == "succeeded"
                      and r.decision == "deploy"), None)
        if newer:
            raise Conflict(f"A newer candidate, run `{newer.run_id}`, has finished since this report; "
                           "nothing was deployed. Approve that one instead.", run=run)
        version = self._publish(run, run.requested_by, attempt=attempt, action="deploy", approved_by=str(by),
                                expect={"production": (run.approval_expect or {}).get("production")})
        run = self.state.update_run(run_id, model_version=version, approval="approved", approval_by=str(by),
                                    approval_at=self.clock())
        self.state.r.srem(self.state.k("approvals"), run_id)
        self._mirror_approval(run)
        self.state.audit("approved", by, run_id=run_id, version=version, rule=decision.rule, via=via,
                         expired=True if decision.expired else None)
        metrics.production(version, run.top1)
        self.notifier.run_progress(run)      # the report is stamped, its buttons go
        late = " (its approval had expired)" if decision.expired else ""
        self.notifier.say(f"{who(by)} approved run `{run_id}`{late}: {self.model} v{version} is now production.")
        return version

    def reject(self, run_id: str, by: Actor) -> None:
        self.authorize("approve", by)
        run = self._awaiting(run_id, pending_only=True)
        decision = self._decide("reject", by, lambda: self.gate.reject(run, by), run_id)
        run = self.state.update_run(run_id, approval="rejected", approval_by=str(by), approval_at=self.clock())
        self.state.r.srem(self.state.k("approvals"), run_id)
        self._mirror_approval(run)
        self.state.audit("rejected", by, run_id=run_id, rule=decision.rule)
        self.notifier.run_progress(run)

    def _awaiting(self, run_id: str, pending_only: bool = False) -> RunRecord:
        """The run, awaiting an approver's answer (pending, or expired unless
        ``pending_only``); Conflict otherwise. A pending approval past its time expires here."""
        run = self.get_run(run_id)
        if run.approval == "pending" and self._approval_expired(run):
            self.expire_approvals()
            run = self.get_run(run_id)
        if run.approval == "pending" or (run.approval == "expired" and not pending_only):
            return run
        what = {"approved": f"was approved by {who(run.approval_by)}", "rejected":
                f"was rejected by {who(run.approval_by)}",
                "expired": f"expired after {self.settings.deploy.approval_timeout_hours:g} h"}.get(
            run.approval, "needs no approval")
        raise Conflict(f"Run `{run_id}` {what}; nothing was changed.", run=run)

    def _mirror_approval(self, run: RunRecord) -> None:
        """The approval state in the store too (runs/<id>/approval.json), so a publish that
        can't see Redis (`python -m steps.deploy publish`) is held at the same gate."""
        try:
            self.store.put_json(layout.approval_key(run.run_id),
                                {"state": run.approval, "by": run.approval_by or None, "at": run.approval_at})
        except Exception:   # Redis holds the truth; the bot's own paths never read this copy
            log.warning("could not write the approval state of %s to the store", run.run_id, exc_info=True)

    def _approval_expired(self, run: RunRecord) -> bool:
        return self.clock() - (run.finished_at or run.created_at) > self.settings.deploy.approval_timeout_hours * 3600

    def expire_approvals(self) -> list[str]:
        """Close pending approvals past deploy.approval_timeout_hours (the run watch calls it)."""
        out = []
        for run_id in self.state.r.smembers(self.state.k("approvals")):
            run = self.state.get_run(run_id)
            if run is None or run.approval != "pending":
                self.state.r.srem(self.state.k("approvals"), run_id)
            elif self._approval_expired(run):
                run = self.state.update_run(run_id, approval="expired", approval_at=self.clock())
                self.state.r.srem(self.state.k("approvals"), run_id)
                self._mirror_approval(run)
                self.state.audit("approval_expired", "scheduler", run_id=run_id)
                self.notifier.run_progress(run)
                out.append(run_id)
        return out
