"""The eval cache (steps.eval_cache): the eval set's embeddings under a model's weights,
and a model's score on the eval set with its gallery, kept in the store (S3 on the moto
server) and reused by embed and evaluate only while the weights, the gallery and the eval
set are the same. Counted through what the steps record (embed's ``eval.cached``,
evaluate's ``production_from``) and the cache's objects."""
import json
import shutil

import numpy as np
import pytest

from steps import eval_cache, layout
from steps.deploy import publish
from steps.embed import embed_for_run
from steps.evaluate import evaluate_against_production, evaluate_package
from steps.index import build_index
from steps.reuse import stage_trained
from steps.synthetic import make_digits
from steps.train import train

MODEL = "mnist-arcface"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny models trained on the same digits with different seeds, the data set, and
    a second eval set differing from the first in one image."""
    d = tmp_path_factory.mktemp("world")
    x, y = make_digits(300, seed=41)
    ex, ey = make_digits(80, seed=42)
    for name, evx in (("data", ex), ("data_other_eval", ex.copy())):
        (d / name).mkdir()
        np.savez(d / name / "data.npz", x=x, y=y)
        if name == "data_other_eval":
            evx[0] = 255 - evx[0]
        np.savez(d / name / "eval.npz", x=evx, y=ey)
        (d / name / layout.DATA_CARD_JSON).write_text(json.dumps({"sources": []}))
    for seed in (0, 1):
        train(str(d / "data"), str(d / f"model{seed}"),
              {"epochs": 1, "batch_size": 32, "threads": 1, "val_fraction": 0, "seed": seed})
    return d


def embed_run(store, world, tmp_path, run_id, model="model0", data="data"):
    """embed_for_run on a model staged as the pipeline stages it; returns (summary, out dir, model dir)."""
    prefix = stage_trained(store, run_id, str(world / model))
    out, model_dir = tmp_path / run_id / "emb", tmp_path / run_id / "model"
    model_dir.mkdir(parents=True)
    return embed_for_run(store, prefix, str(model_dir), str(world / data), str(out)), out, model_dir


def eval_entries(store) -> list[str]:
    return sorted(o.key for o in store.list(eval_cache.EVAL_EMB_PREFIX) if o.key.endswith(".npz"))


def test_a_second_embed_with_the_same_weights_takes_the_eval_set_from_the_cache(s3_store, world, tmp_path):
    first, out1, _ = embed_run(s3_store, world, tmp_path, "r1")
    assert first["eval"]["cached"] is False and first["eval"]["n"] == 80
    assert eval_entries(s3_store) == [eval_cache.eval_emb_key(first["weights"], first["eval_set"])]

    second, out2, _ = embed_run(s3_store, world, tmp_path, "r2")
    assert second["eval"]["cached"] is True and second["eval"]["n"] == 80
    assert (second["weights"], second["eval_set"]) == (first["weights"], first["eval_set"])
    with np.load(out1 / "eval.npz") as a, np.load(out2 / "eval.npz") as b:
        np.testing.assert_array_equal(a["emb"], b["emb"])
        np.testing.assert_array_equal(a["y"], b["y"])
    assert second["gallery"]["n"] == 300          # the gallery is always embedded


def test_other_weights_or_another_eval_set_embed_again(s3_store, world, tmp_path):
    base, _, _ = embed_run(s3_store, world, tmp_path, "r1")
    other_weights, out, _ = embed_run(s3_store, world, tmp_path, "r2", model="model1")
    assert other_weights["eval"]["cached"] is False and other_weights["weights"] != base["weights"]
    other_eval, _, _ = embed_run(s3_store, world, tmp_path, "r3", data="data_other_eval")
    assert other_eval["eval"]["cached"] is False and other_eval["eval_set"] != base["eval_set"]
    assert len(eval_entries(s3_store)) == 3
    with np.load(out / "eval.npz") as z:           # what was embedded anew is model1's
        assert z["emb"].shape == (80, 128)


def test_a_damaged_entry_is_embedded_again(s3_store, world, tmp_path):
    first, _, _ = embed_run(s3_store, world, tmp_path, "r1")
    s3_store.put_bytes(eval_cache.eval_emb_key(first["weights"], first["eval_set"]), b"not an npz")
    again, out, _ = embed_run(s3_store, world, tmp_path, "r2")
    assert again["eval"]["cached"] is False
    with np.load(out / "eval.npz") as z:
        assert z["emb"].shape == (80, 128)


def test_the_cache_keeps_a_bounded_number_of_entries(s3_store, tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, emb=np.zeros((3, 4), np.float32), y=np.arange(3))
    for i in range(eval_cache.KEEP_EVAL_EMB + 3):
        eval_cache.put_eval_embeddings(s3_store, f"w{i:02d}", "e", path)
        assert eval_cache.eval_emb_key(f"w{i:02d}", "e") in eval_entries(s3_store)   # never its own
    assert len(eval_entries(s3_store)) == eval_cache.KEEP_EVAL_EMB


def gallery(world, run_dir, rows=None):
    """An index over the run's embedded gallery (``rows``: only those)."""
    emb = run_dir / "emb" / "gallery.npz"
    if rows is not None:
        with np.load(emb) as z:
            np.savez(run_dir / "part.npz", emb=z["emb"][rows], y=z["y"][rows])
        emb = run_dir / "part.npz"
    build_index(str(emb), str(run_dir / "index"))
    return run_dir / "index"


