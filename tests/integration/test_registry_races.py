"""The registry under concurrency, on the real S3 API (moto's server) and a local directory:
publishes at once get distinct versions with untorn packages; moves of the alias are
compare-and-set, so a stale or repeated rollback changes nothing."""
from __future__ import annotations

import threading

import pytest

from steps import layout
from steps.deploy import StaleAlias, publish, read_alias, rollback, verify_package
from steps.storage import open_store

MODEL = "mnist-arcface"


def candidate(store, run_id: str) -> str:
    """A package whose every file names its run, so a mix of two runs is visible."""
    prefix = layout.candidate_prefix(run_id)
    for name in ("model.pt", "model_export.pt", "index.faiss", "labels.npy", "train_metrics.json"):
        store.put_bytes(prefix + name, f"{name} of {run_id} ".encode() * 50)
    store.put_json(prefix + layout.METRICS_JSON, {"top1": 0.99, "run_id": run_id})
    return prefix


@pytest.fixture(params=["s3", "local"])
def store(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_store")
    return open_store(str(tmp_path / "store"))


def at_once(fns) -> list:
    """Start every fn at the same moment; their results (or exceptions) in order."""
    barrier, out = threading.Barrier(len(fns)), [None] * len(fns)

    def go(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 - returned for the test to inspect
            out[i] = e
    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(fns)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def test_concurrent_publishes_get_distinct_untorn_versions(store):
    runs = [f"r{i}" for i in range(6)]
    prefixes = {r: candidate(store, r) for r in runs}
    versions = at_once([lambda r=r: publish(store, MODEL, prefixes[r], run_id=r, by="U", keep=10) for r in runs])
    assert sorted(versions) == list(range(1, 7))                  # never the same number twice
    for run_id, version in zip(runs, versions, strict=True):
        manifest = verify_package(store, MODEL, version)          # complete, checksums match
        assert manifest["run_id"] == run_id
        for name in ("model.pt", "index.faiss", "train_metrics.json"):
            assert run_id.encode() in store.get_bytes(layout.package_key(MODEL, version, name))
    history = read_alias(store, MODEL)["history"]
    assert sorted(h["version"] for h in history) == list(range(1, 7))   # no move was lost


def test_a_pruned_number_is_never_handed_out_again(store):
    for i in range(4):
        publish(store, MODEL, candidate(store, f"r{i}"), run_id=f"r{i}", by="U", keep=1)
    assert publish(store, MODEL, candidate(store, "r9"), run_id="r9", by="U", keep=1) == 5


def test_rollback_is_compare_and_set(store):
    for i in range(3):
        publish(store, MODEL, candidate(store, f"r{i}"), run_id=f"r{i}", by="U", keep=10)
    with pytest.raises(StaleAlias, match="Production is now v3, not v2"):
        rollback(store, MODEL, by="U", expect_version=2)
    assert read_alias(store, MODEL)["version"] == 3               # nothing moved
    # Two clicks on the same Roll back button (both saw v3): one rollback.
    results = at_once([lambda: rollback(store, MODEL, by="A", expect_version=3),
                       lambda: rollback(store, MODEL, by="B", expect_version=3)])
    assert sum(isinstance(r, dict) for r in results) == 1
    assert sum(isinstance(r, StaleAlias) for r in results) == 1
    assert read_alias(store, MODEL)["version"] == 2


def test_a_publish_during_a_rollback_loses_neither(store):
    for i in range(2):
        publish(store, MODEL, candidate(store, f"r{i}"), run_id=f"r{i}", by="U", keep=10)
    prefix = candidate(store, "r-new")
    at_once([lambda: rollback(store, MODEL, by="A"),
             lambda: publish(store, MODEL, prefix, run_id="r-new", by="pipeline", keep=10)])
    actions = [(h["action"], h["version"]) for h in read_alias(store, MODEL)["history"]]
    # Both recorded, in either order: a rollback first goes back to v1 and the deploy then
    # makes v3 production; a deploy first makes v3 production and the rollback leaves it for v2.
    assert actions[-2:] in ([("rollback", 1), ("deploy", 3)], [("deploy", 3), ("rollback", 2)]), actions
    assert read_alias(store, MODEL)["version"] == actions[-1][1]
