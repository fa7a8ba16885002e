"""validate: fatal problems name their objects; milder ones come back as warnings."""
import io
import json

import numpy as np
import pytest

from steps.ingest import ingest
from steps.synthetic import make_digits
from steps.validate import ValidationError, validate


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def good():
    return make_digits(200, seed=11)


def run(tmp_path, uris, eval_uri=None, **kw):
    out = tmp_path / "out"
    ingest(uris, str(out), eval_uri)
    return out, validate(str(out), **kw)


def test_clean_data_passes_and_writes_validation_json(tmp_path, good):
    (tmp_path / "a.npz").write_bytes(npz_bytes(x=good[0], y=good[1]))
    out, result = run(tmp_path, [str(tmp_path / "a.npz")])
    assert result["ok"] is True and result["warnings"] == []
    assert result["stats"]["n"] == 200 and result["stats"]["duplicates"] == 0
    assert sum(result["stats"]["counts"].values()) == 200
    assert json.loads((out / "validation.json").read_text()) == result


def test_corrupt_object_on_s3_is_fatal_and_named(s3_store, bucket, tmp_path, good):
    s3_store.put_bytes("data/good.npz", npz_bytes(x=good[0], y=good[1]))
    s3_store.put_bytes("data/bad.npz", b"this is not an npz at all")
    with pytest.raises(ValidationError) as e:
        run(tmp_path, [f"s3://{bucket}/data/"])
    assert str(e.value) == f"1 corrupt object: s3://{bucket}/data/bad.npz (not a zip file (an .npz must be a numpy zip archive))"
    saved = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert saved["ok"] is False and f"s3://{bucket}/data/bad.npz" in saved["error"]


def test_out_of_range_label_is_fatal_and_named(s3_store, bucket, tmp_path, good):
    x, y = good
    y = y.copy()
    y[5] = 11
    s3_store.put_bytes("data/ok.npz", npz_bytes(x=x, y=good[1]))
    s3_store.put_bytes("data/mislabelled.npz", npz_bytes(x=x[:50], y=y[:50]))
    with pytest.raises(ValidationError) as e:
        run(tmp_path, [f"s3://{bucket}/data/"])
    assert str(e.value) == f"labels out of range 0-9 in s3://{bucket}/data/mislabelled.npz: 11"


def test_wrong_shape_is_fatal_and_named(s3_store, bucket, tmp_path, good):
    s3_store.put_bytes("data/ok.npz", npz_bytes(x=good[0], y=good[1]))
    s3_store.put_bytes("data/big.npz", npz_bytes(x=np.zeros((4, 32, 32), np.uint8), y=np.zeros(4, np.uint8)))
    with pytest.raises(ValidationError) as e:
        run(tmp_path, [f"s3://{bucket}/data/"])
    assert f"s3://{bucket}/data/big.npz" in str(e.value)
    assert "wrong image shape" in str(e.value) and "32x32, need 28x28" in str(e.value)


def test_several_problems_are_reported_together(tmp_path, good):
    (tmp_path / "a.npz").write_bytes(npz_bytes(x=good[0], y=good[1]))
    (tmp_path / "bad1.npz").write_bytes(b"junk")
    (tmp_path / "bad2.npz").write_bytes(b"PK junk")
    (tmp_path / "neg.npz").write_bytes(npz_bytes(x=good[0][:2], y=np.array([-1, 3])))
    with pytest.raises(ValidationError) as e:
        run(tmp_path, [str(tmp_path / n) for n in ("a.npz", "bad1.npz", "bad2.npz", "neg.npz")])
    msg = str(e.value)
    assert msg.startswith("2 corrupt objects: ")
    assert str(tmp_path / "bad1.npz") in msg and str(tmp_path / "bad2.npz") in msg
    assert f"labels out of range 0-9 in {tmp_path / 'neg.npz'}: -1" in msg


def test_too_few_per_class_and_imbalance(tmp_path):
    x, y = make_digits(300, seed=12)
    keep = (y != 4) | (np.cumsum(y == 4) <= 5)      # class 4 cut to 5 images
    (tmp_path / "a.npz").write_bytes(npz_bytes(x=x[keep], y=y[keep]))
    with pytest.raises(ValidationError, match=r"too few images for class 4 \(5\): need at least 10"):
        run(tmp_path, [str(tmp_path / "a.npz")])
    with pytest.raises(ValidationError, match=r"class imbalance 6\.0x .* exceeds the 5x limit"):
        validate(str(tmp_path / "out"), min_per_class=5, max_imbalance=5)
    warned = validate(str(tmp_path / "out"), min_per_class=5, max_imbalance=20)
    assert warned["ok"] and warned["warnings"] == ["class imbalance 6.0x (class 0: 30 images, class 4: 5)"]


def test_duplicates_warn_then_fail_above_the_limit(tmp_path, good):
    x, y = good
    (tmp_path / "a.npz").write_bytes(npz_bytes(x=x, y=y))
    (tmp_path / "dups.npz").write_bytes(npz_bytes(x=x[:6], y=(y[:6] + 1) % 10))  # and relabelled
    out, result = run(tmp_path, [str(tmp_path / "a.npz"), str(tmp_path / "dups.npz")])
    assert result["stats"]["duplicates"] == 6 and result["stats"]["conflicting_duplicates"] == 6
    assert result["warnings"] == [f"6 exact duplicate images (2.9%) in {tmp_path / 'dups.npz'}; "
                                  f"6 of them with conflicting labels"]
    with pytest.raises(ValidationError, match=r"6 exact duplicate images .* above the 1% limit"):
        validate(str(out), max_duplicate_fraction=0.01)


