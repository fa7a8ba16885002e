"""StateStore against a real redis-server."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from core.state import StateStore
from core.types import RunRecord


@pytest.fixture
def state(redis_url):
    return StateStore.from_url(redis_url)


def run(run_id, created_at, state="queued"):
    return RunRecord(run_id=run_id, model="mnist-arcface", trigger="manual", reason="test",
                     requested_by="U1", state=state, created_at=created_at)


def test_needs_decoded_responses(redis_url):
    with pytest.raises(ValueError, match="decode_responses=True"):
        StateStore(redis.Redis.from_url(redis_url))


def test_keys_follow_the_documented_layout(state, redis_url):
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    state.create_run(run("r-1", 1.0))
    state.acquire_lock("mnist-arcface", "r-1", 60)
    state.set_cursor("data/", {"key": "data/a", "last_modified": None})
    state.once("fire:weekly:2026-W48", 60)
    state.set_schedule_paused(True)
    state.add_pending(2, 10)
    state.audit("train_requested", "U1", run_id="r-1")
    assert {"ct:run:r-1", "ct:runs", "ct:lock:mnist-arcface", "ct:cursor:data/",
            "ct:fire:weekly:2026-W48", "ct:schedule:paused", "ct:pending",
            "ct:audit"} <= set(raw.keys("ct:*"))
    assert raw.get("ct:schedule:paused") == "1"


def test_runs_round_trip_newest_first(state):
    for i, t in enumerate([30.0, 10.0, 20.0]):
        assert state.create_run(run(f"r-{i}", t))
    assert not state.create_run(run("r-0", 99.0)), "a taken id must be refused"
    assert [r.run_id for r in state.list_runs(10)] == ["r-0", "r-2", "r-1"]
    assert [r.run_id for r in state.list_runs(2, offset=1)] == ["r-2", "r-1"]
    got = state.get_run("r-1")
    assert got.created_at == 10.0 and got.requested_by == "U1"
    assert state.get_run("nope") is None


def test_active_set_follows_the_run_state(state):
    state.create_run(run("r-a", 1.0))
    state.create_run(run("r-b", 2.0, state="succeeded"))
    assert state.active_run_ids() == ["r-a"]
    state.update_run("r-a", state="running")
    assert state.active_run_ids() == ["r-a"]
    state.update_run("r-a", state="failed", error="boom")
    assert state.active_run_ids() == []
    assert state.get_run("r-a").error == "boom"


def test_update_run_keeps_concurrent_writers_fields(state):
    state.create_run(run("r-c", 1.0, state="running"))
    errors = []

    def write(field, values):
        try:
            for v in values:
                state.update_run("r-c", **{field: v})
        except Exception as e:  # pragma: no cover - surfaced by the assert
            errors.append(e)

    t1 = threading.Thread(target=write, args=("slack_ts", [f"{i}.0" for i in range(50)]))
    t2 = threading.Thread(target=write, args=("progress", [{"train": f"epoch {i}"} for i in range(50)]))
    t1.start(), t2.start(), t1.join(), t2.join()
    got = state.get_run("r-c")
    assert not errors
    assert got.slack_ts == "49.0" and got.progress == {"train": "epoch 49"}


def test_update_run_only_if_active_and_unknown_fields(state):
    state.create_run(run("r-d", 1.0, state="succeeded"))
    assert state.update_run("r-d", only_if_active=True, state="failed") is None
    assert state.get_run("r-d").state == "succeeded"
    assert state.update_run("missing", state="failed") is None
    with pytest.raises(AttributeError):
        state.update_run("r-d", colour="red")


def test_lock_is_exclusive_and_only_the_holder_releases_it(state):
    assert state.acquire_lock("m", "r-1", 60)
    assert not state.acquire_lock("m", "r-2", 60)
    assert state.lock_holder("m") == "r-1"
    assert not state.release_lock("m", "r-2"), "a non-holder must not free the lock"
    assert not state.refresh_lock("m", "r-2", 60)
    assert state.lock_holder("m") == "r-1"
    assert state.release_lock("m", "r-1")
    assert state.lock_holder("m") is None
    assert state.acquire_lock("m", "r-2", 60)


def test_lock_expires_unless_refreshed(state, redis_url):
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    assert state.acquire_lock("m", "r-1", 0.2)
    assert state.refresh_lock("m", "r-1", 30)
    assert raw.pttl("ct:lock:m") > 20_000
    assert state.acquire_lock("m2", "r-9", 0.05)
    time.sleep(0.2)
    assert state.lock_holder("m2") is None
    assert state.acquire_lock("m2", "r-10", 60)


def test_lock_race_has_one_winner(state):
    winners = []
    barrier = threading.Barrier(8)

    def grab(i):
        barrier.wait()
        if state.acquire_lock("race", f"r-{i}", 60):
            winners.append(i)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(winners) == 1
    assert state.lock_holder("race") == f"r-{winners[0]}"


def test_take_over_lock(state):
    state.acquire_lock("m", "r-old", 60)
    state.take_over_lock("m", "r-new", 60)
    assert state.lock_holder("m") == "r-new"
    assert not state.release_lock("m", "r-old")
    assert state.lock_holder("m") == "r-new"


def test_once_markers(state):
    assert state.once("fire:weekly:2026-W48", 60, value="first")
    assert not state.once("fire:weekly:2026-W48", 60, value="second")
    assert state.marker("fire:weekly:2026-W48") == "first"
    state.set_marker("fire:weekly:2026-W48", "updated")
    assert state.marker("fire:weekly:2026-W48") == "updated"
    assert state.r.pttl("ct:fire:weekly:2026-W48") > 0, "set_marker keeps the expiry"
    state.forget("fire:weekly:2026-W48")
    assert state.once("fire:weekly:2026-W48", 60)


def test_cursor_and_schedule_flag(state):
    assert state.get_cursor("data/") is None
    state.set_cursor("data/", {"key": "data/b.npz", "last_modified": "2026-11-22T09:00:00+00:00"})
    assert state.get_cursor("data/")["key"] == "data/b.npz"
    state.reset_cursor("data/")
    assert state.get_cursor("data/") is None
    assert not state.schedule_paused()
    state.set_schedule_paused(True)
    assert state.schedule_paused()
    state.set_schedule_paused(False)
    assert not state.schedule_paused()


def test_commit_watch_is_one_transaction(state):
    state.commit_watch("data/", {"key": "data/b"}, tail={"data/a": "e1", "data/b": "e2"},
                       replace_tail=True, waiting={"data/b": '{"tag": "e2"}'},
                       pending_objects=2, pending_bytes=300, pending_counts={"3": 2})
    assert state.get_cursor("data/") == {"key": "data/b"}
    assert state.cursor_hash("data/", "tail") == {"data/a": "e1", "data/b": "e2"}
    assert state.cursor_hash("data/", "waiting") == {"data/b": '{"tag": "e2"}'}
    state.commit_watch("data/", {"key": "data/c"}, tail={"data/c": "e3"}, replace_tail=False,
                       waiting={}, pending_objects=1, pending_bytes=5)
    assert state.cursor_hash("data/", "tail") == {"data/a": "e1", "data/b": "e2", "data/c": "e3"}
    assert state.cursor_hash("data/", "waiting") == {}
    p = state.pending()
    assert (p["objects"], p["bytes"], p["counts"]) == (3, 305, {"3": 2})


def test_pending_clears_only_what_a_run_saw(redis_url):
    now = [1000.0]
    state = StateStore.from_url(redis_url, clock=lambda: now[0])
    assert state.pending() == {"objects": 0, "bytes": 0, "since": None, "counts": {}}
    state.add_pending(3, 300, {"1": 3})
    now[0] = 2000.0
    state.add_pending(2, 20)
    p = state.pending()
    assert (p["objects"], p["bytes"]) == (5, 320)
    assert p["since"].startswith("1970-01-01T00:16:40")
    state.clear_pending(upto=1500.0)  # a run that snapshotted its data at t=1500
    p = state.pending()
    assert (p["objects"], p["bytes"], p["counts"]) == (2, 20, {})
    state.clear_pending()
    assert state.pending()["objects"] == 0


def test_audit_stream(state):
    for i in range(5):
        state.audit("promote", f"U{i}", run_id=f"r-{i}", version=i, note=None)
    entries = state.read_audit(3)
    assert [e["who"] for e in entries] == ["U4", "U3", "U2"]
    assert entries[0]["action"] == "promote" and entries[0]["run_id"] == "r-4"
    assert entries[0]["version"] == "4" and "note" not in entries[0]
    assert entries[0]["id"] and entries[0]["at"]


def test_audit_stream_is_capped(redis_url):
    state = StateStore.from_url(redis_url, audit_maxlen=50)  # small cap keeps the test quick
    for i in range(500):
        state.audit("tick", "scheduler", i=i)
    n = state.r.xlen("ct:audit")
    assert 50 <= n < 500  # MAXLEN ~ trims by whole nodes, never below the cap


def test_a_command_is_recorded_whole_once_and_never_after_its_deadline():
    """accept_command on the ack path: all of the record or none of it, False for a
    repeat; and a call that reached Redis while it was stopped (SIGSTOP), so after the
    client gave up, records nothing when Redis wakes and runs it."""
    import os
    import signal

    from devkit.localservices import start_redis
    private = start_redis()      # its own server: this test stops it
    try:
        state = StateStore.from_url(private.url, ack_timeout=0.3)
        state.ping()                                   # measures Redis's clock against ours
        assert state.accept_command("cmd-1", {"text": "status"}, 60) is True     # the script is loaded now
        record = state.command("cmd-1")
        assert record["payload"] == {"text": "status"} and record["state"] == "accepted"
        assert 0 < state.r.ttl(state.k("cmd", "cmd-1")) <= 60
        assert state.open_commands(older_than=-3600) == ["cmd-1"]
        assert state.accept_command("cmd-1", {"text": "status"}, 60) is False     # a retry of the same request

        os.kill(private.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(redis.TimeoutError):
                state.accept_command("cmd-late", {"text": "status"}, 60)
        finally:
            os.kill(private.proc.pid, signal.SIGCONT)
        # Redis ran the waiting script on waking, before this read: it refused, being late.
        assert state.command("cmd-late") == {}
        assert state.open_commands(older_than=-3600) == ["cmd-1"]
    finally:
        private.stop()
