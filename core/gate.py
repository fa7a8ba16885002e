"""The gate: one decision for everything that publishes a model or moves production.

`/ct deploy`, *Promote anyway*, *Approve*, *Reject* and `/ct rollback` (slash command,
button or the service called from the CLI) all ask ``Gate`` before anything changes,
and the service audits every answer with the rule that gave it. The access lists
(core.access) say who may use an action at all; the gate adds what only the run knows:
its approval state (deploy.require_approval). The pipeline's own deploy step never
reaches Redis, so its gate is the registry's compare-and-set (steps.deploy.deploy_candidate)
plus evaluate's "approve" decision, which leaves the step out.

Decisions are pure: no Redis, no store. The wording says why and what to do next.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.access import AccessPolicy, mention


def who(user: str) -> str:
    """A Slack mention for user ids, the plain name for "scheduler" and friends."""
    return f"<@{user}>" if user[:1] in ("U", "W") and user.isalnum() else (user or "someone")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str                 # the rule that decided, as audited ("pending: approver deploys")
    message: str = ""         # for a refusal: why, and what to do
    approves: bool = False    # publishing counts as the run's approval
    expired: bool = False     # ... of an approval that had expired


class Gate:
    def __init__(self, deploy_settings, access: AccessPolicy, slash_command: str = "/ct"):
        self.deploy = deploy_settings
        self.access = access
        self.command = slash_command

    def approvers(self) -> str:
        return ", ".join(mention(e) for e in self.access.access.approve) or "nobody (no approve list is set)"

    def _approver(self, run, actor) -> tuple[bool, str]:
        """(may approve this run, why not)."""
        if not self.access.allowed("approve", actor):
            return False, f"only {self.approvers()} may approve it"
        if str(actor) == run.requested_by and not self.deploy.allow_self_approval:
            return False, ("you requested it, so another approver must approve it "
                           "(or set deploy.allow_self_approval)")
        return True, ""

    def publish(self, run, actor) -> Decision:
        """`/ct deploy <run>` and *Promote anyway*."""
        rid = f"`{run.run_id}`"
        if run.approval == "rejected":
            return Decision(False, "rejected: a rejected run is never published",
                            f"Run {rid} was rejected by {who(run.approval_by)}; it can't be published. "
                            f"Start a new run with `{self.command} train`. Nothing was changed.")
        if run.approval in ("pending", "expired"):
            ok, why_not = self._approver(run, actor)
            if run.approval == "pending":
                if ok:
                    return Decision(True, "pending: an approver's deploy counts as the approval", approves=True)
                return Decision(False, "pending: only an approver other than the requester may publish",
                                f"Run {rid} is waiting for approval by {self.approvers()}; an approver can "
                                f"approve it ({why_not}). Nothing was changed.")
            if ok:
                return Decision(True, "expired: an approver may still publish it", approves=True, expired=True)
            return Decision(False, "expired: only an approver may publish it",
                            f"The approval of run {rid} expired; only an approver can deploy it now "
                            f"({why_not}). Nothing was changed.")
        if run.approval == "approved":
            return Decision(True, "approved: already decided")   # the service refuses a second publish
        if self.deploy.require_approval and run.decision == "deploy":
            # Finished before require_approval was set (or by a pipeline without it).
            return Decision(True, "deploy list: the run needed no approval when it finished")
        return Decision(True, "deploy list: a held run, published by hand")

    def approve(self, run, actor) -> Decision:
        """*Approve deploy* on a report."""
        if run.approval not in ("pending", "expired"):
            return Decision(False, f"{run.approval or 'no approval'}: nothing to approve")
        ok, why_not = self._approver(run, actor)
        if not ok:
            return Decision(False, "approve: only an approver other than the requester",
                            f"You can't approve run `{run.run_id}`: {why_not}. Nothing was changed.")
        return Decision(True, "approve: an approver other than the requester", approves=True,
                        expired=run.approval == "expired")

    def reject(self, run, actor) -> Decision:
        if not self.access.allowed("approve", actor):
            return Decision(False, "reject: only an approver",
                            f"Only {self.approvers()} may reject run `{run.run_id}`. Nothing was changed.")
        return Decision(True, "reject: an approver")

    def rollback(self, actor, expect_production) -> Decision:
        """A rollback moves production to a version that was production before; it needs
        no approval, but is bound to the version the actor saw (compare-and-set)."""
        bound = "production as the actor saw it" if expect_production is not None else "current production"
        return Decision(True, f"rollback list: no approval needed; bound to {bound}")