def test_leakage_is_dropped_with_a_warning_or_fatal_when_large(tmp_path, good):
    x, y = good
    ex, ey = make_digits(100, seed=13)
    (tmp_path / "eval.npz").write_bytes(npz_bytes(x=ex, y=ey))
    (tmp_path / "a.npz").write_bytes(npz_bytes(x=np.concatenate([x, ex[:4]]), y=np.concatenate([y, ey[:4]])))
    out, result = run(tmp_path, [str(tmp_path / "a.npz")], eval_uri=str(tmp_path / "eval.npz"))
    assert result["stats"]["leaked"] == 4 and result["stats"]["n"] == 200
    assert result["warnings"] == [f"4 training images (2.0%) identical to eval images, from "
                                  f"{tmp_path / 'a.npz'} (4): dropped from training"]
    with pytest.raises(ValidationError, match="above the 1% limit; is the eval set mixed"):
        validate(str(out), max_leak_fraction=0.01)


def test_leakage_found_by_validate_itself_is_dropped_in_place(tmp_path, good):
    """Data ingested without the eval set; the eval set arrives next to it."""
    x, y = good
    ex, ey = make_digits(100, seed=14)
    (tmp_path / "a.npz").write_bytes(npz_bytes(x=np.concatenate([x, ex[:2]]), y=np.concatenate([y, ey[:2]])))
    out = tmp_path / "out"
    ingest([str(tmp_path / "a.npz")], str(out))
    np.savez(out / "eval.npz", x=ex, y=ey, src=np.zeros(100, np.int32))
    result = validate(str(out))
    assert result["stats"]["leaked"] == 2
    with np.load(out / "data.npz") as z:
        assert len(z["x"]) == 200
    card = json.loads((out / "data_card.json").read_text())
    assert card["n"] == 200 and card["leakage"]["dropped"] == 2


def test_no_images_at_all(tmp_path):
    (tmp_path / "bad.npz").write_bytes(npz_bytes(x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.uint8)))
    with pytest.raises(ValidationError, match="no training images"):
        run(tmp_path, [str(tmp_path / "bad.npz")])


def test_cli_exit_code_and_message(tmp_path):
    import subprocess
    import sys
    (tmp_path / "bad.npz").write_bytes(b"junk")
    (tmp_path / "ok.npz").write_bytes(npz_bytes(x=make_digits(100)[0], y=make_digits(100)[1]))
    ingest([str(tmp_path / "bad.npz"), str(tmp_path / "ok.npz")], str(tmp_path / "out"))
    r = subprocess.run([sys.executable, "-m", "steps.validate", "--data-dir", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert str(tmp_path / "bad.npz") in json.loads(r.stdout)["error"]


def test_missing_objects_and_empty_prefixes_are_named(s3_store, bucket, tmp_path, good):
    s3_store.put_bytes("data/ok.npz", npz_bytes(x=good[0], y=good[1]))
    with pytest.raises(ValidationError) as e:
        run(tmp_path, [f"s3://{bucket}/data/", f"s3://{bucket}/data/gone.npz", f"s3://{bucket}/empty/"])
    assert str(e.value) == (f"2 missing objects: s3://{bucket}/data/gone.npz (object not found), "
                            f"s3://{bucket}/empty/ (no objects under this prefix)")


def test_eval_set_uploaded_as_training_data_is_called_out(tmp_path):
    ex, ey = make_digits(100, seed=15)
    (tmp_path / "eval.npz").write_bytes(npz_bytes(x=ex, y=ey))
    (tmp_path / "copy.npz").write_bytes(npz_bytes(x=ex, y=ey))
    with pytest.raises(ValidationError) as e:
        run(tmp_path, [str(tmp_path / "copy.npz")], eval_uri=str(tmp_path / "eval.npz"))
    assert str(e.value).startswith(f"100 training images (100.0%) identical to eval images, from "
                                   f"{tmp_path / 'copy.npz'} (100): above the 5% limit")


def test_checks_run_in_order_and_each_names_its_problem(tmp_path, good):
    from steps.validate import CHECKS, DataSet, Limits, check_balance, check_min_counts

    assert [c.__name__ for c in CHECKS] == [
        "check_ingest_errors", "check_arrays", "check_labels", "check_eval_set", "check_leakage",
        "check_not_empty", "check_skipped", "check_min_counts", "check_balance", "check_duplicates"]
    # one check alone, on a set with a thin class: fatal from min counts, a warning from balance
    y = np.repeat(np.arange(10), 20)
    y[:15] = 1  # class 0 keeps 5 images
    ds = DataSet(tmp_path, {}, Limits(min_per_class=10, max_imbalance=10.0))
    ds.x, ds.y = good[0][:200], y
    problems, warnings = check_min_counts(ds)
    assert problems == ["too few images for class 0 (5): need at least 10 per class"] and warnings == []
    assert check_balance(ds) == ([], ["class imbalance 7.0x (class 1: 35 images, class 0: 5)"])
