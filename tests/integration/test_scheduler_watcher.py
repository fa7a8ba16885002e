"""BucketWatcher: detection cost and completeness, on the moto S3 server (real S3 HTTP
API, real paging) and on a local directory store, with state in a real redis-server."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from core.state import StateStore
from scheduler.watcher import BucketWatcher
from steps.storage import open_store


class ListCalls:
    """Counts ListObjectsV2 requests through botocore's own event hooks."""

    def __init__(self, store):
        self.n = 0
        store.client.meta.events.register("before-call.s3.ListObjectsV2", self._count)

    def _count(self, **_):
        self.n += 1

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def seed(store, keys, body=b"x"):
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: store.put_bytes(k, body), keys))


@pytest.fixture
def state(redis_url):
    return StateStore.from_url(redis_url)


def test_paged_detection_costs_only_the_new_objects(state, s3_store):
    calls = ListCalls(s3_store)
    w = BucketWatcher(state, s3_store, "data/", sweep_seconds=10**9)
    base = w.scan()
    assert base.mode == "baseline" and base.listed == 0
    w.commit(base, waiting={})

    batch = sorted(f"data/2026-11-22T0900-batch/{i % 10}/{i:05d}.png" for i in range(1100))
    seed(s3_store, batch)
    calls.take()
    first = w.scan()
    assert first.mode == "fast"
    assert sorted(first.found) == batch          # all of them, across two pages
    assert first.listed == 1100 and calls.take() == 2
    w.commit(first, waiting={})
    assert state.pending()["objects"] == 1100
    assert state.pending()["counts"] == {str(d): 110 for d in range(10)}

    later = [f"data/2026-11-22T1000-batch/7/{i}.png" for i in range(3)]
    seed(s3_store, later)
    second = w.scan()
    assert sorted(second.found) == later
    assert second.listed == 3 and calls.take() == 1   # O(new): 3 listed out of 1103
    w.commit(second, waiting={})

    quiet = w.scan()
    assert quiet.found == {} and quiet.listed == 0 and calls.take() == 1

    # a full sweep over the same bucket finds nothing new, and costs the whole listing
    sweep = w.scan(sweep=True)
    assert sweep.mode == "sweep" and sweep.found == {}
    assert sweep.listed == 1103 and calls.take() == 2


def test_rewrites_and_early_sorting_keys_are_caught_by_the_sweep(state, s3_store):
    seed(s3_store, ["data/b/1.npz", "data/b/2.npz", "data/c/3.npz"])
    w = BucketWatcher(state, s3_store, "data/", sweep_seconds=10**9)
    w.commit(w.scan(), waiting={})
    s3_store.put_bytes("data/b/2.npz", b"new contents")   # rewrite of a seen key
    s3_store.put_bytes("data/a/0.npz", b"y")              # new key sorting before the cursor
    s3_store.put_bytes("data/b/1.npz", b"x")              # identical rewrite: same ETag, not new
    s3_store.put_bytes("data/d/4.npz", b"z")              # new key after the cursor

    fast = w.scan()
    assert sorted(fast.found) == ["data/d/4.npz"], "the fast tick only sees keys after the cursor"
    w.commit(fast, waiting={})
    sweep = w.scan(sweep=True)
    assert sorted(sweep.found) == ["data/a/0.npz", "data/b/2.npz"]
    assert sweep.found["data/b/2.npz"]["size"] == len(b"new contents")
    w.commit(sweep, waiting={})
    again = w.scan(sweep=True)
    assert again.found == {}, "nothing is reported twice"


def test_sweeps_happen_on_their_interval(redis_url, s3_store):
    now = [1_000_000.0]
    state = StateStore.from_url(redis_url, clock=lambda: now[0])
    w = BucketWatcher(state, s3_store, "data/", clock=lambda: now[0], sweep_seconds=3600)
    w.commit(w.scan(), waiting={})
    now[0] += 600
    assert w.scan().mode == "fast"
    now[0] += 3000
    s = w.scan()
    assert s.mode == "sweep"
    w.commit(s, waiting={})
    now[0] += 60
    assert w.scan().mode == "fast"


def test_objects_visible_late_are_caught_within_the_overlap(state, tmp_path):
    """LastModified is not arrival order (a multipart upload keeps its start time, files
    copied with their mtimes keep them). The overlap window catches what lands behind
    the watermark by less than the overlap; older ones are the documented blind spot."""
    store = open_store(str(tmp_path))
    t0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)

    def put(key, when):
        store.put_bytes(key, b"data")
        os.utime(tmp_path / key, (when.timestamp(), when.timestamp()))

    put("data/z-latest.npz", t0)
    put("data/m-old.npz", t0 - timedelta(days=3))
    w = BucketWatcher(state, store, "data/", sweep_seconds=10**9, overlap_seconds=3600)
    base = w.scan()
    w.commit(base, waiting={})
    assert base.cursor["last_modified"] == t0.isoformat()
    assert set(state.cursor_hash("data/", "tail")) == {"data/z-latest.npz"}, "only the window is kept"

    put("data/a-late-upload.npz", t0 - timedelta(minutes=20))  # behind the watermark, in the window
    put("data/b-restored.npz", t0 - timedelta(hours=5))        # rsync -a of an old file
    put("data/m-old.npz", t0 + timedelta(minutes=1))           # rewritten
    s = w.scan(sweep=True)
    assert sorted(s.found) == ["data/a-late-upload.npz", "data/m-old.npz"]


def test_waiting_objects_are_not_found_again(state, s3_store):
    w = BucketWatcher(state, s3_store, "data/", sweep_seconds=10**9)
    w.commit(w.scan(), waiting={})
    seed(s3_store, ["data/x/1.npz", "data/x/2.npz"])
    s = w.scan()
    w.commit(s, waiting=s.found)  # below threshold: kept waiting
    again = w.scan(sweep=True)
    assert again.found == {} and sorted(again.waiting) == ["data/x/1.npz", "data/x/2.npz"]
    assert state.pending()["objects"] == 2, "counted in pending once, when first found"


def test_folder_markers_and_hidden_files_are_not_data(state, s3_store):
    w = BucketWatcher(state, s3_store, "data/", sweep_seconds=10**9)
    w.commit(w.scan(), waiting={})
    seed(s3_store, ["data/new/", "data/new/.part-0001", "data/new/ok.npz"])
    s = w.scan()
    assert list(s.found) == ["data/new/ok.npz"] and s.listed == 3
