"""The shard cache: a run reads and validates only objects it has not seen, and of the
others only their shards' sidecars, never their pixels (S3 on the moto server through
boto3, the real ingest and validate steps)."""
import io

import numpy as np
import pytest
from PIL import Image

from steps import dataset
from steps.ingest import ingest
from steps.synthetic import make_digits
from steps.validate import ValidationError, validate
from tests.helpers import npz_bytes


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def shard_keys(store) -> list[str]:
    """The shards and their sidecars, not the shard index."""
    return sorted(o.key for o in store.list("cache/shards/") if not o.key.startswith("cache/shards/index/"))


def index_keys(store) -> list[str]:
    return sorted(o.key for o in store.list("cache/shards/index/"))


def arrays(d):
    x, y = dataset.images(d, "data")
    return x, y, dataset.read_rows(d, "data")["h"]


def pixel_shards(store) -> list[str]:
    return [k for k in shard_keys(store) if not k.endswith(".meta.npz")]


@pytest.fixture
def world(s3_store, bucket):
    x, y = make_digits(300, seed=3)
    ex, ey = make_digits(100, seed=4)
    s3_store.put_bytes("data/a.npz", npz_bytes(x=x[:150], y=y[:150]))
    s3_store.put_bytes("data/b.npz", npz_bytes(x=x[150:], y=y[150:]))
    s3_store.put_bytes("eval/eval.npz", npz_bytes(x=ex, y=ey))
    return {"data": f"s3://{bucket}/data/", "eval": f"s3://{bucket}/eval/eval.npz",
            "x": x, "y": y, "ex": ex, "ey": ey}


def test_second_run_reads_only_the_new_object(s3_store, world, tmp_path):
    first = ingest([world["data"]], str(tmp_path / "1"), world["eval"], cache=s3_store)
    assert first["cache"]["objects_new"] == 2 and first["cache"]["objects_cached"] == 0
    assert first["eval"]["cache"] == {"objects_new": 1, "objects_cached": 0,
                                      "new": [world["eval"]]}
    assert len(pixel_shards(s3_store)) == 3          # a, b and the eval set, each with a sidecar
    assert len(shard_keys(s3_store)) == 6
    assert len(index_keys(s3_store)) == 1             # the data's two sidecars in one object
    validate(str(tmp_path / "1"))

    nx, ny = make_digits(40, seed=5)
    s3_store.put_bytes("data/c.npz", npz_bytes(x=nx, y=ny))
    second = ingest([world["data"]], str(tmp_path / "2"), world["eval"], cache=s3_store)
    assert second["cache"] == {"objects_new": 1, "objects_cached": 2,
                               "new": [world["data"] + "c.npz"]}
    assert second["eval"]["cache"]["objects_cached"] == 1
    assert second["n"] == 340 and validate(str(tmp_path / "2"))["ok"]

    # the cached rows are exactly what reading the objects gives
    plain = ingest([world["data"]], str(tmp_path / "plain"), world["eval"])
    assert "cache" not in plain
    assert second["fingerprint"] == plain["fingerprint"]
    for got, want in zip(arrays(tmp_path / "2"), arrays(tmp_path / "plain"), strict=True):
        np.testing.assert_array_equal(got, want)
    # the source tags the refresh mode compares: the same for an unchanged object
    assert [s["tag"] for s in second["sources"][:2]] == [s["tag"] for s in first["sources"]]


def test_rewritten_object_is_validated_again(s3_store, world, tmp_path):
    ingest([world["data"]], str(tmp_path / "1"), world["eval"], cache=s3_store)
    bad_y = world["y"][150:].copy()
    bad_y[:3] = 11
    s3_store.put_bytes("data/b.npz", npz_bytes(x=world["x"][150:], y=bad_y))   # new ETag
    card = ingest([world["data"]], str(tmp_path / "2"), world["eval"], cache=s3_store)
    assert card["cache"] == {"objects_new": 1, "objects_cached": 1, "new": [world["data"] + "b.npz"]}
    with pytest.raises(ValidationError, match=r"labels out of range 0-9 in s3://.*/data/b\.npz: 11"):
        validate(str(tmp_path / "2"))


def test_a_cached_bad_object_still_fails_validation(s3_store, world, tmp_path):
    """The issues found when an object was decoded are cached with it."""
    bad_y = world["y"][:150].copy()
    bad_y[0] = 12
    s3_store.put_bytes("data/a.npz", npz_bytes(x=world["x"][:150], y=bad_y))
    for run in ("1", "2"):
        card = ingest([world["data"]], str(tmp_path / run), world["eval"], cache=s3_store)
        with pytest.raises(ValidationError, match=r"data/a\.npz: 12"):
            validate(str(tmp_path / run))
    assert card["cache"]["objects_cached"] == 2


