"""Everything ctbot keeps in Redis (see docs/architecture.md, "Redis keys").

The Redis client is built in entry points and passed in, so importing this module
opens no connection. It must be created with decode_responses=True.
"""
from __future__ import annotations

import json
import time
from collections import deque

from core.state_watch import WatchState, iso_time
from core.types import RunRecord

# Compare-and-delete / compare-and-expire: only the holder may release or extend a lock.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Record an accepted command whole or not at all, and only before ARGV[3] (Redis's clock):
# a call that reached a hung Redis after the ack gave up (and told the user nothing was
# changed) must not record the command later, when Redis wakes, to be resumed and run.
_ACCEPT = """
local now = redis.call('TIME')
if tonumber(now[1]) + tonumber(now[2]) / 1000000 > tonumber(ARGV[3]) then return -1 end
if redis.call('HSETNX', KEYS[1], 'payload', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'accepted_at', ARGV[2], 'state', 'accepted')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
return 1
"""

AUDIT_MAXLEN = 10_000
ACK_TIMEOUT = 0.3       # seconds; Redis calls on the ack path and the readiness ping
CLOCK_SAMPLES = 32      # pings whose fastest round trip sets the clock offset
TIMEOUT = 5.0           # every other Redis call


def clock_offset(samples) -> float:
    """Redis's clock minus ours from (round trip, midpoint offset) samples. A sample is off
    by up to half its round trip, and a busy machine makes some slow: with the latest
    sample, the deadline could move by up to 0.15 s (half the ping's timeout), leaving a
    command 0.05 s. The fastest recent sample is used: off by a fraction of a millisecond
    on one host or a LAN, well inside the deadline's margin."""
    return min(samples)[1]


