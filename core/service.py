"""The training service: the one object every trigger goes through.

Slash commands, buttons, the weekly tick and the new-data tick all call it, so the
rules live in one place: validated params, one active run per model (a Redis lock),
a frozen data snapshot per run, an audit entry for every action, and one Slack message
per run that the run watch keeps up to date.

pipelines/ and steps/ are imported inside methods: they may pull in kfp, and the
bot process should pay for that only when it actually starts a run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid

from core import ct_policy, metrics
from core.access import AccessPolicy, Actor, Forbidden, GroupLookupFailed
from core.config import Settings
from core.errors import Conflict, ParamError, ServiceError, Unavailable, UnknownRun
from core.gate import Decision, Gate, who
from core.notify import SafeNotifier
from core.queries import RunQueries
from core.serving_client import serving_text
from core.state import StateStore
from core.types import FINAL_STATES, Notifier, RunRecord
from steps import layout
from steps.crashpoints import crash_point

__all__ = ["TrainingService", "ServiceError", "ParamError", "UnknownRun", "Conflict", "who"]

log = logging.getLogger("ctbot.service")

LOCK_TTL = 6 * 3600          # the run watch refreshes it; the TTL only frees a lock nobody watches
DEDUPE_TTL = 7 * 24 * 3600   # how long a repeated request/alert/fire maps to the same run
FINISH_TTL = 30 * 24 * 3600
COMMAND_TTL = 24 * 3600       # an accepted command's record (a response_url lasts 30 min)
COMMAND_START_GRACE = 15      # an accepted command not started within this is resumed
EFFECT_PENDING_TTL = 600      # a button claimed by a click that never finished frees up again
SNAPSHOT_MAX_URIS = 2000     # beyond this a snapshot is folded into folders (see _snapshot)
QUEUED_TIMEOUT = 600         # a run never submitted after this long is marked failed
SERVING_SETTLE_SECONDS = 8   # how long an announcement waits for the model server to reload


class TrainingService(RunQueries):
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

    # ---- params -------------------------------------------------------------------

    def parse_params(self, tokens: list[str]) -> dict:
        """["epochs=3", "preset=v0"] -> the typed keys given; ParamError lists valid keys."""
        from steps.params import TrainParams
        try:
            return TrainParams.parse_tokens(tokens)
        except ValueError as e:
            raise ParamError(str(e)) from None

    def _resolve(self, params: dict) -> dict:
        """Every TrainParams field, with the given ones validated; ParamError otherwise."""
        from steps.params import TrainParams
        try:
            p = TrainParams.from_dict(dict(params))
        except (ValueError, TypeError) as e:
            raise ParamError(str(e)) from None
        return dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(vars(p))

    def automatic_mode(self, wanted: str) -> tuple[str, str]:
        """(mode, why) for an automatic run that wants ``wanted``, the guard rails applied."""
        from steps import deploy as registry
        has_production = (registry.read_alias(self.store, self.model) or {}).get("version") is not None
        return ct_policy.choose_mode(wanted, self.state.list_runs(50),
                                     max_refresh_in_a_row=self.settings.ct.refresh.max_in_a_row,
                                     has_production=has_production)

    def expected_seconds(self) -> dict[str, float | None]:
        """Each mode's median duration over its last runs: what the alert's buttons say."""
        runs = self.state.list_runs(50)
        return {m: ct_policy.expected_seconds(runs, m) for m in ct_policy.MODES}

    def _check_mode(self, params: dict, sweep) -> None:
        """refresh and warm reuse production's weights: refused up front, with the reason,
        when there is no production model (the pipeline would fail in its first minute)."""
        from steps.reuse import production_version
        mode = params.get("mode", "full")
        if mode == "refresh" and sweep:
            raise ParamError("mode=refresh trains nothing, so it cannot sweep: use mode=warm or mode=full")
        if mode in ("refresh", "warm"):
            try:
                production_version(self.store, self.model, mode)
            except ValueError as e:
                raise ParamError(str(e)) from None

    # ---- starting a run ---------------------------------------------------------------

    def request_training(self, reason: str, params: dict, requested_by: str, *, trigger="manual",
                         data_uris: list[str] | None = None, force=False,
                         dedupe_key: str | None = None, sweep=None) -> RunRecord:
        """Start a run. With ``dedupe_key`` the same request (a retry, a resumed command,
        a second replica) gets the same run, whatever step the first try died after.
        An automatic run (new data, weekly) given no mode gets the policy's, and the reason
        says why (core/ct_policy.py)."""
        params = dict(params or {})
        if trigger in ct_policy.AUTOMATIC_TRIGGERS and "mode" not in params:
            wanted = self.settings.schedule.mode if trigger == "weekly" else self.settings.on_new_data
            wanted = "full" if wanted == "alert" else wanted
            mode, why = self.automatic_mode(wanted)
            params["mode"] = mode
            if (mode, wanted) != ("full", "full"):   # today's default needs no explaining
                reason = f"{reason}; mode {mode}: {why}"
        params = self._resolve(params)
        self._check_mode(params, sweep)
        run_id = layout.new_run_id(self.clock())
        if dedupe_key:
            existing, run_id = self._claim_dedupe(dedupe_key, run_id)
            if existing:
                return self._ensure_submitted(existing)
        try:
            return self._start(reason, params, requested_by, trigger, data_uris, force, sweep,
                               dedupe_key, run_id)
        except BaseException:
            if dedupe_key:
                self.state.forget(f"dedupe:req:{dedupe_key}")  # let a retry through
            raise

    def _claim_dedupe(self, key: str, run_id: str) -> tuple[RunRecord | None, str]:
        """(the earlier run, its id) when this request was already made; (None, run_id)
        when this caller owns the key now. The key holds the run id *before* the run is
        created, so a try that died in between is carried on under the same id."""
        marker = f"dedupe:req:{key}"
        deadline = time.monotonic() + 5
        while not self.state.once(marker, DEDUPE_TTL, value=run_id):
            planned = self.state.marker(marker)
            run = self.state.get_run(planned) if planned else None
            if run:
                return run, run.run_id
            if planned and time.monotonic() > deadline:
                return None, planned     # its first try died before creating it: carry on
            time.sleep(0.1)
        return None, run_id

    def _start(self, reason, params, requested_by, trigger, data_uris, force, sweep,
               dedupe_key, run_id) -> RunRecord:
        snapshot = list(data_uris) if data_uris is not None else self._snapshot()
        if not snapshot:
            raise ServiceError(f"No training data under `{self.store.uri(self.settings.data_prefix)}`. "
                               "Upload .npz files, PNG folders (<label>/<name>.png) or IDX files there.")
        run = self._new_run(trigger, reason, requested_by, params, snapshot)
        run.run_id = run_id
        self._take_lock(run, force)
        try:
            created = self.state.create_run(run)
            while not created:
                if dedupe_key:   # the same request, created by a concurrent try: that run
                    return self._ensure_submitted(self.get_run(run.run_id))
                run.run_id = layout.new_run_id(self.clock())   # same minute, same 4 hex digits
                self.state.take_over_lock(self.model, run.run_id, LOCK_TTL)
                created = self.state.create_run(run)
        except BaseException:
            self.state.release_lock(self.model, run.run_id)
            raise
        self.state.audit("train_requested", requested_by, run_id=run.run_id, trigger=trigger,
                         reason=reason, params=params, objects=len(snapshot), forced=force or None,
                         sweep=sweep or None)
        crash_point("after_run_record")
        return self._ensure_submitted(run, sweep=sweep)

    def _ensure_submitted(self, run: RunRecord, sweep=None) -> RunRecord:
        """Submit a run recorded but not yet submitted (this try's, or one a crash left
        behind), exactly once; anything else is returned as it is."""
        if run.state != "queued" or run.external_id:
            return run
        if not self.state.once(f"submit:{run.run_id}", QUEUED_TIMEOUT):
            return self.get_run(run.run_id)   # another try is submitting it right now
        try:
            external_id, external_url = self.runner.submit(
                run.run_id, run.data_uris, run.params, self._eval_uri(), sweep=sweep,
                requested_by=run.requested_by)
        except Exception as e:
            log.exception("submit of %s failed", run.run_id)
            self.state.update_run(run.run_id, state="failed", finished_at=self.clock(),
                                  error=f"submit failed: {e}")
            self.state.release_lock(self.model, run.run_id)
            self.state.audit("train_submit_failed", run.requested_by, run_id=run.run_id, error=str(e))
            raise Unavailable(f"Could not start run `{run.run_id}`: {e}") from e
        run = self.state.update_run(run.run_id, state="running", started_at=self.clock(),
                                    external_id=str(external_id or ""),
                                    external_url=external_url or "")
        posted = self.notifier.run_started(run)
        if posted:   # a notifier that posts itself (tests' recorders); the outbox records it
            run = self.state.update_run(run.run_id, slack_channel=posted[0], slack_ts=posted[1])
        return self.state.get_run(run.run_id) or run

    def _new_run(self, trigger, reason, requested_by, params, snapshot) -> RunRecord:
        return RunRecord(run_id=layout.new_run_id(self.clock()), model=self.model, trigger=trigger,
                         reason=reason, requested_by=requested_by, params=params,
                         data_uris=snapshot, state="queued", created_at=self.clock(),
                         runner=self.settings.runner)

    def _take_lock(self, run: RunRecord, force: bool) -> None:
        """One active run per model. A lock left behind by a run that has in fact ended
        (the bot was down when it finished) is cleared by refreshing that run first."""
        if self.state.acquire_lock(self.model, run.run_id, LOCK_TTL):
            blocker = self._other_active(run.run_id)  # the lock may have expired under a live run
        else:
            holder = self.state.lock_holder(self.model)
            blocker = self._still_active(holder) if holder else None
            if blocker is None:
                if holder:
                    self.state.release_lock(self.model, holder)
                if self.state.acquire_lock(self.model, run.run_id, LOCK_TTL):
                    blocker = self._other_active(run.run_id)
                else:
                    blocker = self._still_active(self.state.lock_holder(self.model) or "")
        if blocker is None:
            return
        if force:
            self.state.take_over_lock(self.model, run.run_id, LOCK_TTL)
            return
        self.state.release_lock(self.model, run.run_id)
        age = int((self.clock() - (blocker.started_at or blocker.created_at)) // 60)
        raise Conflict(
            f"Run `{blocker.run_id}` is still {blocker.state} ({blocker.trigger}, "
            f"{who(blocker.requested_by)}, {age} min ago). Wait for it to finish, cancel it with "
            f"`{self.settings.slash_command} cancel {blocker.run_id}`, or force a second run.",
            run=blocker)

    def _still_active(self, run_id: str) -> RunRecord | None:
        run = self.state.get_run(run_id) if run_id else None
        if run and run.active and run.external_id:
            run = self.refresh(run.run_id)
        return run if run and run.active else None

    def _other_active(self, mine: str) -> RunRecord | None:
        for run_id in self.state.active_run_ids():
            if run_id == mine:
                continue
            run = self.state.get_run(run_id)
            if run and run.model == self.model:
                run = self._still_active(run_id)
                if run:
                    return run
        return None

    def _snapshot(self) -> list[str]:
        """The run's data, frozen at request time: every object under the data prefix.

        Past SNAPSHOT_MAX_URIS objects (PNG folders get there fast) the list would
        overflow a command line and bloat the run record, so it is folded into the
        folders one level under the prefix. Those stay open to later uploads; the run's
        data card still lists exactly what was read."""
        prefix = self.settings.data_prefix
        keys = [o.key for o in self.store.list(prefix)
                if not o.key.endswith("/") and not o.key.rsplit("/", 1)[-1].startswith(".")]
        if len(keys) > SNAPSHOT_MAX_URIS:
            folded = sorted({k if "/" not in k[len(prefix):] else
                             prefix + k[len(prefix):].split("/", 1)[0] + "/" for k in keys})
            keys = folded if len(folded) <= SNAPSHOT_MAX_URIS else [prefix]
        return [self._uri(k) for k in keys]

    def _uri(self, key: str) -> str:
        uri = self.store.uri(key)
        return uri + "/" if key.endswith("/") and not uri.endswith("/") else uri

    def _eval_uri(self) -> str:
        return layout.resolve_eval_uri(self.settings.store, self.settings.eval_uri)

    # ---- following a run --------------------------------------------------------------

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

    # ---- acting on runs and models ----------------------------------------------------

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
            raise Conflict(f"{_msg(e)}: production changed since this report was posted.", run=run) from e
        except (ValueError, KeyError) as e:
            self.release_effect(f"promote:{run_id}")
            raise ServiceError(f"Could not {'deploy' if approved_by else 'promote'} run `{run_id}`: "
                               f"{_msg(e)}") from e
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
            raise Conflict(f"{_msg(e)}. Use `{self.settings.slash_command} rollback [version]` "
                           "to choose explicitly.") from e
        except (ValueError, KeyError) as e:
            raise ServiceError(f"Could not roll back {self.model}: {_msg(e)}") from e
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

    # ---- who may act ---------------------------------------------------------------------

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

    # ---- Slack's retries and double clicks: accepted once, done once --------------------

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

    # ---- approvals (deploy.require_approval) -------------------------------------------

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


def _msg(e: Exception) -> str:
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)
