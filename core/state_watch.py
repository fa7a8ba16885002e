"""The data watch's state in Redis: the bucket cursor (with its tail of recent keys)
and the data that arrived since the last successful training.

A mixin of core.state.StateStore, whose Redis client (``self.r``) and key prefix
(``self.k``) it uses; split out so each state module stays small."""
from __future__ import annotations

import json
from datetime import UTC, datetime

PENDING_MAX_BATCHES = 500


def iso_time(ts: float) -> str:
    """An epoch time as ISO 8601 in UTC, as audit entries and data batches keep it."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


class WatchState:
    # ---- data-watch cursor ------------------------------------------------------------

    def get_cursor(self, prefix: str) -> dict | None:
        raw = self.r.get(self.k("cursor", prefix))
        return json.loads(raw) if raw else None

    def set_cursor(self, prefix: str, cursor: dict) -> None:
        self.r.set(self.k("cursor", prefix), json.dumps(cursor))

    def cursor_hash(self, prefix: str, name: str) -> dict:
        """A companion hash of the cursor (the watcher keeps "tail" and "waiting" here)."""
        return self.r.hgetall(self.k("cursor", prefix, name))

    def commit_watch(self, prefix: str, cursor: dict, *, tail: dict, replace_tail: bool,
                     waiting: dict, pending_objects: int = 0, pending_bytes: int = 0,
                     pending_counts: dict | None = None) -> None:
        """Save one data-watch tick atomically: cursor, its hashes and the pending summary.
        Either all of it lands or none, so a crash can't count the same objects twice."""
        from redis.exceptions import WatchError
        cur_key, pend_key = self.k("cursor", prefix), self.k("pending")
        tail_key, wait_key = self.k("cursor", prefix, "tail"), self.k("cursor", prefix, "waiting")
        while True:
            with self.r.pipeline() as p:
                try:
                    p.watch(pend_key)
                    pending = json.loads(p.get(pend_key) or "{}")
                    if pending_objects:
                        pending = _add_batch(pending, self.clock(), pending_objects, pending_bytes,
                                             pending_counts)
                    p.multi()
                    p.set(cur_key, json.dumps(cursor))
                    if replace_tail:
                        p.delete(tail_key)
                    if tail:
                        p.hset(tail_key, mapping=tail)
                    p.delete(wait_key)
                    if waiting:
                        p.hset(wait_key, mapping=waiting)
                    if pending_objects:
                        p.set(pend_key, json.dumps(pending))
                    p.execute()
                    return
                except WatchError:
                    continue

    def reset_cursor(self, prefix: str) -> None:
        self.r.delete(self.k("cursor", prefix), self.k("cursor", prefix, "tail"),
                      self.k("cursor", prefix, "waiting"))

    # ---- pending data (arrived since the last successful training) ----------------------

    def pending(self) -> dict:
        """{objects, bytes, since} where since is an ISO time or None."""
        raw = json.loads(self.r.get(self.k("pending")) or "{}")
        return {"objects": raw.get("objects", 0), "bytes": raw.get("bytes", 0),
                "since": raw.get("since"), "counts": raw.get("counts", {})}

    def add_pending(self, objects: int, nbytes: int, counts: dict | None = None) -> None:
        self._update_pending(lambda p: _add_batch(p, self.clock(), objects, nbytes, counts))

    def clear_pending(self, upto: float | None = None) -> None:
        """Forget data seen up to ``upto`` (epoch seconds; None = everything). Batches that
        arrived after a run took its data snapshot stay pending."""
        def drop(p):
            kept = [b for b in p.get("batches", []) if upto is not None and b["at"] > upto]
            return _summarise(kept)
        self._update_pending(drop)

    def _update_pending(self, fn) -> None:
        from redis.exceptions import WatchError
        key = self.k("pending")
        while True:
            with self.r.pipeline() as p:
                try:
                    p.watch(key)
                    new = fn(json.loads(p.get(key) or "{}"))
                    p.multi()
                    p.set(key, json.dumps(new))
                    p.execute()
                    return
                except WatchError:
                    continue


def _add_batch(pending: dict, at: float, objects: int, nbytes: int,
               counts: dict | None = None) -> dict:
    """Pending data is a list of per-tick batches, so that a finished run can clear
    exactly the batches that arrived before its data snapshot."""
    batch = {"at": at, "objects": objects, "bytes": nbytes, "counts": dict(counts or {})}
    batches = list(pending.get("batches", [])) + [batch]
    if len(batches) > PENDING_MAX_BATCHES:
        # Merge the oldest two under the later time: a run then clears them a little
        # late rather than too early.
        a, b = batches[0], batches[1]
        batches[:2] = [{"at": b["at"], "first": a.get("first", a["at"]),
                        "objects": a["objects"] + b["objects"], "bytes": a["bytes"] + b["bytes"],
                        "counts": _sum_counts([a, b])}]
    return _summarise(batches)


def _sum_counts(batches: list) -> dict:
    out: dict = {}
    for b in batches:
        for label, n in (b.get("counts") or {}).items():
            out[label] = out.get(label, 0) + n
    return out


def _summarise(batches: list) -> dict:
    return {"objects": sum(b["objects"] for b in batches),
            "bytes": sum(b["bytes"] for b in batches),
            "since": iso_time(min(b.get("first", b["at"]) for b in batches)) if batches else None,
            "counts": _sum_counts(batches),
            "batches": batches}