def evaluate_run(store, world, run_dir, summary, index_dir, data="data"):
    def eval_images():
        return str(world / data / "eval.npz")
    return evaluate_against_production(
        f"s3://{store.bucket}/", MODEL, str(index_dir), str(run_dir / "emb" / "eval.npz"), eval_images,
        str(run_dir / "evaluation"), floor=0.0, model_dir=str(run_dir / "model"), eval_fp=summary["eval_set"])


def deploy(store, world, run_id, run_dir, index_dir):
    from steps.evaluate import upload_candidate
    upload_candidate(f"s3://{store.bucket}/", run_id, model_dir=str(run_dir / "model"), index_dir=str(index_dir),
                     eval_dir=str(run_dir / "evaluation"), data_card=str(world / "data" / layout.DATA_CARD_JSON))
    return publish(store, MODEL, layout.candidate_prefix(run_id), run_id=run_id, by="U1")


def test_production_score_comes_from_the_cache_while_weights_gallery_and_eval_set_match(s3_store, world, tmp_path):
    s1, _, _ = embed_run(s3_store, world, tmp_path, "r1")
    r1 = evaluate_run(s3_store, world, tmp_path / "r1", s1, gallery(world, tmp_path / "r1"))
    assert r1["production"] is None and "production_from" not in r1
    assert deploy(s3_store, world, "r1", tmp_path / "r1", tmp_path / "r1" / "index") == 1

    # another model on the same eval set: production's score is the one its own run measured
    s2, _, _ = embed_run(s3_store, world, tmp_path, "r2", model="model1")
    r2 = evaluate_run(s3_store, world, tmp_path / "r2", s2, gallery(world, tmp_path / "r2"))
    assert r2["production_from"] == "cache" and r2["production"] == {"version": 1, "top1": r1["top1"]}
    metrics = json.loads((tmp_path / "r2" / "evaluation" / layout.METRICS_JSON).read_text())
    assert metrics["production_from"] == "cache"

    # another eval set: production is downloaded and measured on its images, and that goes into the cache
    s3, _, _ = embed_run(s3_store, world, tmp_path, "r3", model="model1", data="data_other_eval")
    r3 = evaluate_run(s3_store, world, tmp_path / "r3", s3, gallery(world, tmp_path / "r3"), data="data_other_eval")
    assert r3["production_from"] == "measured"
    pkg = tmp_path / "v1"
    from steps.deploy import download_version
    download_version(s3_store, MODEL, 1, str(pkg))
    assert r3["production"]["top1"] == pytest.approx(evaluate_package(str(pkg), str(world / "data_other_eval" / "eval.npz")))
    r3b = evaluate_run(s3_store, world, tmp_path / "r3", s3, tmp_path / "r3" / "index", data="data_other_eval")
    assert r3b["production_from"] == "cache" and r3b["production"] == r3["production"]


