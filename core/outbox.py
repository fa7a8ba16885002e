"""What ctbot owes Slack, kept in Redis until Slack has it.

A state change (a run started, progressed or ended; an alert; an announcement) is done
only once the message it owes is recorded here. A deliverer (bot.notifier) sends it,
from any replica, after restarts too. Nothing is given up silently:

- **Slack unavailable** (HTTP 5xx or 429, a network error): one shared pause for every
  replica, backing off from 2 s to at most ``max_backoff`` (5 min), for as long as it
  takes; the next try sends the oldest owed message first, so when Slack answers again
  everything owed goes out in the order it was owed, once (bot.notifier posts at most
  once per key).
- **One message refused** (Slack answered, e.g. ``invalid_blocks``): that message alone
  backs off the same way.
- Whatever is still owed ``give_up`` after it was first owed (``outbox.give_up_hours``,
  24 h) is logged as an error and kept for ``/ct status`` (ct:outbox:failed).

``time_scale`` divides every one of these durations (1 in production; a test or a drill
compresses a 10-minute outage into seconds with it).

Runs are tracked by the *latest wanted view*, not a queue of updates: a throttled or
failed progress update is simply delivered later with whatever the run looks like then.
Other messages are a queue of their own, each delivered once.

Keys (prefix ct:): outbox:runs (ZSET run_id -> due time), outbox:run:<id> (HASH gen,
delivered, attempts, error), outbox:part:<id>:<part> (a run's thread parts sent),
outbox:msgs (ZSET id -> due), outbox:msg:<id> (HASH), outbox:owed (ZSET "run:<id>" or
"msg:<id>" -> when first owed: the delivery order, the give-up clock and the gauges) with
outbox:owed_seq (HASH member -> sequence, the order within one clock tick; outbox:seq counts),
outbox:slack (HASH until, failures, since, error: Slack is unavailable, paused until),
outbox:failed (LIST, newest first).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time

log = logging.getLogger("ctbot.outbox")

FIRST_BACKOFF = 2.0
MAX_BACKOFF = 300.0          # never more than 5 minutes between two tries
GIVE_UP_HOURS = 24.0
FAILED_KEEP = 50
ENTRY_TTL = 30 * 24 * 3600


class Outbox:
    def __init__(self, state, clock=time.time, *, give_up_hours: float = GIVE_UP_HOURS,
                 max_backoff: float = MAX_BACKOFF, time_scale: float = 1.0):
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.state, self.r, self.clock = state, state.r, clock
        self.time_scale = time_scale
        self.give_up_seconds = give_up_hours * 3600 / time_scale    # in the clock's seconds
        self.max_backoff = max_backoff / time_scale

    @classmethod
    def from_settings(cls, state, settings, clock=time.time) -> Outbox:
        o = settings.outbox
        return cls(state, clock, give_up_hours=o.give_up_hours, max_backoff=o.max_backoff_seconds,
                   time_scale=o.time_scale)

    def k(self, *parts: str) -> str:
        return self.state.k(*parts)

    def backoff(self, attempts: int) -> float:
        """Seconds (of the clock) before try ``attempts + 1``: 2 s doubling, capped."""
        return min(FIRST_BACKOFF * 2 ** max(attempts - 1, 0) / self.time_scale, self.max_backoff)

    def _owe(self, pipe, member: str) -> None:
        """``member`` is owed from now, unless it already was; its sequence number orders
        entries owed within the same clock tick."""
        seq = self.r.incr(self.k("outbox", "seq"))
        pipe.zadd(self.k("outbox", "owed"), {member: self.clock()}, nx=True)
        pipe.hsetnx(self.k("outbox", "owed_seq"), member, seq)

    def _settled(self, pipe, member: str) -> None:
        pipe.zrem(self.k("outbox", "owed"), member)
        pipe.hdel(self.k("outbox", "owed_seq"), member)

    # ---- runs -----------------------------------------------------------------------

    def want_run(self, run_id: str, delay: float = 0.0, final: bool = False) -> int:
        """The run's message must show its current state (``final``: its report, once
        the record says so); returns the wanted generation."""
        pipe = self.r.pipeline()
        pipe.hincrby(self.k("outbox", "run", run_id), "gen", 1)
        if final:
            pipe.hset(self.k("outbox", "run", run_id), "final", 1)
        pipe.expire(self.k("outbox", "run", run_id), ENTRY_TTL)
        pipe.zadd(self.k("outbox", "runs"), {run_id: self.clock() + delay})
        self._owe(pipe, f"run:{run_id}")
        return int(pipe.execute()[0])

    def run_entry(self, run_id: str) -> dict:
        return self.r.hgetall(self.k("outbox", "run", run_id))

    def due_runs(self, limit: int = 50) -> list[str]:
        return self.r.zrangebyscore(self.k("outbox", "runs"), "-inf", self.clock(), start=0, num=limit)

    def pending_runs(self) -> list[str]:
        return self.r.zrange(self.k("outbox", "runs"), 0, -1)

    def run_delivered(self, run_id: str, gen: int) -> bool:
        """Done with ``gen``; the run leaves the queue unless a newer view was wanted meanwhile."""
        key = self.k("outbox", "run", run_id)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"delivered": gen, "attempts": 0, "error": ""})
        pipe.hget(key, "gen")
        current = int(pipe.execute()[1] or 0)
        if current <= gen:
            pipe = self.r.pipeline()
            pipe.zrem(self.k("outbox", "runs"), run_id)
            self._settled(pipe, f"run:{run_id}")
            pipe.execute()
            return True
        return False

    def defer_run(self, run_id: str, seconds: float) -> None:
        """Come back later (a throttled update, someone else posting): not a failure."""
        self.r.zadd(self.k("outbox", "runs"), {run_id: self.clock() + seconds})

    def retry_run(self, run_id: str, error: str, retry_after: float | None = None) -> None:
        """Slack refused this run's message: try it again after a backoff (until the give-up time)."""
        key = self.k("outbox", "run", run_id)
        attempts = int(self.r.hincrby(key, "attempts", 1))
        self.r.hset(key, "error", error[:500])
        self.defer_run(run_id, self._wait(attempts, retry_after))

    def part_done(self, run_id: str, part: str) -> bool:
        return bool(self.r.exists(self.k("outbox", "part", run_id, part)))

    def mark_part(self, run_id: str, part: str, value: str = "1") -> None:
        self.r.set(self.k("outbox", "part", run_id, part), value, ex=ENTRY_TTL)

    # ---- other messages -------------------------------------------------------------

    def put(self, kind: str, payload: dict, key: str | None = None) -> str | None:
        """Queue a message; with ``key`` only the first put of that key counts (None after)."""
        msg_id = key or f"m-{secrets.token_hex(6)}"
        hkey = self.k("outbox", "msg", msg_id)
        if not self.r.hsetnx(hkey, "kind", kind):
            return None
        pipe = self.r.pipeline()
        pipe.hset(hkey, mapping={"payload": json.dumps(payload, default=str), "attempts": 0})
        pipe.expire(hkey, ENTRY_TTL)
        pipe.zadd(self.k("outbox", "msgs"), {msg_id: self.clock()})
        self._owe(pipe, f"msg:{msg_id}")
        pipe.execute()
        return msg_id

    def message(self, msg_id: str) -> dict | None:
        """An owed message's {kind, payload}; None (and it leaves the queue) once sent or gone."""
        h = self.r.hgetall(self.k("outbox", "msg", msg_id))
        if not h or "sent_at" in h:
            self._forget_message(msg_id)
            return None
        return {"kind": h["kind"], "payload": json.loads(h.get("payload") or "{}")}

    def message_done(self, msg_id: str) -> None:
        self.r.hset(self.k("outbox", "msg", msg_id), "sent_at", self.clock())
        self._forget_message(msg_id)

    def _forget_message(self, msg_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.zrem(self.k("outbox", "msgs"), msg_id)
        self._settled(pipe, f"msg:{msg_id}")
        pipe.execute()

    def retry_message(self, msg_id: str, error: str, retry_after: float | None = None) -> None:
        hkey = self.k("outbox", "msg", msg_id)
        attempts = int(self.r.hincrby(hkey, "attempts", 1))
        self.r.hset(hkey, "error", error[:500])
        self.r.zadd(self.k("outbox", "msgs"), {msg_id: self.clock() + self._wait(attempts, retry_after)})

    def _wait(self, attempts: int, retry_after: float | None) -> float:
        # Retry-After is Slack's own figure (real seconds), only capped.
        return min(retry_after, self.max_backoff) if retry_after is not None else self.backoff(attempts)

    # ---- the order of delivery ---------------------------------------------------------

    def due(self, limit: int = 50) -> list[tuple[str, str]]:
        """What is due now, as ("run" | "msg", id), oldest owed first."""
        runs = self.due_runs(limit)
        msgs = self.r.zrangebyscore(self.k("outbox", "msgs"), "-inf", self.clock(), start=0, num=limit)
        members = [f"run:{r}" for r in runs] + [f"msg:{m}" for m in msgs]
        if not members:
            return []
        owed = self.r.zmscore(self.k("outbox", "owed"), members)
        seqs = self.r.hmget(self.k("outbox", "owed_seq"), members)
        now = self.clock()
        missing = {m: now for m, since in zip(members, owed, strict=True) if since is None}
        if missing:   # queued before this key existed: owed from now on
            self.r.zadd(self.k("outbox", "owed"), missing, nx=True)
        order = sorted(zip(members, owed, seqs, strict=True),
                       key=lambda p: (p[1] if p[1] is not None else now, int(p[2] or 0), p[0]))
        return [tuple(m.split(":", 1)) for m, _, _ in order][:limit]

    def pending_count(self) -> int:
        return int(self.r.zcard(self.k("outbox", "owed")))

    def oldest_age(self) -> float:
        """Seconds since the oldest message still owed was first owed (0 when none)."""
        oldest = self.r.zrange(self.k("outbox", "owed"), 0, 0, withscores=True)
        return max(0.0, self.clock() - oldest[0][1]) if oldest else 0.0

    # ---- Slack unavailable: one pause shared by every replica -------------------------

    def slack_unavailable(self, error: str, retry_after: float | None = None) -> float:
        """Slack did not answer (5xx, 429, network): pause every delivery; returns the pause."""
        key = self.k("outbox", "slack")
        pipe = self.r.pipeline()
        pipe.hincrby(key, "failures", 1)
        pipe.hsetnx(key, "since", self.clock())
        failures = int(pipe.execute()[0])
        wait = self._wait(failures, retry_after)
        self.r.hset(key, mapping={"until": self.clock() + wait, "error": error[:300]})
        log.warning("Slack is unavailable (%s, %d tries in a row); delivery paused %.1f s, %d messages owed",
                    error, failures, wait, self.pending_count())
        return wait

    def slack_answered(self) -> None:
        """A call went through: end the pause (if there was one)."""
        if self.r.delete(self.k("outbox", "slack")):
            log.info("Slack answers again; delivering the %d messages owed", self.pending_count())

    def paused(self) -> bool:
        until = self.r.hget(self.k("outbox", "slack"), "until")
        return until is not None and float(until) > self.clock()

    def slack_outage(self) -> dict:
        """{until, failures, since, error} while Slack is (or was last seen) unavailable; {} when fine."""
        return self.r.hgetall(self.k("outbox", "slack"))

    # ---- what could not be delivered ------------------------------------------------

    def give_up_overdue(self) -> int:
        """Everything owed longer than the give-up time: logged and kept for /ct status."""
        cutoff = self.clock() - self.give_up_seconds
        n = 0
        for member, since in self.r.zrangebyscore(self.k("outbox", "owed"), "-inf", cutoff, withscores=True):
            if not self.r.zrem(self.k("outbox", "owed"), member):
                continue   # another replica gave it up
            self.r.hdel(self.k("outbox", "owed_seq"), member)
            kind, ident = member.split(":", 1)
            if kind == "run":
                self.r.zrem(self.k("outbox", "runs"), ident)
                entry = self.run_entry(ident)
                what, detail = f"run {ident}", ""
            else:
                self.r.zrem(self.k("outbox", "msgs"), ident)
                entry = self.r.hgetall(self.k("outbox", "msg", ident))
                what = f"message {ident}"
                detail = str(json.loads(entry.get("payload") or "{}").get("text") or entry.get("kind") or "")
            error = entry.get("error") or self.slack_outage().get("error") or "Slack unavailable"
            self.record_failure(what, error, owed_since=since, attempts=int(entry.get("attempts") or 0),
                                detail=detail)
            n += 1
        return n

    def record_failure(self, what: str, error: str, *, owed_since: float | None = None, attempts: int = 0,
                       detail: str = "") -> None:
        hours = (self.clock() - owed_since) * self.time_scale / 3600 if owed_since else 0.0
        log.error("gave up delivering %s to Slack after %.1f h (%d refusals of its own): %s%s", what, hours,
                  attempts, error, f"; it said: {detail[:200]}" if detail else "")
        self.r.lpush(self.k("outbox", "failed"), json.dumps({"what": what, "error": error[:300], "at": self.clock(),
                                                            "owed_since": owed_since, "detail": detail[:300]}))
        self.r.ltrim(self.k("outbox", "failed"), 0, FAILED_KEEP - 1)

    def failures(self, n: int = 5) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.k("outbox", "failed"), 0, n - 1)]


