"""The store behaves the same over the local S3 server and a local directory."""
import pytest

from steps.storage import list_uri, open_store, read_uri


@pytest.fixture(params=["s3", "local"])
def store(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_store")
    return open_store(str(tmp_path / "store"))


def test_put_get_list_roundtrip(store):
    for k in ["data/b.npz", "data/a.npz", "data/sub/c.png", "runs/r1/report.json"]:
        store.put_bytes(k, k.encode())
    assert [o.key for o in store.list("data/")] == ["data/a.npz", "data/b.npz", "data/sub/c.png"]
    assert [o.key for o in store.list("data/", start_after="data/a.npz")] == ["data/b.npz", "data/sub/c.png"]
    assert store.get_bytes("data/b.npz") == b"data/b.npz"
    info = next(iter(store.list("runs/")))
    assert info.size == len("runs/r1/report.json") and info.last_modified.tzinfo is not None


def test_missing_key_is_keyerror_and_json_default(store):
    with pytest.raises(KeyError):
        store.get_bytes("nope")
    assert store.get_json("nope.json", default={"d": 1}) == {"d": 1}
    assert not store.exists("nope")


def test_copy_prefix_and_delete(store):
    store.put_json("runs/r1/candidate/metrics.json", {"top1": 0.9})
    store.put_bytes("runs/r1/candidate/model.pt", b"w")
    new = store.copy_prefix("runs/r1/candidate/", "models/m/v1/")
    assert sorted(new) == ["models/m/v1/metrics.json", "models/m/v1/model.pt"]
    assert store.get_json("models/m/v1/metrics.json") == {"top1": 0.9}
    store.delete("models/m/v1/model.pt")
    assert not store.exists("models/m/v1/model.pt")


def test_uri_helpers_read_full_uris(store):
    store.put_bytes("data/x.bin", b"123")
    uri = store.uri("data/x.bin")
    assert read_uri(uri) == b"123"
    assert [o.key for o in list_uri(store.uri("data/"))] == [uri]


def test_local_store_refuses_keys_outside_root(tmp_path):
    with pytest.raises(ValueError, match="escapes"):
        open_store(str(tmp_path)).put_bytes("../evil", b"x")


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("gs://bucket/x")
