"""What the eval cache (steps.eval_cache) takes off a refresh, at bench_ct.py's sizes.

    .venv/bin/python bench/bench_eval_cache.py [--data ../shared/data/mnist] [--reps 3] [--smoke]

One process, a moto S3 server in a thread. A model of the default network (trained for
one epoch on 1,000 digits: its speed is the real model's, its accuracy is not read) is
production, with a gallery of bench_ct's 50,000 history digits. Then, alternately, the two
things a refresh did before the cache and what it does now, each --reps times:

  eval set    embed the 10k test digits with production's weights (steps.embed) and
              write them to the cache  |  read them from the cache
  production  production's top-1 on the eval set: its gallery loaded and voted with the
              eval embeddings (steps.evaluate, k=50), then cached  |  read from the cache

Printed: the seconds of each, the median per side and what the cache takes off. bench_ct.py
measures the whole refresh against a full retrain (the goal); this isolates the part the
cache changes, so that it can be measured when full retrains take too long to compare. --smoke: a
gallery of 1,000 and 500 eval images, one run (seconds; nothing to read in the figures).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mnist"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run")
    args = ap.parse_args(argv)
    n_gallery, n_eval, reps = (1000, 500, 1) if args.smoke else (50000, None, args.reps)

    import numpy as np

    from devkit.localservices import scratch_bucket
    from steps import eval_cache
    from steps.embed import embed_arrays, load_for_embedding
    from steps.evaluate import knn_predict, vote_tag
    from steps.index import build_index, load_index
    from steps.train import train

    with np.load(Path(args.data) / "train.npz") as d:
        order = np.random.default_rng(0).permutation(len(d["y"]))   # bench_ct's history
        hx, hy = d["x"][order][:n_gallery], d["y"][order][:n_gallery]
    with np.load(Path(args.data) / "test.npz") as d:
        ex, ey = d["x"][:n_eval], d["y"][:n_eval]
    with scratch_bucket("bench-eval-cache") as (store, work):
        (work / "small").mkdir()
        np.savez(work / "small" / "data.npz", x=hx[:1000], y=hy[:1000])
        train(str(work / "small"), str(work / "model"), {"epochs": 1, "val_fraction": 0.0})
        embedder = load_for_embedding(str(work / "model"))
        embed_arrays(str(work / "model"), hx, hy, str(work / "gallery.npz"), embedder=embedder)
        build_index(str(work / "gallery.npz"), str(work / "index"))
        weights, gallery = eval_cache.weights_fingerprint(work / "model"), eval_cache.gallery_fingerprint(work / "index")
        out = work / "eval.npz"

        def before(rep):
            """A refresh before the cache (entries written, so that 'now' finds them)."""
            t0 = time.perf_counter()
            embed_arrays(str(work / "model"), ex, ey, str(out), embedder=embedder)
            eval_cache.put_eval_embeddings(store, weights, f"e{rep}", out)
            t1 = time.perf_counter()
            index, labels = load_index(work / "index")
            with np.load(out) as z:
                top1 = float((knn_predict(index, labels, z["emb"]) == z["y"]).mean())
            eval_cache.put_score(store, eval_cache.score_key(weights, gallery, f"e{rep}", vote_tag(50)), top1, len(ey))
            return t1 - t0, time.perf_counter() - t1

        def now(rep):
            t0 = time.perf_counter()
            assert eval_cache.get_eval_embeddings(store, weights, f"e{rep}", out, ey)
            t1 = time.perf_counter()
            assert eval_cache.get_score(store, eval_cache.score_key(weights, gallery, f"e{rep}", vote_tag(50))) is not None
            return t1 - t0, time.perf_counter() - t1

        rows = {"before": [], "now": []}
        for rep in range(reps):
            rows["before"].append(before(rep))
            rows["now"].append(now(rep))
        print(f"eval set {len(ey)} images, gallery {len(hy)} images; seconds per run, {reps} runs alternated")
        for side, got in rows.items():
            print(f"  {side:<7} eval set: {' '.join(f'{a:.2f}' for a, _ in got)}   production's score: "
                  f"{' '.join(f'{b:.2f}' for _, b in got)}")
        med = {side: (statistics.median(a for a, _ in got), statistics.median(b for _, b in got))
               for side, got in rows.items()}
        saved = sum(med["before"]) - sum(med["now"])
        print(f"medians: before {med['before'][0]:.2f} + {med['before'][1]:.2f} s, now {med['now'][0]:.2f} + "
              f"{med['now'][1]:.2f} s: the cache takes {saved:.2f} s off each refresh's embed and evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