def test_another_gallery_with_the_same_weights_is_measured_again(s3_store, world, tmp_path):
    s1, _, _ = embed_run(s3_store, world, tmp_path, "r1")
    evaluate_run(s3_store, world, tmp_path / "r1", s1, gallery(world, tmp_path / "r1", rows=np.arange(150)))
    deploy(s3_store, world, "r1", tmp_path / "r1", tmp_path / "r1" / "index")
    r2 = evaluate_run(s3_store, world, tmp_path / "r1", s1, tmp_path / "r1" / "index")
    assert r2["production_from"] == "cache"
    # v2: the same weights with the whole gallery, published without its score in the cache
    shutil.rmtree(tmp_path / "r1" / "index")
    gallery(world, tmp_path / "r1")
    from steps.evaluate import upload_candidate
    upload_candidate(f"s3://{s3_store.bucket}/", "r9", model_dir=str(tmp_path / "r1" / "model"),
                     index_dir=str(tmp_path / "r1" / "index"), eval_dir=str(tmp_path / "r1" / "evaluation"),
                     data_card=str(world / "data" / layout.DATA_CARD_JSON))
    assert publish(s3_store, MODEL, layout.candidate_prefix("r9"), run_id="r9", by="U1") == 2
    s2, _, _ = embed_run(s3_store, world, tmp_path, "r2", model="model1")
    r3 = evaluate_run(s3_store, world, tmp_path / "r2", s2, gallery(world, tmp_path / "r2"))
    assert r3["production_from"] == "measured" and r3["production"]["version"] == 2


def test_a_torn_production_still_fails_the_comparison(s3_store, world, tmp_path):
    s1, _, _ = embed_run(s3_store, world, tmp_path, "r1")
    evaluate_run(s3_store, world, tmp_path / "r1", s1, gallery(world, tmp_path / "r1"))
    deploy(s3_store, world, "r1", tmp_path / "r1", tmp_path / "r1" / "index")
    s3_store.delete(layout.package_key(MODEL, 1, "labels.npy"))
    with pytest.raises(ValueError, match=r"cannot compare with production: .*labels.npy is missing"):
        evaluate_run(s3_store, world, tmp_path / "r1", s1, tmp_path / "r1" / "index")


def test_neighbours_come_back_only_for_the_same_queries_and_k(s3_store):
    sims = np.linspace(1, 0, 12, dtype=np.float32).reshape(3, 4)
    ids = np.arange(12).reshape(3, 4)
    key = eval_cache.neighbours_key("w", "g", "e", 4)
    assert eval_cache.get_neighbours(s3_store, key, 3, 4) is None          # nothing cached yet
    eval_cache.put_neighbours(s3_store, key, sims, ids)
    got = eval_cache.get_neighbours(s3_store, key, 3, 4)
    np.testing.assert_array_equal(got[0], sims)
    np.testing.assert_array_equal(got[1], ids)
    assert got[1].dtype == np.int64
    assert eval_cache.get_neighbours(s3_store, key, 4, 4) is None          # another eval set's length
    s3_store.put_bytes(key, b"not an npz")
    assert eval_cache.get_neighbours(s3_store, key, 3, 4) is None          # damaged: searched again
    for i in range(eval_cache.KEEP_NEIGHBOURS + 2):
        eval_cache.put_neighbours(s3_store, eval_cache.neighbours_key(f"w{i:02d}", "g", "e", 4), sims, ids)
    kept = [o.key for o in s3_store.list(eval_cache.NEIGHBOURS_PREFIX) if o.key.endswith(".npz")]
    assert len(kept) == eval_cache.KEEP_NEIGHBOURS


