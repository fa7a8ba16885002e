"""The watcher's pure parts: object tags, fingerprints, labels, NewData."""
from __future__ import annotations

from datetime import UTC, datetime

from scheduler.watcher import entry, fingerprint, is_data, label_of, new_data, tag
from steps.storage import ObjectInfo

T = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def test_tags():
    assert tag(ObjectInfo("a", 3, T, "abc")) == "abc"
    local = tag(ObjectInfo("a", 3, T))
    assert local == f"3:{T.timestamp():.6f}"
    assert tag(ObjectInfo("a", 4, T)) != local


def test_fingerprint_is_order_free_and_sees_rewrites():
    a = {"data/x": {"tag": "1"}, "data/y": {"tag": "2"}}
    b = {"data/y": {"tag": "2"}, "data/x": {"tag": "1"}}
    assert fingerprint(a) == fingerprint(b) and fingerprint(a).startswith("sha256:")
    assert fingerprint(a) != fingerprint({"data/x": {"tag": "1"}, "data/y": {"tag": "3"}})


def test_labels_and_data_keys():
    assert label_of("data/b1/7/0001.png") == "7"
    assert label_of("data/b1/7/0001.npz") is None
    assert label_of("x.png") is None
    assert is_data("data/a.npz") and not is_data("data/b/") and not is_data("data/b/.tmp-1")


def test_new_data_lists_oldest_first_with_counts():
    objs = [ObjectInfo("data/b/3/z.png", 10, T.replace(hour=10), "e1"),
            ObjectInfo("data/b/3/a.png", 20, T.replace(hour=11), "e2"),
            ObjectInfo("data/a.npz", 5, T, "e3")]
    found = new_data({o.key: entry(o) for o in objs})
    assert found.keys == ["data/a.npz", "data/b/3/z.png", "data/b/3/a.png"]
    assert found.total_bytes == 35 and found.counts == {"3": 2}
