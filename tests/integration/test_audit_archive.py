"""The audit archive (core/audit.py) against a real redis-server and the local S3 server:
batches are written once each whatever crashes or races, and queries reach past the
stream's cap."""
from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from core.audit import AuditArchive, matches, parse_since
from core.state import StateStore
from steps import layout


@pytest.fixture
def state(redis_url):
    return StateStore.from_url(redis_url, audit_maxlen=100)   # a small cap keeps the test quick


def ids_in_store(archive) -> list[str]:
    return [e["id"] for e in archive.archived_all()]


def test_entries_are_archived_once_in_batches_under_their_day(state, s3_store):
    archive = AuditArchive(state, s3_store, batch=20)
    written = [state.audit("promote", "U0ALICE01", run_id=f"r-{i}", version=i) for i in range(50)]
    assert archive.archive() == 50 and archive.cursor() == written[-1]
    assert archive.archive() == 0                                   # nothing new: nothing written
    keys = [o.key for o in s3_store.list(layout.AUDIT_PREFIX)]
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    assert len(keys) == 3 and all(k.startswith(f"audit/{day}/") and k.endswith(".jsonl") for k in keys)
    assert ids_in_store(archive) == written
    (first,) = [e for e in archive.archived_all() if e["id"] == written[0]]
    assert first["action"] == "promote" and first["who"] == "U0ALICE01" and first["run_id"] == "r-0"


def test_a_crash_before_the_cursor_moved_does_not_write_twice(state, s3_store):
    archive = AuditArchive(state, s3_store, batch=10)
    written = [state.audit("tick", "scheduler", i=i) for i in range(10)]
    archive.archive()
    state.r.delete(archive.cursor_key)            # as if the archiver died right after its put
    written += [state.audit("tick", "scheduler", i=i) for i in range(10, 15)]
    archive.archive()
    assert ids_in_store(archive) == written       # the first batch adopted, not rewritten; the rest once


def test_two_archivers_at_once_write_each_entry_once(state, s3_store, redis_url):
    written = [state.audit("tick", "scheduler", i=i) for i in range(60)]
    archivers = [AuditArchive(StateStore.from_url(redis_url), s3_store, batch=7) for _ in range(2)]
    for a in archivers:   # no lock between them: the conditional writes alone keep it exact
        a.state.acquire_lock = lambda *args: True
        a.state.release_lock = lambda *args: True
    threads = [threading.Thread(target=a.archive, kwargs={"max_batches": 50}) for a in archivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ids_in_store(archivers[0]) == written


def test_query_reads_the_store_for_what_redis_no_longer_holds(state, s3_store):
    archive = AuditArchive(state, s3_store, batch=50)
    refusal = state.audit("refused", "U0MALLORY", requested="deploy", outcome="refused", reason="not on the list")
    state.audit("promote", "U0ALICE01", run_id="r-1", version=1)
    archive.archive()
    for i in range(300):                           # far past the cap of 100, archived as it goes
        state.audit("tick", "scheduler", i=i)
        if i % 50 == 49:
            archive.archive()
    assert state.r.xrange(state.k("audit"), min=refusal, max=refusal) == []
    since = datetime.now(UTC) - timedelta(days=7)
    found = archive.query(since=since, user="U0MALLORY", action="deploy", outcome="refused")
    assert [e["id"] for e in found] == [refusal] and found[0]["reason"] == "not on the list"
    assert [e["run_id"] for e in archive.query(since=since, action="promote", outcome="ok")] == ["r-1"]
    assert len(archive.query(since=since, user="scheduler")) == 300            # each once, store and Redis
    assert len(archive.query(since=since, user="scheduler", limit=5)) == 5
    assert archive.query(user="U0MALLORY") == []   # without --since only Redis is read


def test_entries_trimmed_before_they_were_archived_are_reported(state, s3_store, caplog):
    archive = AuditArchive(state, s3_store, batch=500)
    for i in range(300):                           # the archiver far behind: Redis trimmed some first
        state.audit("tick", "scheduler", i=i)
    archive.archive()
    assert "trimmed from Redis" in caplog.text and "before they were archived" in caplog.text
    assert ids_in_store(archive) == [i for i, _ in state.r.xrange(state.k("audit"))]


def test_filters_and_since():
    e = {"id": "1700000000000-0", "at": "2026-12-01T09:00:00+00:00", "who": "U1", "action": "refused",
         "requested": "deploy", "outcome": "refused"}
    assert matches(e, action="deploy") and matches(e, action="refused") and not matches(e, action="promote")
    assert matches(e, outcome="refused") and not matches(e, outcome="ok")
    assert matches({**e, "outcome": ""}, outcome="ok")
    assert matches(e, since=datetime(2026, 12, 1, 9, tzinfo=UTC)) and not matches(e, since=datetime(2026, 12, 2,
                                                                                                    tzinfo=UTC))
    now = datetime(2026, 12, 8, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_since("12h", now) == now - timedelta(hours=12)
    assert parse_since("2026-11-30") == datetime(2026, 11, 30, tzinfo=UTC)
    assert parse_since("2026-11-30T09:00+01:00") == datetime(2026, 11, 30, 8, tzinfo=UTC)
    for bad in ("7 days", "last tuesday", "-3d", ""):
        with pytest.raises(ValueError, match="--since"):
            parse_since(bad)