def test_leakage_is_checked_against_the_whole_eval_set_for_cached_objects(s3_store, world, tmp_path):
    ingest([world["data"]], str(tmp_path / "1"), world["eval"], cache=s3_store)
    # the eval set changes to include 4 images of the cached object a
    ex = np.concatenate([world["ex"], world["x"][:4]])
    ey = np.concatenate([world["ey"], world["y"][:4]])
    s3_store.put_bytes("eval/eval.npz", npz_bytes(x=ex, y=ey))
    card = ingest([world["data"]], str(tmp_path / "2"), world["eval"], cache=s3_store)
    assert card["cache"]["objects_cached"] == 2 and card["eval"]["cache"]["objects_new"] == 1
    assert card["leakage"]["dropped"] == 4 and card["n"] == 296
    assert card["leakage"]["by_source"] == [{"uri": world["data"] + "a.npz", "n": 4}]
    result = validate(str(tmp_path / "2"))
    assert result["stats"]["leaked"] == 4 and result["stats"]["n"] == 296
    # train and embed get the cached object's other images, and not the leaked ones
    x, y = dataset.images(tmp_path / "2", "data")
    np.testing.assert_array_equal(x, world["x"][4:])
    np.testing.assert_array_equal(y, world["y"][4:])


def test_png_folder_is_one_shard_and_a_changed_file_rereads_it(s3_store, bucket, world, tmp_path):
    x, y = make_digits(20, seed=6)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        s3_store.put_bytes(f"pngs/{label}/{i:03d}.png", png_bytes(img))
    uri = f"s3://{bucket}/pngs/"
    first = ingest([uri], str(tmp_path / "1"), world["eval"], cache=s3_store)
    second = ingest([uri], str(tmp_path / "2"), world["eval"], cache=s3_store)
    assert (first["cache"]["objects_new"], second["cache"]["objects_cached"]) == (20, 20)
    assert second["sources"] == first["sources"] and second["fingerprint"] == first["fingerprint"]
    s3_store.put_bytes(f"pngs/{y[0]}/000.png", png_bytes(255 - x[0]))
    third = ingest([uri], str(tmp_path / "3"), world["eval"], cache=s3_store)
    assert third["cache"]["objects_new"] == 20 and third["fingerprint"] != first["fingerprint"]


def test_local_files_are_tagged_by_content(tmp_path):
    from steps.storage import open_store

    cache = open_store(str(tmp_path / "store"))
    data = tmp_path / "data"
    data.mkdir()
    x, y = make_digits(60, seed=7)
    (data / "a.npz").write_bytes(npz_bytes(x=x, y=y))
    assert ingest([str(data)], str(tmp_path / "1"), cache=cache)["cache"]["objects_new"] == 1
    assert ingest([str(data)], str(tmp_path / "2"), cache=cache)["cache"]["objects_cached"] == 1
    (data / "a.npz").write_bytes(npz_bytes(x=255 - x, y=y))   # same size, same second maybe
    assert ingest([str(data)], str(tmp_path / "3"), cache=cache)["cache"]["objects_new"] == 1


def test_refresh_adds_only_unseen_objects_and_refuses_changed_ones():
    from steps.reuse import new_rows

    base = {"sources": [{"uri": "s3://b/data/a.npz", "tag": "t1"}, {"uri": "s3://b/data/b.npz", "tag": "t2"}]}
    card = {"sources": [*base["sources"], {"uri": "s3://b/data/c.npz", "tag": "t3"}]}
    src = np.array([0, 0, 1, 2, 2, 2])
    rows, objects = new_rows(card, src, base)
    assert rows.tolist() == [3, 4, 5] and objects == ["s3://b/data/c.npz"]
    rewritten = {"sources": [{"uri": "s3://b/data/a.npz", "tag": "t9"}, *card["sources"][1:]]}
    with pytest.raises(ValueError, match=r"rewritten since: s3://b/data/a\.npz.*run mode=warm or mode=full"):
        new_rows(rewritten, src, base)
    with pytest.raises(ValueError, match=r"removed since: s3://b/data/b\.npz"):
        new_rows({"sources": card["sources"][:1] + card["sources"][2:]}, src, base)
    untagged = {"sources": [{"uri": "s3://b/data/a.npz"}]}
    with pytest.raises(ValueError, match="predates content tags"):
        new_rows(card, src, untagged)


