"""What ctbot owes Slack, kept in Redis until Slack has it.

A state change (a run started, progressed or ended; an alert; an announcement) is done
only once the message it owes is recorded here. A deliverer (bot.delivery) sends it,
from any replica, after restarts too, with retries; what cannot be delivered within the
retry budget is recorded as a failure that `/ct status` shows and the log names once.

Runs are tracked by the *latest wanted view*, not a queue of updates: a throttled or
failed progress update is simply delivered later with whatever the run looks like then.
Other messages are a queue of their own, each delivered once.

Keys (prefix ct:): outbox:runs (ZSET run_id -> due time), outbox:run:<id> (HASH gen,
delivered, attempts, error), outbox:part:<id>:<part> (a run's thread parts sent),
outbox:msgs (ZSET id -> due), outbox:msg:<id> (HASH), outbox:failed (LIST, newest first).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time

log = logging.getLogger("ctbot.outbox")

MAX_ATTEMPTS = 8          # 2 s doubling to ~4 min between tries: ~8 min of trying in all
FAILED_KEEP = 50
ENTRY_TTL = 30 * 24 * 3600


class Outbox:
    def __init__(self, state, clock=time.time):
        self.state, self.r, self.clock = state, state.r, clock

    def k(self, *parts: str) -> str:
        return self.state.k(*parts)

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
            self.r.zrem(self.k("outbox", "runs"), run_id)
            return True
        return False

    def defer_run(self, run_id: str, seconds: float) -> None:
        """Come back later (a throttled update, someone else posting): not a failure."""
        self.r.zadd(self.k("outbox", "runs"), {run_id: self.clock() + seconds})

    def retry_run(self, run_id: str, error: str, retry_after: float | None = None) -> bool:
        """A failed try. False (and a recorded failure) when the budget is spent."""
        key = self.k("outbox", "run", run_id)
        attempts = int(self.r.hincrby(key, "attempts", 1))
        self.r.hset(key, "error", error[:500])
        if attempts >= MAX_ATTEMPTS:
            self.r.zrem(self.k("outbox", "runs"), run_id)
            self.record_failure(f"run {run_id}", error)
            return False
        self.defer_run(run_id, retry_after if retry_after is not None else backoff(attempts))
        return True

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
        pipe.execute()
        return msg_id

    def due_messages(self, limit: int = 50) -> list[tuple[str, str, dict]]:
        out = []
        for msg_id in self.r.zrangebyscore(self.k("outbox", "msgs"), "-inf", self.clock(), start=0, num=limit):
            h = self.r.hgetall(self.k("outbox", "msg", msg_id))
            if not h or "sent_at" in h:
                self.r.zrem(self.k("outbox", "msgs"), msg_id)
                continue
            out.append((msg_id, h["kind"], json.loads(h.get("payload") or "{}")))
        return out

    def message_sent(self, msg_id: str) -> bool:
        return bool(self.r.hexists(self.k("outbox", "msg", msg_id), "sent_at"))

    def message_done(self, msg_id: str) -> None:
        self.r.zrem(self.k("outbox", "msgs"), msg_id)
        self.r.hset(self.k("outbox", "msg", msg_id), "sent_at", self.clock())

    def retry_message(self, msg_id: str, error: str, retry_after: float | None = None) -> bool:
        hkey = self.k("outbox", "msg", msg_id)
        attempts = int(self.r.hincrby(hkey, "attempts", 1))
        if attempts >= MAX_ATTEMPTS:
            self.r.zrem(self.k("outbox", "msgs"), msg_id)
            self.record_failure(f"message {msg_id}", error)
            return False
        self.r.zadd(self.k("outbox", "msgs"),
                    {msg_id: self.clock() + (retry_after if retry_after is not None else backoff(attempts))})
        return True

    # ---- what could not be delivered ------------------------------------------------

    def record_failure(self, what: str, error: str) -> None:
        log.error("could not deliver %s to Slack after %d tries: %s", what, MAX_ATTEMPTS, error)
        self.r.lpush(self.k("outbox", "failed"), json.dumps({"what": what, "error": error[:300],
                                                            "at": self.clock()}))
        self.r.ltrim(self.k("outbox", "failed"), 0, FAILED_KEEP - 1)

    def failures(self, n: int = 5) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.k("outbox", "failed"), 0, n - 1)]


def backoff(attempts: int) -> float:
    return min(2.0 * 2 ** max(attempts - 1, 0), 240.0)


class OutboxNotifier:
    """The Notifier the service and the scheduler hold: it records, then asks the
    deliverer (if any) to send right away. Whatever isn't sent now is sent by the
    deliverer's periodic drain, here or on another replica."""

    def __init__(self, outbox: Outbox, deliverer=None):
        self.outbox = outbox
        self.deliverer = deliverer

    def _kick_run(self, run_id: str) -> None:
        if self.deliverer is not None:
            try:
                self.deliverer.deliver_run(run_id)
            except Exception:  # recorded: the drain retries it
                log.warning("immediate delivery for run %s failed; the outbox retries it", run_id,
                            exc_info=True)

    def _kick_messages(self) -> None:
        if self.deliverer is not None:
            try:
                self.deliverer.deliver_messages()
            except Exception:
                log.warning("immediate delivery failed; the outbox retries it", exc_info=True)

    def run_started(self, run) -> None:
        self.outbox.want_run(run.run_id)
        self._kick_run(run.run_id)

    def run_progress(self, run, steps=None) -> None:
        self.outbox.want_run(run.run_id)
        self._kick_run(run.run_id)

    def run_finished(self, run, report=None, confusion_png=None) -> None:
        """Called before the run is marked final: the deliverer holds this entry until the
        record says final, so a crash in between can't lose the report."""
        self.outbox.want_run(run.run_id, final=True)

    def new_data(self, found, alert_id: str) -> None:
        self.outbox.put("new_data", {"alert_id": alert_id, "found": dataclasses.asdict(found)},
                        key=f"alert-{alert_id}")
        self._kick_messages()

    def say(self, text: str) -> None:
        self.outbox.put("say", {"text": text})
        self._kick_messages()

    def fire_failed(self, fire_id: str, text: str) -> None:
        self.outbox.put("fire_failed", {"fire_id": fire_id, "text": text})
        self._kick_messages()
