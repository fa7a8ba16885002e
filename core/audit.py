"""The audit trail that lasts: Redis stream entries archived to the store, and queries
over both.

Every ``StateStore.audit`` entry goes to the Redis stream ct:audit (capped at 10k). The
archiver (a scheduler job on every replica, every ``audit.archive_seconds``) copies what
follows its cursor (ct:audit:archived, the last stream id in the store) to the store as
one JSON-lines object per batch: ``audit/YYYY/MM/DD/<first stream id>.jsonl``.

Why one object per batch, named by its first id, rather than appending to a day file:
with two replicas (or a crash between writing and moving the cursor) the same entries
can be archived twice. A batch always starts right after the cursor, so both tries name
the same object; it is written create-only (``If-None-Match: *``), the loser reads the
winner's object and moves the cursor to its last id. Each entry lands in exactly one
object, no object is ever rewritten (a bug can't truncate a day), and no read-modify-write
of a growing file is needed. A Redis lock keeps the replicas from doing the work twice;
correctness does not depend on it. Readers still drop duplicate ids, should a batch
ever be written after the stream was trimmed under it.

Entries trimmed from Redis before they were archived (the archiver 10k entries behind)
are detected by counting: the stream's entries-added minus its length is how many were
trimmed, ct:audit:archived_count how many the cursor has passed; more trimmed than
passed is logged as an error with the number lost.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

from core import metrics
from steps import layout
from steps.storage import PreconditionFailed

log = logging.getLogger("ctbot.audit")

BATCH = 500
LOCK_SECONDS = 60


def _sid(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _day(stream_id: str) -> str:
    return datetime.fromtimestamp(_sid(stream_id)[0] / 1000, tz=UTC).strftime("%Y/%m/%d")


class AuditArchive:
    def __init__(self, state, store, batch: int = BATCH):
        self.state, self.store, self.batch = state, store, batch
        self.stream, self.cursor_key = state.k("audit"), state.k("audit", "archived")
        self.passed_key = state.k("audit", "archived_count")   # entries the cursor has passed

    def cursor(self) -> str:
        return self.state.r.get(self.cursor_key) or "0-0"

    def archive(self, max_batches: int = 20) -> int:
        """Copy what follows the cursor to the store; returns how many entries were written."""
        token = uuid.uuid4().hex
        if not self.state.acquire_lock("audit:archive", token, LOCK_SECONDS):
            return 0   # another replica is at it
        try:
            n = 0
            for _ in range(max_batches):
                try:
                    wrote = self._one_batch()
                except Exception as e:   # the store or Redis away: the next pass carries on from the cursor
                    log.warning("archiving the audit failed after %d entries; the next pass retries: %s", n, e)
                    metrics.dependency_error(e)
                    break
                if wrote is None:
                    break
                n += wrote
                self.state.refresh_lock("audit:archive", token, LOCK_SECONDS)
            return n
        finally:
            self.state.release_lock("audit:archive", token)

    def _one_batch(self) -> int | None:
        self._check_gap()
        cursor = self.cursor()
        entries = self.state.r.xrange(self.stream, min=f"({cursor}", count=self.batch)
        if not entries:
            return None
        day = _day(entries[0][0])
        entries = [(i, f) for i, f in entries if _day(i) == day]   # a batch stays within its day
        key = layout.audit_batch_key(day, entries[0][0])
        body = "".join(json.dumps({"id": i, **f}, sort_keys=True) + "\n" for i, f in entries)
        try:
            self.store.put_bytes(key, body.encode(), "application/x-ndjson", if_none_match=True)
            last, count, wrote = entries[-1][0], len(entries), len(entries)
        except PreconditionFailed:   # written by another replica, or by a try that died before the cursor moved
            lines = _lines(self.store.get_bytes(key))
            last, count, wrote = lines[-1]["id"], len(lines), 0
        self._advance(last, count)
        return wrote

    def _advance(self, last: str, count: int) -> None:
        """Move the cursor forward to ``last`` and count the ``count`` entries it passed,
        together; never backward (a slower replica's older batch changes nothing)."""
        from redis.exceptions import WatchError
        while True:
            with self.state.r.pipeline() as p:
                try:
                    p.watch(self.cursor_key)
                    if _sid(p.get(self.cursor_key) or "0-0") >= _sid(last):
                        return
                    p.multi()
                    p.set(self.cursor_key, last)
                    p.incrby(self.passed_key, count)
                    p.execute()
                    return
                except WatchError:
                    continue

    def _check_gap(self) -> None:
        """Entries Redis trimmed are fine once archived; more trimmed than archived means
        some never reached the store (the archiver fell that far behind, or the stream is
        older than its archive)."""
        try:
            info = self.state.r.xinfo_stream(self.stream)
        except Exception:   # no stream yet
            return
        trimmed = int(info.get("entries-added") or 0) - int(info.get("length") or 0)
        passed = int(self.state.r.get(self.passed_key) or 0)
        if trimmed > passed:
            log.error("%d audit entries were trimmed from Redis before they were archived (the archive job fell "
                      "behind, or the stream predates the archive); the store lacks them", trimmed - passed)
            self.state.r.incrby(self.passed_key, trimmed - passed)

    # ---- reading --------------------------------------------------------------------

    def archived(self, since: datetime, until: datetime | None = None) -> Iterator[dict]:
        """Archived entries of the days from ``since`` (UTC) to ``until`` (default today), oldest first."""
        day = (since - timedelta(days=1)).date()   # an entry's "at" and its stream id may straddle midnight
        end = (until or datetime.now(UTC)).date()
        while day <= end:
            for obj in sorted(self.store.list(layout.audit_day_prefix(day.strftime("%Y/%m/%d"))),
                              key=lambda o: o.key):
                yield from _lines(self.store.get_bytes(obj.key))
            day += timedelta(days=1)

    def archived_all(self) -> Iterator[dict]:
        """Every archived entry, in stream order."""
        for obj in sorted(self.store.list(layout.AUDIT_PREFIX), key=lambda o: o.key):
            yield from _lines(self.store.get_bytes(obj.key))

    def query(self, *, since: datetime | None = None, user: str = "", action: str = "", outcome: str = "",
              limit: int | None = None) -> list[dict]:
        """Matching entries, oldest first (the newest ``limit`` of them): Redis for what it
        still holds, the store for anything older."""
        recent = [{"id": i, **f} for i, f in self.state.r.xrange(self.stream)]
        older: Iterable[dict] = []
        oldest_held = _sid(recent[0]["id"]) if recent else None
        if since is not None:
            held_from = (datetime.fromtimestamp(oldest_held[0] / 1000, tz=UTC) if oldest_held else None)
            if held_from is None or since < held_from:
                older = (e for e in self.archived(since, held_from)
                         if oldest_held is None or _sid(e["id"]) < oldest_held)
        seen, out = set(), []
        for e in [*older, *recent]:
            if e["id"] in seen or not matches(e, since=since, user=user, action=action, outcome=outcome):
                continue
            seen.add(e["id"])
            out.append(e)
        out.sort(key=lambda e: _sid(e["id"]))
        return out[-limit:] if limit else out


def matches(e: dict, *, since: datetime | None = None, user: str = "", action: str = "", outcome: str = "") -> bool:
    """``action`` matches the entry's action or, for a refusal, the action refused;
    an entry without an outcome succeeded ("ok")."""
    if since is not None and _when(e) < since:
        return False
    if user and e.get("who") != user:
        return False
    if action and action not in (e.get("action"), e.get("requested")):
        return False
    return not outcome or (e.get("outcome") or "ok") == outcome


_AGO = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """"7d", "12h", "30m", "2w" ago, or an ISO date or time (UTC unless it says otherwise)."""
    text = text.strip()
    m = _AGO.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNIT[m[2]]: int(m[1])})
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: use a span such as 7d, 12h, 30m, 2w, or an ISO date or time "
                         "such as 2026-11-30 or 2026-11-30T09:00") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _when(e: dict) -> datetime:
    try:
        t = datetime.fromisoformat(str(e.get("at", "")))
    except ValueError:   # no time recorded: the stream id's
        return datetime.fromtimestamp(_sid(e["id"])[0] / 1000, tz=UTC)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