def test_a_second_run_reads_no_pixels_of_cached_objects(s3_store, world, tmp_path):
    """Proof by removal: with the cached shards' pixels gone from the store, ingest and
    validate of a second run still succeed (they read sidecars only), and the bytes the
    card says were read are the new object's and the sidecars'. The steps that need pixels
    read them from the cache: all of them, or for a refresh only the new object's."""
    first = ingest([world["data"]], str(tmp_path / "1"), world["eval"], cache=s3_store)
    nx, ny = make_digits(40, seed=5)
    s3_store.put_bytes("data/c.npz", npz_bytes(x=nx, y=ny))
    pixels = {k: s3_store.get_bytes(k) for k in pixel_shards(s3_store)}
    # the data's sidecars come from the shard index, the eval set's (one object) from its own
    (index,) = [o.size for o in s3_store.list("cache/shards/index/")]
    eval_tag = first["eval"]["sources"][0]["tag"]
    sidecars = index + len(s3_store.get_bytes(f"cache/shards/{eval_tag}.meta.npz"))
    for k in pixels:
        s3_store.delete(k)
    out = tmp_path / "2"
    card = ingest([world["data"]], str(out), world["eval"], cache=s3_store)
    assert card["cache"]["objects_cached"] == 2 and card["eval"]["cache"]["objects_cached"] == 1
    assert validate(str(out))["stats"]["n"] == 340
    assert card["prep"]["bytes_read"] == {"objects": len(s3_store.get_bytes("data/c.npz")),
                                          "shard_sidecars": sidecars}
    assert sidecars < sum(len(v) for v in pixels.values()) / 5
    assert not (out / "data.npz").exists() and not (out / "eval.npz").exists()

    # the new object's rows are readable alone (a refresh embeds just these) ...
    src = dataset.read_rows(out, "data")["src"]
    new_rows = np.flatnonzero(src == 2)
    x_new, y_new = dataset.images(out, "data", new_rows)
    np.testing.assert_array_equal(x_new, nx)
    np.testing.assert_array_equal(y_new, ny)
    # ... while all of them need the cached pixels, and say which shard went missing
    with pytest.raises(FileNotFoundError, match=r"shard cache lost s3://.*/cache/shards/.*\.npz after ingest"):
        dataset.images(out, "data")
    for k, data in pixels.items():
        s3_store.put_bytes(k, data)
    x, y = dataset.images(out, "data")
    np.testing.assert_array_equal(x, np.concatenate([world["x"], nx]))
    np.testing.assert_array_equal(y, np.concatenate([world["y"], ny]))
    ex, ey = dataset.images(out, "eval")
    np.testing.assert_array_equal(ex, world["ex"])


def test_seen_objects_sidecars_come_from_the_shard_index_in_one_read(s3_store, world, tmp_path):
    """The index holds the sidecars of every unit the data URIs held: with every data
    sidecar deleted, a second run still finds both objects cached; a new object adds its
    entry; an index that cannot be read is a miss, and the sidecars are read one by one."""
    first = ingest([world["data"]], str(tmp_path / "1"), world["eval"], cache=s3_store)
    data_tags = {s["tag"] for s in first["sources"]}
    for tag in data_tags:
        s3_store.delete(f"cache/shards/{tag}.meta.npz")
    second = ingest([world["data"]], str(tmp_path / "2"), world["eval"], cache=s3_store)
    assert second["cache"]["objects_cached"] == 2 and second["fingerprint"] == first["fingerprint"]
    assert validate(str(tmp_path / "2"))["ok"]

    nx, ny = make_digits(40, seed=5)
    s3_store.put_bytes("data/c.npz", npz_bytes(x=nx, y=ny))
    third = ingest([world["data"]], str(tmp_path / "3"), world["eval"], cache=s3_store)
    assert third["cache"]["objects_new"] == 1 and third["cache"]["objects_cached"] == 2
    (key,) = index_keys(s3_store)
    with np.load(io.BytesIO(s3_store.get_bytes(key))) as z:
        assert set(z.files) == {s["tag"] for s in third["sources"]}

    s3_store.put_bytes(key, b"not an npz")
    fourth = ingest([world["data"]], str(tmp_path / "4"), world["eval"], cache=s3_store)
    # a and b lost their own sidecars above, so only c's is found; the index is rewritten
    assert fourth["cache"]["objects_cached"] == 1 and fourth["cache"]["objects_new"] == 2
    assert fourth["fingerprint"] == third["fingerprint"]
    with np.load(io.BytesIO(s3_store.get_bytes(key))) as z:
        assert len(z.files) == 3


def test_a_deleted_cache_is_rebuilt(s3_store, world, tmp_path):
    first = ingest([world["data"]], str(tmp_path / "1"), world["eval"], cache=s3_store)
    for k in shard_keys(s3_store) + index_keys(s3_store):   # all of cache/shards/
        s3_store.delete(k)
    again = ingest([world["data"]], str(tmp_path / "2"), world["eval"], cache=s3_store)
    assert again["cache"]["objects_new"] == 2 and again["eval"]["cache"]["objects_new"] == 1
    assert again["fingerprint"] == first["fingerprint"] and len(shard_keys(s3_store)) == 6
    assert ingest([world["data"]], str(tmp_path / "3"), world["eval"], cache=s3_store)["cache"]["objects_cached"] == 2
