"""embed -> index -> evaluate, and the deploy decision, on a tiny trained model."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from steps.embed import embed
from steps.evaluate import decide, evaluate, evaluate_package, knn_predict, vote, vote_row
from steps.index import build_index, load_index
from steps.model import load_embedder, optimize_for_cpu
from steps.synthetic import make_digits
from steps.train import train


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny model trained for 2 epochs on synthetic digits, its gallery and eval embeddings."""
    d = tmp_path_factory.mktemp("run")
    x, y = make_digits(400, seed=31)
    ex, ey = make_digits(100, seed=32)
    np.savez(d / "data.npz", x=x, y=y)
    np.savez(d / "eval.npz", x=ex, y=ey)
    train(str(d), str(d / "model"), {"epochs": 2, "batch_size": 32, "threads": 1, "val_fraction": 0})
    embed(str(d / "model"), str(d / "data.npz"), str(d / "gallery.npz"))
    embed(str(d / "model"), str(d / "eval.npz"), str(d / "eval_emb.npz"))
    build_index(str(d / "gallery.npz"), str(d / "index"))
    return d


def unit_rows(n, dim, seed):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_embed_writes_normalised_embeddings_with_labels(pipeline):
    with np.load(pipeline / "gallery.npz") as g, np.load(pipeline / "data.npz") as d:
        assert g["emb"].dtype == np.float32 and g["emb"].shape == (400, 128)
        np.testing.assert_allclose(np.linalg.norm(g["emb"], axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(g["y"], d["y"])


def test_embed_from_checkpoint_equals_export(pipeline, tmp_path):
    embed(str(pipeline / "model"), str(pipeline / "eval.npz"), str(tmp_path / "ckpt.npz"), prefer="checkpoint")
    with np.load(tmp_path / "ckpt.npz") as a, np.load(pipeline / "eval_emb.npz") as b:
        np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_kinds_find_exact_neighbours(tmp_path, kind):
    emb = unit_rows(500, 16, seed=1)
    np.savez(tmp_path / "g.npz", emb=emb, y=np.arange(500) % 10)
    info = build_index(str(tmp_path / "g.npz"), str(tmp_path / kind), kind=kind)
    assert (info["kind"], info["n"], info["dim"]) == (kind, 500, 16)
    index, labels = load_index(tmp_path / kind)
    sims, ids = index.search(emb[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= (1.0 if kind == "flat" else 0.9)
    np.testing.assert_array_equal(labels, np.arange(500) % 10)
    assert json.loads((tmp_path / kind / "index.json").read_text())["kind"] == kind


def test_unknown_index_kind(tmp_path):
    np.savez(tmp_path / "g.npz", emb=unit_rows(5, 4, 0), y=np.zeros(5))
    with pytest.raises(ValueError, match="unknown index kind 'lsh': use one of flat, ivf, hnsw"):
        build_index(str(tmp_path / "g.npz"), str(tmp_path), kind="lsh")


def test_knn_vote_and_top1_on_known_embeddings(tmp_path):
    # gallery: 3 points of class 1 near e0, 2 points of class 2 nearer to e0
    g = np.array([[1, 0.30, 0], [1, 0.35, 0], [1, 0.4, 0], [1, 0.1, 0], [1, 0.12, 0], [0, 0, 1]], np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    gy = np.array([1, 1, 1, 2, 2, 7])
    np.savez(tmp_path / "g.npz", emb=g, y=gy)
    build_index(str(tmp_path / "g.npz"), str(tmp_path / "idx"))
    index, labels = load_index(tmp_path / "idx")
    q = np.array([[1, 0, 0], [0, 0.1, 1]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert knn_predict(index, labels, q, k=1).tolist() == [2, 7]
    # Votes weigh by exp(VOTE_SCALE * (cos - 1)): class 2's two neighbours (cos 0.995, 0.993)
    # outweigh class 1's three (0.958, 0.944, 0.928), 1.77 against 1.00...
    assert knn_predict(index, labels, q, k=5).tolist() == [2, 7]
    # ...a 2-2 split goes to the nearer pair, and k beyond the gallery is the whole gallery.
    assert knn_predict(index, labels, q, k=4).tolist() == [2, 7]
    assert knn_predict(index, labels, q, k=50).tolist() == [2, 7]

    np.savez(tmp_path / "q.npz", emb=q, y=np.array([1, 7]))
    r = evaluate(str(tmp_path / "idx"), str(tmp_path / "q.npz"), str(tmp_path / "out"), floor=0.4, k=1)
    assert r["top1"] == 0.5 and r["n"] == 2 and r["k"] == 1
    assert r["per_class"]["1"] == 0.0 and r["per_class"]["7"] == 1.0 and r["per_class"]["0"] is None
    assert r["confusion"][1][2] == 1 and r["confusion"][7][7] == 1 and sum(map(sum, r["confusion"])) == 2
    assert r["decision"] == "deploy"


def test_evaluate_writes_metrics_csv_and_png(pipeline, tmp_path):
    r = evaluate(str(pipeline / "index"), str(pipeline / "eval_emb.npz"), str(tmp_path), floor=0.0)
    assert r["n"] == 100 and 0.0 <= r["top1"] <= 1.0
    cm = np.array(r["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == 100 and np.trace(cm) == round(r["top1"] * 100)
    assert json.loads((tmp_path / "metrics.json").read_text())["top1"] == r["top1"]
    rows = list(csv.reader(open(tmp_path / "confusion.csv")))
    assert rows[0] == ["true\\pred"] + [str(i) for i in range(10)]
    assert np.array([[int(v) for v in row[1:]] for row in rows[1:]]).tolist() == r["confusion"]
    png = Image.open(tmp_path / "confusion.png")
    assert png.size[0] >= 600 and png.size[1] >= 500


def test_evaluate_package_measures_a_published_model(pipeline, tmp_path):
    import shutil
    pkg = tmp_path / "pkg"
    shutil.copytree(pipeline / "model", pkg)
    for f in ("index.faiss", "labels.npy"):
        shutil.copy(pipeline / "index" / f, pkg / f)
    top1 = evaluate_package(str(pkg), str(pipeline / "eval.npz"))
    r = evaluate(str(pipeline / "index"), str(pipeline / "eval_emb.npz"), str(tmp_path / "e"))
    assert top1 == pytest.approx(r["top1"], abs=1e-9)


@pytest.mark.parametrize("top1,production,decision,reason", [
    (0.961, None, "hold", "hold: top-1 96.10% is below the 97.00% floor"),
    (0.9852, None, "deploy", "deploy: top-1 98.52% clears the 97.00% floor; no production model yet"),
    (0.9852, {"version": 3, "top1": 0.9821}, "deploy",
     "deploy: top-1 98.52% clears the 97.00% floor and is +0.31 pp vs production v3 (98.21%)"),
    (0.9802, {"version": 3, "top1": 0.9847}, "hold",
     "hold: top-1 98.02% regresses 0.45 pp vs production v3 (98.47%), beyond the 0.20 pp tolerance"),
    (0.9840, {"version": 3, "top1": 0.9850}, "deploy",
     "deploy: top-1 98.40% clears the 97.00% floor and is -0.10 pp vs production v3 (98.50%), "
     "within the 0.20 pp tolerance"),
    (0.9830, {"version": 3, "top1": 0.9850}, "deploy",   # exactly at the tolerance still deploys
     "deploy: top-1 98.30% clears the 97.00% floor and is -0.20 pp vs production v3 (98.50%), "
     "within the 0.20 pp tolerance"),
])
def test_decision_and_reason(top1, production, decision, reason):
    assert decide(top1, production, floor=0.97, tolerance=0.002) == (decision, reason)


@pytest.mark.parametrize("delta,decision", [(0.01, "hold"), (-0.01, "deploy")])
def test_production_comparison_flows_into_the_result(pipeline, tmp_path, delta, decision):
    top1 = evaluate(str(pipeline / "index"), str(pipeline / "eval_emb.npz"), str(tmp_path / "a"))["top1"]
    prod = {"version": 2, "top1": round(top1 + delta, 4)}  # 1 pp better or worse than this model
    r = evaluate(str(pipeline / "index"), str(pipeline / "eval_emb.npz"), str(tmp_path / "b"), floor=0.0,
                 production=prod, tolerance=0.0)
    assert r["production"] == prod and r["top1"] == top1
    assert r["decision"] == decision and f"vs production v2 ({100 * prod['top1']:.2f}%)" in r["reason"]


def test_clis_embed_index_evaluate(pipeline, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])
    e = cli("steps.embed", "--model-dir", str(pipeline / "model"), "--npz", str(pipeline / "eval.npz"),
            "--out", str(tmp_path / "q.npz"))
    assert (e["n"], e["dim"]) == (100, 128)
    i = cli("steps.index", "--emb", str(pipeline / "gallery.npz"), "--out-dir", str(tmp_path / "idx"),
            "--kind", "hnsw")
    assert (i["kind"], i["n"]) == ("hnsw", 400)
    top1 = evaluate(str(pipeline / "index"), str(tmp_path / "q.npz"), str(tmp_path / "ev0"), k=3)["top1"]
    better = round(top1 + 0.01, 4)  # a production model 1 pp better: the CLI must hold
    r = cli("steps.evaluate", "--index-dir", str(pipeline / "index"), "--eval-emb", str(tmp_path / "q.npz"),
            "--out-dir", str(tmp_path / "ev"), "--production-version", "3", "--production-top1", str(better),
            "--floor", "0", "--k", "3")
    assert r["k"] == 3 and r["production"] == {"version": 3, "top1": better} and r["top1"] == top1
    assert r["decision"] == "hold" and f"vs production v3 ({100 * better:.2f}%)" in r["reason"]
    assert (tmp_path / "ev" / "confusion.png").is_file()


def test_cpu_optimised_embedder_matches_the_program_or_steps_aside(pipeline):
    program = load_embedder(pipeline / "model")
    fast, runtime = optimize_for_cpu(program)
    assert runtime == "torchscript" and fast is not program
    x = torch.rand(9, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(fast(x), program(x), atol=1e-5)

    def untraceable(batch):   # leaves torch: tracing it fails, so it serves as it is
        return torch.from_numpy(batch.numpy() * 1.0)
    assert optimize_for_cpu(untraceable) == (untraceable, "export")


def test_a_close_neighbour_outvotes_several_far_ones():
    # exp(20 * (0.98 - 1)) = 0.67 against 3 * exp(20 * (0.80 - 1)) = 0.05: the cosine-weighted
    # vote this replaced gave it to the three (0.98 against 2.40).
    assert vote_row([0.98, 0.80, 0.80, 0.80], [3, 5, 5, 5]) == 3
    # several close ones still outvote one a little closer: 2 * 0.67 against 0.82
    assert vote_row([0.99, 0.98, 0.98], [3, 5, 5]) == 5


def test_vote_row_ties_missing_neighbours_and_k1():
    assert vote_row([0.9, 0.9], [4, 6]) == 4                   # an exact tie: the nearer
    assert vote_row([0.3] * 4, [1, 6, 6, 1]) == 1              # equal sums: the label met first
    assert vote_row([0.99, 0.5], [-1, 8]) == 8                 # id -1 (no neighbour) does not vote
    assert vote_row([0.99, 0.98, 0.2], [-1, -1, 4]) == 4
    assert vote_row([0.4, 0.3], [-1, -1]) == 0                 # nobody votes: class 0, as before
    assert vote_row([-0.2, -0.3], [5, 6]) == 5                 # dissimilar neighbours still name one
    assert vote_row([0.2], [7]) == 7                           # k=1: the nearest's label
    assert vote_row([], []) == 0


def test_vote_matches_the_weighted_count_written_with_numpy():
    from steps.evaluate import VOTE_SCALE
    rng = np.random.default_rng(0)
    sims = -np.sort(-rng.uniform(-0.2, 1.0, (500, 8)).astype(np.float32), axis=1)
    ids = np.random.default_rng(1).integers(-1, 50, (500, 8))
    labels = np.arange(50) % 10
    counts = np.zeros((500, 11))   # column 10 collects the -1 ids, which do not vote
    votes_for = np.where(ids >= 0, labels[ids], 10)
    np.add.at(counts, (np.repeat(np.arange(500), 8), votes_for.ravel()),
              np.exp(VOTE_SCALE * (sims.astype(np.float64) - 1.0)).ravel())
    assert (vote(sims, ids, labels) == counts[:, :10].argmax(1)).all()


@pytest.mark.parametrize("base_n,added,k", [(300, 40, 50), (300, 0, 50), (20, 200, 50), (3, 2, 50), (300, 40, 1)])
def test_search_appended_finds_what_searching_the_whole_gallery_finds(base_n, added, k):
    """A refresh's gallery is production's with rows appended: production's neighbours
    merged with the appended rows' are the whole gallery's (and base_n < k, added < k,
    nothing added, k=1 are all the same search)."""
    import faiss

    from steps.evaluate import search, search_appended
    rng = np.random.default_rng(base_n + added + k)
    rows = rng.standard_normal((base_n + added, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = rng.standard_normal((64, 16)).astype(np.float32)
    base, whole = faiss.IndexFlatIP(16), faiss.IndexFlatIP(16)
    base.add(rows[:base_n])
    whole.add(rows)
    sims, ids = search_appended(whole, base_n, search(base, queries, k), queries, k)
    want_sims, want_ids = search(whole, queries, k)
    assert ids.shape == want_ids.shape == (64, min(k, base_n + added))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-6)


def test_search_appended_refuses_an_approximate_index():
    import faiss

    from steps.evaluate import search_appended
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(4), 4, 1, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match="needs an exact index, not IndexIVFFlat"):
        search_appended(ivf, 0, (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int64)),
                        np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("seed", range(6))
def test_vote_names_what_vote_row_names_query_by_query(seed):
    """vote() is vote_row() with numpy; on sims rounded to one decimal (exact ties between
    labels everywhere), -1 ids and labels past 9 the two still agree on every query."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 2000)), int(rng.integers(1, 60))
    sims = -np.sort(-rng.uniform(-1.0, 1.0, (n, k)).astype(np.float32), axis=1)
    if seed % 2 == 0:
        sims = np.round(sims, 1)
    ids = rng.integers(-1, 200, (n, k))
    labels = rng.integers(0, int(rng.integers(1, 14)), 200)
    by_row = [vote_row(s, [-1 if i < 0 else int(labels[i]) for i in row])
              for s, row in zip(sims.tolist(), ids.tolist(), strict=True)]
    assert vote(sims, ids, labels).tolist() == by_row


def test_vote_with_nobody_voting_names_class_0():
    assert vote(np.zeros((3, 2), np.float32), np.full((3, 2), -1), np.arange(5)).tolist() == [0, 0, 0]
    assert vote(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.int64), np.arange(5)).tolist() == []