def test_a_refresh_searches_only_the_rows_it_appended_to_production(s3_store, world, tmp_path):
    from steps.deploy import download_version
    from steps.evaluate import evaluate

    s1, _, _ = embed_run(s3_store, world, tmp_path, "r1")
    r1 = evaluate_run(s3_store, world, tmp_path / "r1", s1, gallery(world, tmp_path / "r1", rows=np.arange(150)))
    assert r1["searched"] == {"rows": 150, "of": 150}
    assert deploy(s3_store, world, "r1", tmp_path / "r1", tmp_path / "r1" / "index") == 1
    # the refresh: production's package as the pipeline stages it (weights and gallery in
    # one directory), and its gallery with the other 150 rows appended
    pkg = tmp_path / "v1"
    download_version(s3_store, MODEL, 1, str(pkg))
    grown = tmp_path / "r2" / "index"
    build_index(str(tmp_path / "r1" / "emb" / "gallery.npz"), str(grown))
    whole = evaluate(str(grown), str(tmp_path / "r1" / "emb" / "eval.npz"), str(tmp_path / "whole"), floor=0.0)

    def refresh(name):
        return evaluate_against_production(
            f"s3://{s3_store.bucket}/", MODEL, str(grown), str(tmp_path / "r1" / "emb" / "eval.npz"),
            lambda: pytest.fail("a refresh does not embed production's eval images"), str(tmp_path / name),
            floor=0.0, reused={"version": 1, "index_dir": str(pkg)}, model_dir=str(pkg), eval_fp=s1["eval_set"])

    r2 = refresh("r2-eval")          # v1's neighbours, left in the cache by its own evaluate
    assert r2["searched"] == {"rows": 150, "of": 300, "base_from": "cache"}
    assert r2["top1"] == whole["top1"] and r2["confusion"] == whole["confusion"]
    assert r2["production"] == {"version": 1, "top1": r1["top1"]}
    # a production whose run left no neighbours (evaluated before this cache existed):
    # searched once, then taken from the cache
    for o in list(s3_store.list(eval_cache.NEIGHBOURS_PREFIX)):
        s3_store.delete(o.key)
    assert refresh("r3-eval")["searched"]["base_from"] == "searched"
    r4 = refresh("r4-eval")
    assert r4["searched"]["base_from"] == "cache" and r4["top1"] == whole["top1"]


def test_evaluate_and_upload_leaves_the_whole_candidate_or_none(s3_store, world, tmp_path):
    from steps.evaluate import RESULT_FILES, evaluate_and_upload

    def run(run_id, summary, eval_emb):
        return evaluate_and_upload(
            f"s3://{s3_store.bucket}/", MODEL, run_id, model_dir=str(tmp_path / "r1" / "model"),
            index_dir=str(index), eval_emb=str(eval_emb), eval_images=lambda: str(world / "data" / "eval.npz"),
            eval_dir=str(tmp_path / run_id / "evaluation"), data_card=str(world / "data" / layout.DATA_CARD_JSON),
            floor=0.0, eval_fp=summary["eval_set"])

    s1, out, _ = embed_run(s3_store, world, tmp_path, "r1")
    index = gallery(world, tmp_path / "r1")
    result = run("r1", s1, out / "eval.npz")
    prefix = layout.candidate_prefix("r1")
    names = {p.name for d in (tmp_path / "r1" / "model", index) for p in d.iterdir()} | set(RESULT_FILES)
    assert sorted(o.key for o in s3_store.list(prefix)) == sorted(prefix + n for n in names)
    assert s3_store.get_json(prefix + layout.METRICS_JSON)["top1"] == result["top1"]
    assert s3_store.get_bytes(prefix + "index.faiss") == (index / "index.faiss").read_bytes()
    assert result["timings"]["upload"] >= 0
    # evaluate fails (no eval embeddings) while the weights and gallery upload: none is left
    with pytest.raises(FileNotFoundError):
        run("r2", s1, tmp_path / "missing.npz")
    assert list(s3_store.list(layout.candidate_prefix("r2"))) == []
