"""A fire's life: claimed once, started or queued, retried, failed and announced.

A fire is one automatic reason to train: a weekly retrain (``weekly:2026-W48``) or a
new-data auto-retrain (``new_data:<fingerprint>``). It is claimed with SET NX, so two
schedulers (or a scheduler and a Retry click) act on it once. A claimed fire is *owed*
until its run is accepted (``started``) or it waits behind the active run (``queued``);
it is never marked done before that. A transient failure (the store, Redis, the runner)
is retried with backoff (``schedule.retry_*``) within the retry window; a refusal (no
data, bad parameters) or a window that runs out makes it ``failed``, announced in the
channel with a *Retry* button. The start-up catch-up and that button retry it through
the same claims. Queued fires start one at a time, in the order they were queued,
whenever no run is active.

The scheduler drives this from its ticks (scheduler/jobs.py); the bot reaches it only
through the service (``TrainingService.retry_fire``), so both go through the same claims.

Keys (prefix ct:):
  fire:<id>        JSON record (FireRecord); SET NX claims it
  fires:due        ZSET id -> when its next try is due (owed, not queued)
  fires:queue      ZSET id -> its place in the queue behind the active run
  fires:queue:seq  the queue's counter (order of queueing, whatever the clocks say)
  fires:failed     ZSET id -> when it failed (owed to a person: the Retry button)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass, field

from core import metrics
from core.errors import Conflict, ServiceError, Unavailable
from core.types import RunRecord

log = logging.getLogger("ctbot.fires")

OWED = ("pending", "queued", "failed")          # states that still owe a run
SETTLED_TTL = 21 * 24 * 3600                    # started/covered/paused records: longer than a week
OWED_TTL = 60 * 24 * 3600                       # an owed fire is kept this long (a Retry button lasts too)
ATTEMPT_LOCK_SECONDS = 15 * 60                  # one try at a time per fire; a dead try frees it after this


@dataclass
class FireRecord:
    id: str                        # "weekly:2026-W48", "new_data:3f2a…"
    trigger: str                   # the run's trigger: weekly | new_data
    reason: str                    # the run's reason, shown on its message
    dedupe_key: str                # request_training's: a retried try gets the same run
    params: dict = field(default_factory=dict)   # passed through (a run mode, say)
    scheduled: str = ""            # ISO time of a scheduled fire
    covers: list = field(default_factory=list)   # fire ids this one's run stands for (coalesced)
    state: str = "pending"         # pending | queued | failed | started | covered | paused
    attempts: int = 0              # failed tries in this round
    first_try_at: float = 0.0      # start of this round: the retry window counts from here
    error: str = ""
    run_id: str = ""
    behind: str = ""               # the run it is queued behind
    by: str = ""                   # covered: the fire whose run covers it
    claimed_at: str = ""

    @property
    def label(self) -> str:
        """'Weekly retrain 2026-W48', 'Auto-retrain on new data (nd-…)'."""
        kind, _, key = self.id.partition(":")
        if kind == "weekly":
            keys = [c.partition(":")[2] for c in self.covers] or [key]
            return f"Weekly retrain {', '.join(keys)}"
        return f"Auto-retrain on new data ({key[:16]})"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, fire_id: str, raw: str) -> FireRecord:
        d = json.loads(raw)
        if "state" not in d:   # a claim written before fires had states: it was started
            d = {"state": "started", "trigger": "weekly", "reason": "", "dedupe_key": "",
                 "scheduled": d.get("scheduled", ""), "claimed_at": d.get("claimed_at", "")}
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{"id": fire_id, **known})


@dataclass
class FireOutcome:
    id: str
    outcome: str                   # launched | queued | retrying | error | duplicate | paused | busy | unknown
    run: RunRecord | None = None
    detail: str = ""
    record: FireRecord | None = None


class Fires:
    """Claims, tries, retries and queues fires for one service (its state, clock and
    notifier). Cheap to build: it holds no state of its own."""

    def __init__(self, service):
        self.service = service
        self.state, self.r = service.state, service.state.r
        self.clock = service.clock
        self.notifier = service.notifier
        cfg = service.settings.schedule
        self.window = cfg.retry_window_minutes * 60
        self.first_retry, self.max_retry = cfg.retry_first_seconds, cfg.retry_max_seconds

    def _k(self, *parts: str) -> str:
        return self.state.prefix + ":".join(parts)

    # ---- records --------------------------------------------------------------------

    def get(self, fire_id: str) -> FireRecord | None:
        raw = self.r.get(self._k("fire", fire_id))
        return FireRecord.from_json(fire_id, raw) if raw else None

    def exists(self, fire_id: str) -> bool:
        return bool(self.r.exists(self._k("fire", fire_id)))

    def save(self, rec: FireRecord) -> None:
        ttl = OWED_TTL if rec.state in OWED else SETTLED_TTL
        p = self.r.pipeline()
        p.set(self._k("fire", rec.id), rec.to_json(), ex=ttl)
        for zset in ("due", "queue", "failed"):
            if zset != {"pending": "due", "queued": "queue", "failed": "failed"}.get(rec.state):
                p.zrem(self._k("fires", zset), rec.id)
        p.execute()

    def owed(self, kind: str = "", state: str = "failed") -> list[FireRecord]:
        """Owed fires in one state (oldest first), optionally of one kind ("weekly")."""
        zset = {"pending": "due", "queued": "queue", "failed": "failed"}[state]
        ids = [i for i in self.r.zrange(self._k("fires", zset), 0, -1) if not kind or i.startswith(kind + ":")]
        return [rec for rec in map(self.get, ids) if rec is not None and rec.state == state]

    # ---- claiming ---------------------------------------------------------------------

    def claim(self, rec: FireRecord, covered: list[FireRecord] = ()) -> bool:
        """Claim ``rec`` (owed, due now) and mark ``covered`` as covered by it, all or none.
        False when ``rec`` was already claimed. The caller holds the kind's claim lock
        when it coalesces (see scheduler/jobs.py), so the members are free too."""
        now = self.clock()
        rec.state, rec.first_try_at = "pending", rec.first_try_at or now
        if not self.r.set(self._k("fire", rec.id), rec.to_json(), nx=True, ex=OWED_TTL):
            return False
        p = self.r.pipeline()   # MULTI: the claim's companions land together
        p.zadd(self._k("fires", "due"), {rec.id: now})
        for c in covered:
            c.state, c.by = "covered", rec.id
            p.set(self._k("fire", c.id), c.to_json(), ex=SETTLED_TTL)
            for zset in ("due", "queue", "failed"):
                p.zrem(self._k("fires", zset), c.id)
        p.execute()
        return True

    def fire(self, rec: FireRecord, covered: list[FireRecord] = ()) -> FireOutcome:
        """Claim and try a fire now; ``duplicate`` when someone else claimed it."""
        if not self.claim(rec, covered):
            existing = self.get(rec.id)
            if existing is None or existing.state in OWED:
                return FireOutcome(rec.id, "duplicate", detail=existing.state if existing else "", record=existing)
            return self._settled(existing)
        return self.attempt(rec.id)

    # ---- trying -------------------------------------------------------------------------

    def attempt(self, fire_id: str, *, by: str = "scheduler", fresh: bool = False) -> FireOutcome:
        """One try of an owed fire, by one caller at a time. ``fresh`` starts a new round
        of retries (a Retry click, the catch-up) for a failed fire."""
        lock, token = f"fire:{fire_id}", uuid.uuid4().hex
        if not self.state.acquire_lock(lock, token, ATTEMPT_LOCK_SECONDS):
            return FireOutcome(fire_id, "busy", detail="another try of this fire is under way")
        try:
            rec = self.get(fire_id)
            if rec is None:
                return FireOutcome(fire_id, "unknown", detail=f"no fire `{fire_id}`")
            if rec.state not in OWED:
                return self._settled(rec)
            if fresh and rec.state == "failed":
                rec.attempts, rec.first_try_at, rec.error = 0, self.clock(), ""
            return self._try(rec, by)
        finally:
            self.state.release_lock(lock, token)

    def _settled(self, rec: FireRecord) -> FireOutcome:
        if rec.state == "covered":
            owner = self.get(rec.by)
            run = self.state.get_run(owner.run_id) if owner and owner.run_id else None
            return FireOutcome(rec.id, "duplicate", run, f"covered by {rec.by}", rec)
        run = self.state.get_run(rec.run_id) if rec.run_id else None
        return FireOutcome(rec.id, "duplicate" if rec.state == "started" else rec.state, run, rec.state, rec)

    def _try(self, rec: FireRecord, by: str) -> FireOutcome:
        was_queued = rec.state == "queued"
        if rec.trigger == "weekly" and self.state.schedule_paused():
            if was_queued:
                return FireOutcome(rec.id, "queued", detail="the schedule is paused", record=rec)
            # The fire is spent: resuming later in the week does not start it late.
            rec.state = "paused"
            self.save(rec)
            self.state.audit("weekly_skipped", "scheduler", fire=rec.id.partition(":")[2], reason="schedule paused")
            return FireOutcome(rec.id, "paused", record=rec)
        try:
            run = self.service.request_training(rec.reason, rec.params, "scheduler", trigger=rec.trigger,
                                                dedupe_key=rec.dedupe_key)
        except Conflict as e:
            return self._queue(rec, e, was_queued)
        except Unavailable as e:
            return self._retry_or_fail(rec, str(e), by)
        except ServiceError as e:   # a refusal: retrying will not help until someone acts
            return self._fail(rec, str(e), announce=by == "scheduler")
        except Exception as e:  # noqa: BLE001 - the store, Redis, a network: worth another try
            metrics.dependency_error(e)
            log.warning("%s: try %d failed: %s: %s", rec.id, rec.attempts + 1, type(e).__name__, e)
            return self._retry_or_fail(rec, f"{type(e).__name__}: {e}", by)
        rec.state, rec.run_id, rec.error = "started", run.run_id, ""
        self.save(rec)
        self.state.audit("fire_started", by, fire=rec.id, run_id=run.run_id, covers=rec.covers or None,
                         attempts=rec.attempts + 1, from_queue=was_queued or None)
        return FireOutcome(rec.id, "launched", run, record=rec)

    def _queue(self, rec: FireRecord, e: Conflict, was_queued: bool) -> FireOutcome:
        blocker = getattr(e, "run", None)
        if was_queued:
            return FireOutcome(rec.id, "queued", detail=str(e), record=rec)
        rec.behind = getattr(blocker, "run_id", "") or ""
        ahead = self.enqueue(rec)
        behind = f"run `{blocker.run_id}`" if blocker else "the active run"
        after = f" and {ahead} queued fire(s)" if ahead else ""
        self.state.audit("fire_queued", "scheduler", fire=rec.id, behind=rec.behind or None, position=ahead + 1)
        self.notifier.say(f"{rec.label} is queued behind {behind}{after}; it starts when that run ends.")
        return FireOutcome(rec.id, "queued", detail=str(e), record=rec)

    def enqueue(self, rec: FireRecord) -> int:
        """Put an owed fire at the end of the queue; how many fires are ahead of it."""
        rec.state, rec.error = "queued", ""
        seq = self.r.incr(self._k("fires", "queue", "seq"))
        p = self.r.pipeline()
        p.set(self._k("fire", rec.id), rec.to_json(), ex=OWED_TTL)
        p.zadd(self._k("fires", "queue"), {rec.id: seq}, nx=True)
        p.zrem(self._k("fires", "due"), rec.id)
        p.zrem(self._k("fires", "failed"), rec.id)
        p.execute()
        return self.r.zrank(self._k("fires", "queue"), rec.id) or 0

    def _retry_or_fail(self, rec: FireRecord, error: str, by: str) -> FireOutcome:
        rec.attempts += 1
        delay = min(self.first_retry * 2 ** (rec.attempts - 1), self.max_retry)
        due = self.clock() + delay
        if due > rec.first_try_at + self.window:
            return self._fail(rec, error, announce=by == "scheduler")
        rec.state, rec.error = "pending", error
        p = self.r.pipeline()
        p.set(self._k("fire", rec.id), rec.to_json(), ex=OWED_TTL)
        p.zadd(self._k("fires", "due"), {rec.id: due})
        p.zrem(self._k("fires", "queue"), rec.id)
        p.zrem(self._k("fires", "failed"), rec.id)
        p.execute()
        self.state.audit("fire_retrying", "scheduler", fire=rec.id, attempt=rec.attempts, error=error[:300],
                         retry_in=round(delay))
        return FireOutcome(rec.id, "retrying", detail=error, record=rec)

    def _fail(self, rec: FireRecord, error: str, announce: bool = True) -> FireOutcome:
        """Owed to a person now: announced with a Retry button (a person who clicked
        Retry is answered privately instead)."""
        tries = rec.attempts + (0 if rec.attempts else 1)
        rec.state, rec.error = "failed", error
        p = self.r.pipeline()
        p.set(self._k("fire", rec.id), rec.to_json(), ex=OWED_TTL)
        p.zadd(self._k("fires", "failed"), {rec.id: self.clock()})
        p.zrem(self._k("fires", "due"), rec.id)
        p.zrem(self._k("fires", "queue"), rec.id)
        p.execute()
        self.state.audit("fire_failed", "scheduler", fire=rec.id, error=error[:300], tries=tries)
        spent = f" (tried {tries} times over {self._minutes(self.clock() - rec.first_try_at)})" if tries > 1 else ""
        if announce:
            self.notifier.fire_failed(rec.id, f"{rec.label} could not start: {error}{spent}. "
                                      "Retry when the cause is fixed; a restart of the scheduler retries it too.")
        return FireOutcome(rec.id, "error", detail=error, record=rec)

    @staticmethod
    def _minutes(seconds: float) -> str:
        return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"

    # ---- the periodic part ------------------------------------------------------------

    def tick(self) -> list[FireOutcome]:
        """Retry what is due, then start the queue's head if no run is active."""
        out = [self.attempt(i) for i in self.r.zrangebyscore(self._k("fires", "due"), "-inf", self.clock())]
        head = self.r.zrange(self._k("fires", "queue"), 0, 0)
        if head and self.service.active_run() is None:
            out.append(self.attempt(head[0]))
        return out

    def queue(self) -> list[str]:
        return self.r.zrange(self._k("fires", "queue"), 0, -1)

    # ---- a person's Retry -------------------------------------------------------------

    def retry(self, fire_id: str, by: str) -> FireOutcome:
        """The Retry button: a failed fire gets a fresh round of tries now. Anything else
        says what became of it (started, covered, queued, being tried)."""
        rec = self.get(fire_id)
        if rec is None:
            raise ServiceError(f"No fire `{fire_id}` (fires are kept {OWED_TTL // 86400} days).")
        if rec.state == "failed":
            self.state.audit("fire_retry", by, fire=fire_id)
            return self.attempt(fire_id, by=by, fresh=True)
        if rec.state in ("pending", "queued"):
            return FireOutcome(fire_id, "busy", detail=f"it is {rec.state} already", record=rec)
        return self._settled(rec)