def _short_timeout_client(client, timeout: float):
    """A client to the same Redis that waits at most ``timeout`` and never retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs, socket_timeout=timeout, socket_connect_timeout=timeout,
                  retry=Retry(NoBackoff(), 0))
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


class StateStore(WatchState):
    def __init__(self, redis_client, prefix: str = "ct:", clock=time.time,
                 audit_maxlen: int = AUDIT_MAXLEN, ack_timeout: float = ACK_TIMEOUT):
        kwargs = getattr(getattr(redis_client, "connection_pool", None), "connection_kwargs", {})
        if not kwargs.get("decode_responses"):
            raise ValueError("StateStore needs a Redis client created with decode_responses=True")
        self.r = redis_client
        self.prefix = prefix
        self.clock = clock
        self.audit_maxlen = audit_maxlen
        self.ack_timeout = ack_timeout
        self.fast = _short_timeout_client(redis_client, ack_timeout)   # the ack path's: one try, short wait
        self._clock_offset = 0.0      # Redis's clock minus ours, measured by ping()
        self._clock_samples: deque[tuple[float, float]] = deque(maxlen=CLOCK_SAMPLES)
        self._release = self.r.register_script(_RELEASE)
        self._refresh = self.r.register_script(_REFRESH)
        self._accept = self.fast.register_script(_ACCEPT)
        self._accept_loaded = False

    def ping(self) -> None:
        """Raises unless Redis answers within the ack timeout; also measures how far
        Redis's clock is from ours (accept_command's deadline is in Redis's)."""
        if not self._accept_loaded:
            # Loaded here, not on the first command: a NOSCRIPT round trip would come out
            # of that ack's short budget. (After a Redis restart redis-py loads it again.)
            self.fast.script_load(_ACCEPT)
            self._accept_loaded = True
        t0 = time.time()
        sec, usec = self.fast.time()
        t1 = time.time()
        self._clock_samples.append((t1 - t0, sec + usec / 1e6 - (t0 + t1) / 2))
        self._clock_offset = clock_offset(self._clock_samples)

    @classmethod
    def from_url(cls, url: str, prefix: str = "ct:", timeout: float = TIMEOUT, **kwargs) -> StateStore:
        import redis
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout,
                                      socket_connect_timeout=timeout)
        return cls(client, prefix=prefix, **kwargs)

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ---- runs ----------------------------------------------------------------------

    def create_run(self, run: RunRecord) -> bool:
        """Store a new run; False when the id is already taken (ids must be unique)."""
        if not self.r.set(self.k("run", run.run_id), json.dumps(run.to_dict()), nx=True):
            return False
        self._index_run(run)
        return True

    def save_run(self, run: RunRecord) -> None:
        self.r.set(self.k("run", run.run_id), json.dumps(run.to_dict()))
        self._index_run(run)

    def _index_run(self, run: RunRecord) -> None:
        # ct:active (a SET of active run ids) lets the run watch cost O(active runs).
        p = self.r.pipeline()
        p.zadd(self.k("runs"), {run.run_id: run.created_at})
        if run.active:
            p.sadd(self.k("active"), run.run_id)
        else:
            p.srem(self.k("active"), run.run_id)
        p.execute()

    def get_run(self, run_id: str) -> RunRecord | None:
        raw = self.r.get(self.k("run", run_id))
        return RunRecord.from_dict(json.loads(raw)) if raw else None

    def update_run(self, run_id: str, only_if_active: bool = False, **fields) -> RunRecord | None:
        """Change some fields of a run without losing a concurrent writer's other fields
        (optimistic WATCH/MULTI). Returns the new record; None if the run doesn't exist,
        or if only_if_active and it has already finished."""
        from redis.exceptions import WatchError
        key = self.k("run", run_id)
        while True:
            with self.r.pipeline() as p:
                try:
                    p.watch(key)
                    raw = p.get(key)
                    if not raw:
                        return None
                    run = RunRecord.from_dict(json.loads(raw))
                    if only_if_active and not run.active:
                        return None
                    for name, value in fields.items():
                        if name not in RunRecord.__dataclass_fields__:
                            raise AttributeError(f"RunRecord has no field {name!r}")
                        setattr(run, name, value)
                    p.multi()
                    p.set(key, json.dumps(run.to_dict()))
                    p.zadd(self.k("runs"), {run.run_id: run.created_at})
                    (p.sadd if run.active else p.srem)(self.k("active"), run.run_id)
                    p.execute()
                    return run
                except WatchError:
                    continue

    def list_runs(self, n: int = 10, offset: int = 0) -> list[RunRecord]:
        """Newest first."""
        ids = self.r.zrevrange(self.k("runs"), offset, offset + n - 1)
        if not ids:
            return []
        raws = self.r.mget([self.k("run", i) for i in ids])
        return [RunRecord.from_dict(json.loads(x)) for x in raws if x]

    def active_run_ids(self) -> list[str]:
        return sorted(self.r.smembers(self.k("active")))

    # ---- the one-active-run-per-model lock -------------------------------------------

    def acquire_lock(self, model: str, run_id: str, ttl: float) -> bool:
        return bool(self.r.set(self.k("lock", model), run_id, nx=True, px=int(ttl * 1000)))

    def take_over_lock(self, model: str, run_id: str, ttl: float) -> None:
        """Unconditional: a forced run becomes the model's active run."""
        self.r.set(self.k("lock", model), run_id, px=int(ttl * 1000))

    def release_lock(self, model: str, run_id: str) -> bool:
        """Release only if run_id holds the lock; a stale caller can't free another run's lock."""
        return bool(self._release(keys=[self.k("lock", model)], args=[run_id]))

    def refresh_lock(self, model: str, run_id: str, ttl: float) -> bool:
        return bool(self._refresh(keys=[self.k("lock", model)], args=[run_id, int(ttl * 1000)]))

    def lock_holder(self, model: str) -> str | None:
        return self.r.get(self.k("lock", model))

    # ---- once / dedupe markers --------------------------------------------------------

    def once(self, key: str, ttl: float, value: str = "1") -> bool:
        """True for the first caller of ``key`` (e.g. "fire:weekly:2026-W47") within ttl,
        False for everyone after: exactly-once across replicas with SET NX."""
        return bool(self.r.set(self.prefix + key, value, nx=True, px=int(ttl * 1000)))

    def marker(self, key: str) -> str | None:
        """The value a once() call stored, or None."""
        return self.r.get(self.prefix + key)

    def set_marker(self, key: str, value: str) -> None:
        """Overwrite a once() marker's value, keeping its expiry."""
        self.r.set(self.prefix + key, value, keepttl=True)

    def put_marker(self, key: str, value: str, ttl: float) -> None:
        self.r.set(self.prefix + key, value, px=int(ttl * 1000))

    def hold(self, key: str, ttl: float) -> None:
        """Keep a once() marker for ``ttl`` from now (e.g. make a short claim lasting)."""
        self.r.pexpire(self.prefix + key, int(ttl * 1000))

    def swap_marker(self, key: str, value: str, ttl: float) -> str | None:
        """Set a marker; returns its previous value."""
        return self.r.set(self.prefix + key, value, px=int(ttl * 1000), get=True)

    def forget(self, key: str) -> None:
        self.r.delete(self.prefix + key)

    # ---- accepted commands and button effects ---------------------------------------

    def accept_command(self, cmd_id: str, payload: dict, ttl: float) -> bool:
        """Record a command before its ack promises anything; False when it was already
        accepted (a retry of the same request). On the ack path: each try within the ack
        timeout, all or nothing; a redis TimeoutError or ConnectionError means nothing
        was recorded, nor will be (the script refuses to run past its deadline)."""
        import redis
        # Redis answered "too late" means it is up and we were slow (a busy machine paused
        # us): one more try with a fresh deadline still answers within 2 × ack_timeout.
        for _ in range(2):
            done = self._accept_before_deadline(cmd_id, payload, ttl)
            if done != -1:
                return bool(done)
        raise redis.TimeoutError("Redis ran the command's record after its deadline; nothing was recorded")

    def _accept_before_deadline(self, cmd_id: str, payload: dict, ttl: float) -> int:
        # The deadline sits a margin before our own timeout, in Redis's clock.
        margin = min(0.1, self.ack_timeout / 3)
        deadline = time.time() + self._clock_offset + self.ack_timeout - margin
        return self._accept(keys=[self.k("cmd", cmd_id), self.k("cmds")],
                            args=[json.dumps(payload), self.clock(), f"{deadline:.6f}", int(ttl), cmd_id])

    def command(self, cmd_id: str) -> dict:
        h = self.r.hgetall(self.k("cmd", cmd_id))
        if "payload" in h:
            h["payload"] = json.loads(h["payload"])
        return h

    def update_command(self, cmd_id: str, **fields) -> None:
        self.r.hset(self.k("cmd", cmd_id), mapping={k: json.dumps(v) if isinstance(v, dict) else v
                                                    for k, v in fields.items()})

    def finish_command(self, cmd_id: str) -> None:
        self.r.zrem(self.k("cmds"), cmd_id)
        self.r.hset(self.k("cmd", cmd_id), "state", "done")

    def open_commands(self, older_than: float) -> list[str]:
        """Accepted, not finished, and accepted more than ``older_than`` seconds ago."""
        return self.r.zrangebyscore(self.k("cmds"), "-inf", self.clock() - older_than)

    def claim_effect(self, key: str, who: str, ttl: float) -> dict | None:
        """The first caller owns ``key`` (None); later callers get {by, outcome, at}."""
        full = self.k("effect", key)
        mine = json.dumps({"by": who, "outcome": "", "at": self.clock()})
        if self.r.set(full, mine, nx=True, px=int(ttl * 1000)):
            return None
        raw = self.r.get(full)
        return json.loads(raw) if raw else {"by": "", "outcome": "", "at": 0}

    def settle_effect(self, key: str, who: str, outcome: str, ttl: float) -> None:
        self.r.set(self.k("effect", key), json.dumps({"by": who, "outcome": outcome, "at": self.clock()}),
                   px=int(ttl * 1000))

    def release_effect(self, key: str) -> None:
        self.r.delete(self.k("effect", key))

    # ---- schedule ---------------------------------------------------------------------

    def schedule_paused(self) -> bool:
        return self.r.get(self.k("schedule", "paused")) == "1"

    def set_schedule_paused(self, paused: bool) -> None:
        if paused:
            self.r.set(self.k("schedule", "paused"), "1")
        else:
            self.r.delete(self.k("schedule", "paused"))

    # ---- audit trail ------------------------------------------------------------------

    def audit(self, action: str, who: str, **fields) -> str:
        """Append to the audit stream: who did what, when. Values are stored as strings
        (JSON for non-strings)."""
        return self._audit(self.r, action, who, fields)

    def audit_quick(self, action: str, who: str, **fields) -> str:
        """``audit`` for the ack path: one try within the ack timeout."""
        return self._audit(self.fast, action, who, fields)

    def _audit(self, client, action: str, who: str, fields: dict) -> str:
        entry = {"action": action, "who": str(who or ""), "at": iso_time(self.clock())}
        for where in ("channel", "team"):   # an Actor (core.access) knows where it asked from
            if getattr(who, where, ""):
                entry[where] = getattr(who, where)
        for k, v in fields.items():
            if v is not None:
                entry[k] = v if isinstance(v, str) else json.dumps(v, default=str)
        return client.xadd(self.k("audit"), entry, maxlen=self.audit_maxlen, approximate=True)

    def read_audit(self, n: int = 20) -> list[dict]:
        """Newest first; each entry is its fields plus "id"."""
        return [{"id": i, **f} for i, f in self.r.xrevrange(self.k("audit"), count=n)]
