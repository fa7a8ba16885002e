"""Starting runs: validated params and the run mode (refresh, warm, full), one active run per model (a Redis lock), a
frozen data snapshot, the run record, and one submit per run however often it is asked.

A mixin of core.service.TrainingService, which holds the state, store, runner,
notifier and settings it uses (see the facade's docstring)."""
from __future__ import annotations

import dataclasses
import logging
import time

from core import ct_policy
from core.errors import Conflict, ParamError, ServiceError, Unavailable
from core.gate import who
from core.service_base import DEDUPE_TTL, LOCK_TTL, QUEUED_TIMEOUT, SNAPSHOT_MAX_URIS
from core.types import RunRecord
from steps import layout
from steps.crashpoints import crash_point

log = logging.getLogger("ctbot.service")


class RunStart:
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
