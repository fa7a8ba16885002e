"""kNN evaluation on the fixed eval set and the deploy decision.

    python -m steps.evaluate --index-dir I --eval-emb eval_emb.npz --out-dir O
                             [--production-version 3 --production-top1 0.9821] [--k 5]
                             [--store ROOT --model NAME --eval-npz eval.npz]

Writes metrics.json, confusion.csv and confusion.png (a labelled heatmap with counts,
steps.heatmap).
The decision is "deploy" when top-1 clears the floor and does not regress against the
production model (measured on the same eval set) by more than the tolerance. With
--store and --model, production is the registry's production version, downloaded
(refused when torn) and measured on --eval-npz.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from steps.layout import DATA_CARD_JSON, METRICS_JSON
from steps.reuse import LINEAGE_JSON

N_CLASSES = 10
# The vote evaluated is the one served (serving.model.LoadedModel.predict): the k nearest
# gallery rows each vote with exp(VOTE_SCALE * (cosine - 1)), so one near neighbour
# outweighs several far ones and a few new images close to a query are heard among the
# many older ones around it (a refresh's added images). Chosen on one set of embeddings
# against the cosine-weighted k=5 vote it replaces: docs/continuous-training.md ("The vote").
DEFAULT_K = 50
VOTE_SCALE = 20.0
# Totals closer than this (relative) go to vote_row: far above the float error of 50 terms.
NEAR_TIE = 1e-9
CONFUSION_PNG, CONFUSION_CSV = "confusion.png", "confusion.csv"


def knn_predict(index, gallery_labels: np.ndarray, queries: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """Label per query by vote() of its k nearest gallery rows."""
    return vote(*search(index, queries, k), gallery_labels)


def search(index, queries: np.ndarray, k: int = DEFAULT_K) -> tuple[np.ndarray, np.ndarray]:
    """(sims, ids) of each query's min(k, gallery size) nearest rows, nearest first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))


def is_exact(index) -> bool:
    """An exhaustive inner-product index: its neighbours of a query do not depend on the
    other rows, so lists from parts of the gallery merge into the whole's."""
    import faiss
    return isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT


def search_appended(index, base_n: int, base: tuple[np.ndarray, np.ndarray], queries: np.ndarray,
                    k: int = DEFAULT_K) -> tuple[np.ndarray, np.ndarray]:
    """search() of an exact index whose first base_n rows were searched already (``base``:
    their (sims, ids) for the same queries and k), such as a refresh's gallery, which is
    production's with the new images appended: only the appended rows are searched, so
    the cost follows the new images, not the history. The two lists merge nearest first;
    on equal similarity the base's row (the lower id) comes first."""
    import faiss

    if not is_exact(index):
        raise ValueError(f"search_appended needs an exact index, not {type(index).__name__}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    base_sims, base_ids = base
    k, added = min(k, index.ntotal), index.ntotal - base_n
    if added <= 0:
        return base_sims[:, :k], base_ids[:, :k]
    part = faiss.IndexFlatIP(index.d)
    part.add(index.reconstruct_n(base_n, added))
    sims, ids = part.search(q, min(k, added))
    sims = np.concatenate([base_sims, sims], axis=1)
    ids = np.concatenate([base_ids.astype(np.int64), np.where(ids >= 0, ids + base_n, -1)], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def neighbour_labels(ids: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Label of each neighbour (int64); -1 where an approximate index came up short (id -1)."""
    labels = gallery_labels[ids].astype(np.int64)   # id -1 reads the last row: overwritten below
    short = ids < 0
    if short.any():
        labels[short] = -1
    return labels


def vote(sims: np.ndarray, ids: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """vote_row() of every query, with numpy (an eval set is 10k queries by 50 neighbours,
    0.2 s in the loop); -1 ids do not vote. A query whose two highest totals come within
    NEAR_TIE of each other is decided by vote_row itself, so numpy's exp and summation
    cannot name another label than the served vote would."""
    labels = neighbour_labels(ids, gallery_labels)
    n, k = labels.shape if labels.ndim == 2 else (len(labels), 0)
    if n == 0 or k == 0 or not (labels >= 0).any():
        return np.zeros(n, dtype=np.int64)
    weights = np.exp(VOTE_SCALE * (np.asarray(sims, dtype=np.float64) - 1.0))
    voters = labels >= 0
    totals = np.zeros((n, int(labels.max()) + 1))
    rows = np.arange(n)
    for j in range(k):   # nearest first, one neighbour of every query at a time
        mask = voters[:, j]
        totals[rows[mask], labels[mask, j]] += weights[mask, j]
    pred = totals.argmax(1)
    if totals.shape[1] > 1:
        top2 = np.partition(totals, -2, axis=1)[:, -2:]
        close = top2[:, 1] - top2[:, 0] <= NEAR_TIE * top2[:, 1]
    else:
        close = totals[:, 0] == 0
    for i in np.flatnonzero(close):
        pred[i] = vote_row(sims[i].tolist(), labels[i].tolist())
    return pred.astype(np.int64)


def vote_row(sims: list[float], labels: list[int]) -> int:
    """The label of one query from its neighbours, nearest first (label -1: no neighbour):
    each votes with exp(VOTE_SCALE * (sim - 1)); exact ties go to the label met first (the
    nearer). No neighbour at all: class 0. Plain Python on purpose: the server votes per
    request, where a dozen numpy calls cost more than the loop."""
    votes: dict[int, float] = {}
    for sim, label in zip(sims, labels, strict=True):
        if label >= 0:
            votes[label] = votes.get(label, 0.0) + math.exp(VOTE_SCALE * (sim - 1.0))
    # max() keeps the first of equals, and labels entered nearest first: ties go to the nearest.
    return max(votes, key=votes.__getitem__) if votes else 0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    cm = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    ok = (y_true < N_CLASSES) & (y_pred < N_CLASSES)
    np.add.at(cm, (y_true[ok].astype(np.int64), y_pred[ok].astype(np.int64)), 1)
    return cm


def decide(top1: float, production: dict | None, floor: float, tolerance: float) -> tuple[str, str]:
    """("deploy"|"hold", a sentence with the numbers behind it)."""
    pct = f"{top1:.2%}"
    if top1 < floor:
        return "hold", f"hold: top-1 {pct} is below the {floor:.2%} floor"
    if not production or production.get("top1") is None:
        return "deploy", f"deploy: top-1 {pct} clears the {floor:.2%} floor; no production model yet"
    p_top1, version = float(production["top1"]), production.get("version")
    delta_pp = (top1 - p_top1) * 100
    vs = f"production v{version} ({p_top1:.2%})"
    if top1 + 1e-12 < p_top1 - tolerance:
        return "hold", (f"hold: top-1 {pct} regresses {-delta_pp:.2f} pp vs {vs}, beyond the "
                        f"{tolerance * 100:.2f} pp tolerance")
    tail = "" if delta_pp >= 0 else f", within the {tolerance * 100:.2f} pp tolerance"
    return "deploy", f"deploy: top-1 {pct} clears the {floor:.2%} floor and is {delta_pp:+.2f} pp vs {vs}{tail}"


def plot_confusion(cm: np.ndarray, top1: float, path: str | Path, title: str = "") -> None:
    from steps.heatmap import draw_confusion
    draw_confusion(cm, title or f"kNN top-1 {top1:.2%} on {int(cm.sum())} eval images", path)


def write_confusion_csv(cm: np.ndarray, path: str | Path) -> None:
    lines = ["true\\pred," + ",".join(str(j) for j in range(N_CLASSES))]
    lines += [f"{i}," + ",".join(str(int(v)) for v in cm[i]) for i in range(N_CLASSES)]
    Path(path).write_text("\n".join(lines) + "\n")


def evaluate(index_dir: str, eval_emb_path: str, out_dir: str, *, production: dict | None = None,
             floor: float = 0.97, tolerance: float = 0.002, k: int = DEFAULT_K,
             production_from: str | None = None, neighbours: tuple | None = None,
             searched: dict | None = None) -> dict:
    """``neighbours``: the eval embeddings' (sims, ids) in the index, found already
    (search_appended); else the index is searched. ``searched`` goes into metrics.json."""
    from steps.index import LABELS_FILE, load_index

    t0 = time.time()
    with np.load(eval_emb_path) as d:
        q, y = d["emb"], d["y"].astype(np.int64)
    if len(q) == 0:
        raise ValueError(f"{eval_emb_path} holds no eval embeddings")
    if neighbours is None:
        index, labels = load_index(index_dir)
        neighbours = search(index, q, k)
    else:
        labels = np.load(Path(index_dir) / LABELS_FILE)
    pred = vote(*neighbours, labels)
    top1 = float((pred == y).mean())
    cm = confusion_matrix(y, pred)
    support = cm.sum(1)
    per_class = {str(i): (round(float(cm[i, i] / support[i]), 5) if support[i] else None)
                 for i in range(N_CLASSES)}
    production = dict(production) if production and production.get("top1") is not None else None
    decision, reason = decide(top1, production, floor, tolerance)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(cm, top1, out / CONFUSION_PNG,
                   f"kNN top-1 {top1:.2%} (k={k}) on {len(y)} eval images")
    write_confusion_csv(cm, out / CONFUSION_CSV)
    result = {"top1": round(top1, 6), "per_class": per_class, "confusion": cm.tolist(),
              "n": int(len(y)), "k": int(k), "production": production, "decision": decision,
              "reason": reason, "floor": floor, "tolerance": tolerance,
              "seconds": round(time.time() - t0, 2)}
    if production_from:
        result["production_from"] = production_from
    if searched:
        result["searched"] = searched
    (out / METRICS_JSON).write_text(json.dumps(result, indent=1))
    return result


def evaluate_package(package_dir: str, eval_npz: str, k: int = DEFAULT_K) -> float:
    """Top-1 of a published model package (its own export and index) on an eval set of
    images (npz x, y): how the production model is measured on the same eval set."""
    from steps.index import load_index
    from steps.model import embed_images, load_embedder

    with np.load(eval_npz) as d:
        x, y = d["x"], d["y"].astype(np.int64)
    emb = embed_images(load_embedder(package_dir), x).numpy()
    index, labels = load_index(package_dir)
    return float((knn_predict(index, labels, emb, k) == y).mean())


def measure_version(store, model_name: str, version: int, eval_npz: str, k: int = DEFAULT_K) -> dict:
    """{"version", "top1"} of one published version on eval_npz (downloaded, hashes checked)."""
    from steps import deploy as registry

    with tempfile.TemporaryDirectory() as pkg:
        try:
            registry.download_version(store, model_name, version, pkg)
        except ValueError as e:
            raise _torn_production(e) from None
        return {"version": version, "top1": float(evaluate_package(pkg, eval_npz, k))}


def _torn_production(e: ValueError) -> ValueError:
    return ValueError(f"cannot compare with production: {e}; roll back to a whole version "
                      "or promote a run to replace it")


def vote_tag(k: int) -> str:
    """The vote in a cached score's key (steps.eval_cache): another k or weighting is another score."""
    return f"k{int(k)}-s{VOTE_SCALE:g}"


def production_score(store, model_name: str, eval_emb: str, eval_images, k: int = DEFAULT_K, *,
                     reused: dict | None = None, eval_fp: str | None = None,
                     base: dict | None = None) -> tuple[dict | None, str | None]:
    """(production's {"version", "top1"} on the eval set, where the figure came from):
    "cache" (the score its weights and gallery got on this eval set before, found by
    production's manifest, so nothing is downloaded; needs ``eval_fp``), "gallery" (a
    refresh: ``reused`` production's gallery voted with the candidate's eval embeddings,
    the same weights'; ``base``, from refresh_base(), has its neighbours found already), or
    "measured" (its package downloaded and the eval images, ``eval_images()``, embedded).
    (None, None) before the first deploy. What was measured goes into the cache. A torn
    production package fails the step: a comparison against it would be meaningless, and
    deploying over it unmeasured could replace a better model."""
    from steps import deploy as registry
    from steps import eval_cache

    alias = registry.read_alias(store, model_name)
    if not alias or alias.get("version") is None:
        return None, None
    version = int(alias["version"])
    key = None
    if eval_fp:
        try:
            manifest = registry.verify_package(store, model_name, version, check_hashes=False)
        except ValueError as e:
            raise _torn_production(e) from None
        try:
            key = eval_cache.score_key(*eval_cache.manifest_fingerprints(manifest), eval_fp, vote_tag(k))
        except (KeyError, ValueError):   # a package without weights or gallery files: not cacheable
            key = None
        top1 = eval_cache.get_score(store, key) if key else None
        if top1 is not None:
            return {"version": version, "top1": top1}, "cache"
    if reused and reused.get("version") == version:
        with np.load(eval_emb) as d:
            q, y = d["emb"], d["y"].astype(np.int64)
        if base is not None:
            pred = vote(base["sims"], base["ids"], base["labels"])
        else:
            from steps.index import load_index
            index, labels = load_index(reused["index_dir"])
            pred = knn_predict(index, labels, q, k)
        production, source = {"version": version, "top1": float((pred == y).mean())}, "gallery"
    else:
        production, source = measure_version(store, model_name, version, eval_images(), k), "measured"
    if key:
        with np.load(eval_emb) as d:
            eval_cache.put_score(store, key, production["top1"], len(d["y"]))
    return production, source


def refresh_base(store, reused: dict, queries: np.ndarray, k: int = DEFAULT_K,
                 eval_fp: str | None = None) -> dict | None:
    """Production's gallery as a refresh reuses it (``reused["index_dir"]``: its weights and
    index), with each eval embedding's nearest rows in it: {"n", "labels", "sims", "ids",
    "from": "cache"|"searched"}. From the store's cache (steps.eval_cache) when production's
    own run left them there (only exact galleries' are), else searched once and cached.
    None for an approximate index, whose neighbours do not merge."""
    from steps import eval_cache
    from steps.index import LABELS_FILE, load_index

    base_dir = Path(reused["index_dir"])
    labels = np.load(base_dir / LABELS_FILE)
    key = None
    if eval_fp:
        try:
            key = eval_cache.neighbours_key(eval_cache.weights_fingerprint(base_dir),
                                            eval_cache.gallery_fingerprint(base_dir), eval_fp, k)
        except ValueError:   # no weight files beside the gallery: not cacheable
            key = None
    found = eval_cache.get_neighbours(store, key, len(queries), k) if key else None
    source = "cache"
    if found is None:
        index, _ = load_index(base_dir)
        if not is_exact(index):
            return None
        found, source = search(index, queries, k), "searched"
        if key:
            eval_cache.put_neighbours(store, key, *found)
    return {"n": int(len(labels)), "labels": labels, "sims": found[0], "ids": found[1], "from": source}


def candidate_neighbours(index_dir: str, queries: np.ndarray, k: int = DEFAULT_K,
                         base: dict | None = None) -> tuple[tuple, dict, bool]:
    """(the eval embeddings' (sims, ids) in the candidate's gallery, what was searched
    {"rows", "of", "base_from"}, whether the index is exact). With ``base`` (a refresh) and
    a gallery that starts with the base's rows, only the appended rows are searched."""
    from steps.index import load_index

    index, labels = load_index(index_dir)
    exact = is_exact(index)
    if (base is not None and exact and index.ntotal >= base["n"]
            and np.array_equal(labels[:base["n"]], base["labels"])):
        return (search_appended(index, base["n"], (base["sims"], base["ids"]), queries, k),
                {"rows": int(index.ntotal - base["n"]), "of": int(index.ntotal), "base_from": base["from"]}, exact)
    return search(index, queries, k), {"rows": int(index.ntotal), "of": int(index.ntotal)}, exact


def evaluate_against_production(store_root: str, model_name: str, index_dir: str, eval_emb: str,
                                eval_images, out_dir: str, *, floor: float = 0.97,
                                tolerance: float = 0.002, k: int = DEFAULT_K,
                                reused: dict | None = None, model_dir: str | None = None,
                                eval_fp: str | None = None) -> dict:
    """evaluate() with production measured on the same eval set (production_score();
    ``eval_images``: a callable returning the eval images' npz, x and y, read only if
    production must be embedded; the candidate's own embeddings of them in eval_emb).
    A refresh (``reused``) searches only the rows it appended to production's gallery
    (refresh_base(), candidate_neighbours()). With ``model_dir`` (the candidate's weights)
    and ``eval_fp`` the candidate's score and its exact neighbours go into the store's
    cache (steps.eval_cache), where a later run finds them once the candidate is
    production. metrics.json says where production's figure came from (``production_from``)
    and how many gallery rows were searched (``searched``)."""
    from steps import eval_cache
    from steps.laps import Laps
    from steps.storage import open_store

    lap = Laps()
    store = open_store(store_root)
    with np.load(eval_emb) as d:
        queries = d["emb"]
    base = refresh_base(store, reused, queries, k, eval_fp) if reused else None
    lap("production_neighbours")
    production, source = production_score(store, model_name, eval_emb, eval_images, k,
                                          reused=reused, eval_fp=eval_fp, base=base)
    lap("production_score")
    neighbours, searched, exact = candidate_neighbours(index_dir, queries, k, base)
    lap("search")
    result = evaluate(index_dir, eval_emb, out_dir, production=production, floor=floor,
                      tolerance=tolerance, k=k, production_from=source, neighbours=neighbours,
                      searched=searched)
    lap("vote_and_confusion")
    result["timings"] = lap.seconds
    if model_dir and eval_fp:
        weights, gallery = eval_cache.weights_fingerprint(model_dir), eval_cache.gallery_fingerprint(index_dir)
        eval_cache.put_score(store, eval_cache.score_key(weights, gallery, eval_fp, vote_tag(k)),
                             result["top1"], result["n"])
        if exact:   # what a refresh of this candidate, once production, merges with
            eval_cache.put_neighbours(store, eval_cache.neighbours_key(weights, gallery, eval_fp, k), *neighbours)
        lap("cache")
    return result


# Written by upload_candidate() once evaluate has its result, metrics.json last, so a
# candidate whose metrics.json is there is whole.
RESULT_FILES = (LINEAGE_JSON, DATA_CARD_JSON, METRICS_JSON)


def upload_candidate_files(store_root: str, run_id: str, *, model_dir: str, index_dir: str) -> list[str]:
    """The bulk of the candidate package, its weights and gallery (index_dir's files over
    model_dir's of the same name: a refresh's model_dir holds production's gallery), which
    do not depend on evaluate's result: the pipeline uploads them while evaluate computes.
    Returns their keys."""
    from steps import layout
    from steps.storage import open_store

    files = {}
    for src in (model_dir, index_dir):
        root = Path(src)
        files.update({p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()})
    for name in RESULT_FILES:
        files.pop(name, None)
    store, prefix = open_store(store_root), layout.candidate_prefix(run_id)
    store.map(lambda item: store.upload_file(item[1], prefix + item[0]), files.items())
    return [prefix + name for name in files]


def upload_candidate(store_root: str, run_id: str, *, model_dir: str, index_dir: str,
                     eval_dir: str, data_card: str, added: str | None = None,
                     uploaded: list[str] | None = None) -> list[str]:
    """Put the run's confusion matrix and its candidate package (model, index, labels,
    metrics, data card, params, lineage) into the store, whatever the decision: a held
    candidate is what 'Promote anyway' publishes. Returns the package keys. ``added``: a
    refresh's added.json (embed), the images and objects appended to the gallery.
    ``uploaded``: upload_candidate_files() ran already (its keys); else it runs here."""
    from steps import layout
    from steps.reuse import read_lineage
    from steps.storage import open_store

    store = open_store(store_root)
    if uploaded is None:
        uploaded = upload_candidate_files(store_root, run_id, model_dir=model_dir, index_dir=index_dir)
    ev = Path(eval_dir)
    for name, key in ((CONFUSION_PNG, layout.confusion_png_key(run_id)),
                      (CONFUSION_CSV, layout.confusion_csv_key(run_id))):
        if (ev / name).exists():
            store.upload_file(ev / name, key)
    lineage = read_lineage(model_dir)
    if added and Path(added).is_file():
        lineage.update(json.loads(Path(added).read_text()))
    prefix = layout.candidate_prefix(run_id)
    results = {LINEAGE_JSON: json.dumps(lineage, indent=1).encode(),
               DATA_CARD_JSON: Path(data_card).read_bytes(),
               METRICS_JSON: (ev / METRICS_JSON).read_bytes()}
    for name in RESULT_FILES:   # in order: metrics.json last
        store.put_bytes(prefix + name, results[name])
    return sorted([*uploaded, *(prefix + name for name in RESULT_FILES)])


def evaluate_and_upload(store_root: str, model_name: str, run_id: str, *, model_dir: str, index_dir: str,
                        eval_emb: str, eval_images, eval_dir: str, data_card: str, added: str | None = None,
                        floor: float = 0.97, tolerance: float = 0.002, reused: dict | None = None,
                        eval_fp: str | None = None) -> dict:
    """The pipeline's evaluate: evaluate_against_production() while the candidate's weights
    and gallery go up to the store (upload_candidate_files() in a thread: the upload waits
    on the store while evaluate keeps the CPU), then the rest of the package
    (upload_candidate()). If evaluate fails, what was uploaded is deleted, so no candidate
    without metrics.json is left behind. The result's ``timings`` include ``upload``, the
    wait for the weights and gallery plus the rest of the package."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import suppress

    from steps import layout
    from steps.storage import open_store

    with ThreadPoolExecutor(1) as pool:
        bulk = pool.submit(upload_candidate_files, store_root, run_id, model_dir=model_dir, index_dir=index_dir)
        try:
            result = evaluate_against_production(store_root, model_name, index_dir, eval_emb, eval_images,
                                                 eval_dir, floor=floor, tolerance=tolerance, reused=reused,
                                                 model_dir=model_dir, eval_fp=eval_fp)
        except BaseException:
            with suppress(Exception):   # a failed upload leaves part of it: deleted all the same
                bulk.result()
            store, prefix = open_store(store_root), layout.candidate_prefix(run_id)
            for o in list(store.list(prefix)):
                store.delete(o.key)
            raise
        t0 = time.perf_counter()
        uploaded = bulk.result()
    upload_candidate(store_root, run_id, model_dir=model_dir, index_dir=index_dir, eval_dir=eval_dir,
                     data_card=data_card, added=added, uploaded=uploaded)
    result["timings"]["upload"] = round(time.perf_counter() - t0, 3)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index-dir", required=True)
    ap.add_argument("--eval-emb", required=True, help="npz with emb and y, from embed")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--production-version", type=int)
    ap.add_argument("--production-top1", type=float)
    ap.add_argument("--floor", type=float, default=0.97)
    ap.add_argument("--tolerance", type=float, default=0.002)
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours that vote (vote_row)")
    ap.add_argument("--store", help="compare with this registry's production model")
    ap.add_argument("--model", default="mnist-arcface")
    ap.add_argument("--eval-npz", help="the eval images (x, y) behind --eval-emb; with --store")
    args = ap.parse_args(argv)
    if args.store:
        if not args.eval_npz:
            ap.error("--store needs --eval-npz: production is measured on the eval images")
        r = evaluate_against_production(args.store, args.model, args.index_dir, args.eval_emb,
                                        lambda: args.eval_npz, args.out_dir, floor=args.floor,
                                        tolerance=args.tolerance, k=args.k)
        print(json.dumps({k: v for k, v in r.items() if k != "confusion"}))
        return 0
    production = None
    if args.production_top1 is not None:
        production = {"version": args.production_version, "top1": args.production_top1}
    r = evaluate(args.index_dir, args.eval_emb, args.out_dir, production=production,
                 floor=args.floor, tolerance=args.tolerance, k=args.k)
    print(json.dumps({k: v for k, v in r.items() if k != "confusion"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