class OutboxNotifier:
    """The Notifier the service and the scheduler hold: it records, then asks the
    deliverer (if any) to send what is due right away, oldest first. Whatever isn't
    sent now is sent by the deliverer's periodic drain, here or on another replica."""

    def __init__(self, outbox: Outbox, deliverer=None):
        self.outbox = outbox
        self.deliverer = deliverer

    def _kick(self) -> None:
        if self.deliverer is not None:
            try:
                self.deliverer.drain()
            except Exception:  # recorded: the drain retries it
                log.warning("immediate delivery failed; the outbox retries it", exc_info=True)

    def run_started(self, run) -> None:
        self.outbox.want_run(run.run_id)
        self._kick()

    def run_progress(self, run, steps=None) -> None:
        self.outbox.want_run(run.run_id)
        self._kick()

    def run_finished(self, run, report=None, confusion_png=None) -> None:
        """Called before the run is marked final: the deliverer holds this entry until the
        record says final, so a crash in between can't lose the report."""
        self.outbox.want_run(run.run_id, final=True)

    def new_data(self, found, alert_id: str) -> None:
        self.outbox.put("new_data", {"alert_id": alert_id, "found": dataclasses.asdict(found)},
                        key=f"alert-{alert_id}")
        self._kick()

    def say(self, text: str, key: str | None = None) -> None:
        self.outbox.put("say", {"text": text}, key=f"say-{key}" if key else None)
        self._kick()

    def fire_failed(self, fire_id: str, text: str) -> None:
        self.outbox.put("fire_failed", {"fire_id": fire_id, "text": text})
        self._kick()
