"""kNN vote rules on bench_ct's drift scenario: what a refresh recovers, what clean costs.

    .venv/bin/python bench/bench_vote.py [--data ../shared/data/mnist] [--models /tmp/bench-vote] [--smoke] [--gallery-augment]

--smoke: 1,000 history digits, batches of 100, 300 eval images, one epoch, a temporary work
dir; seconds, so that ./dev.sh bench --smoke keeps it running; nothing to read in its figures.

bench_ct.py's scenario (history 50,000 digits, five batches of 2,000 shifted ones, eval the
10k test set clean and shifted), without the pipeline: steps.train trains production on
history and the full reference on history + batch 1 with the default recipe (seed 0; kept
in --models and reused when there, about 2 x 4 epochs), steps.embed embeds everything, and
every vote rule is judged on the same embeddings:

  s0..s5   shifted top-1 of production's weights with 0..5 batches added to its gallery
           (a refresh after each batch; s0 = no update)
  c0..c5   the same on the clean eval
  fullC/S  the full retrain (history + batch 1) on its own gallery
  rec n    (s_n - s0) / (fullS - s0): the share of the no-update..full gap a refresh with
           n batches recovers (bench_ct's refresh_recovers_shifted, round n; its round n
           full has n batches, here the reference always has one)
  drift    max |c_n - c0|: bench_ct's refresh_clean (goal <= 0.05 pp)

The row marked * is steps.evaluate's rule (DEFAULT_K, VOTE_SCALE), what is evaluated and served.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

KMAX = 50


def prepare(data: Path, work: Path, n_hist: int = 50000, n_batch: int = 2000, n_eval: int | None = None) -> None:
    """History, the five shifted batches and both evals as npz files under work/data."""
    import numpy as np
    from bench_ct import shift

    out = work / "data"
    if (out / "hist1" / "data.npz").is_file():
        return
    (out / "hist").mkdir(parents=True, exist_ok=True)
    (out / "hist1").mkdir(exist_ok=True)
    with np.load(data / "train.npz") as d:
        order = np.random.default_rng(0).permutation(len(d["y"]))   # bench_ct's order
        x, y = d["x"][order], d["y"][order]
    with np.load(data / "test.npz") as d:
        ex, ey = d["x"][:n_eval], d["y"][:n_eval]
        np.savez(out / "eval_clean.npz", x=ex, y=ey)
        np.savez(out / "eval_shifted.npz", x=shift(ex), y=ey)
    for r in range(1, 6):
        lo = n_hist + (r - 1) * n_batch
        np.savez(out / f"batch{r}.npz", x=shift(x[lo:lo + n_batch]), y=y[lo:lo + n_batch])
    np.savez(out / "hist" / "data.npz", x=x[:n_hist], y=y[:n_hist])
    with np.load(out / "batch1.npz") as b:
        np.savez(out / "hist1" / "data.npz", x=np.concatenate([x[:n_hist], b["x"]]),
                 y=np.concatenate([y[:n_hist], b["y"]]))


TRAIN_PARAMS = {"seed": 0}


def work_dir(args, name: str) -> Path:
    """--models with the scenario's data in it; with --smoke a temporary one at tiny sizes,
    removed at exit, and one epoch of training."""
    if not args.smoke:
        prepare(Path(args.data), Path(args.models))
        return Path(args.models)
    import atexit
    import shutil
    import tempfile
    TRAIN_PARAMS["epochs"] = 1
    work = Path(tempfile.mkdtemp(prefix=f"{name}-smoke-"))
    atexit.register(shutil.rmtree, work, True)   # the smoke's models are thrown away
    prepare(Path(args.data), work, n_hist=1000, n_batch=100, n_eval=300)
    return work


def embedded(work: Path, model: str, part: str):
    """(embeddings, labels) of data/<part> by the model trained on data/<model's set>."""
    import numpy as np

    from steps.embed import embed
    from steps.train import train

    model_dir, out = work / "models" / model, work / "emb" / model / f"{part}.npz"
    if not (model_dir / "model_export.pt").is_file():
        print(f"training {model} (default recipe, seed 0)...", flush=True)
        train(str(work / "data" / model), str(model_dir), dict(TRAIN_PARAMS))
    if not out.is_file():
        src = work / "data" / part
        embed(str(model_dir), str(src / "data.npz" if src.is_dir() else src.with_suffix(".npz")), str(out))
    with np.load(out) as d:
        return d["emb"], d["y"].astype(np.int64)


def neighbours(gallery, labels, queries):
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery))
    sims, ids = index.search(np.ascontiguousarray(queries), KMAX)
    return sims, ids, labels


def rules() -> dict:
    """name -> (k, weight of a neighbour from its cosine): the old rule, then alternatives."""
    import numpy as np

    out = {"cos k=5 (before)": (5, lambda s: np.maximum(s, 0))}
    for k in (10, 20, 30, 50):
        out[f"cos k={k}"] = (k, lambda s: np.maximum(s, 0))
        for scale in (10, 20, 30, 40):
            out[f"exp({scale}(cos-1)) k={k}"] = (k, lambda s, a=scale: np.exp(a * (s - 1)))
        out[f"cos^16 k={k}"] = (k, lambda s: np.maximum(s, 0) ** 16)
        out[f"1/(1-cos)^2 k={k}"] = (k, lambda s: 1 / np.maximum(1 - s, 1e-6) ** 2)
        out[f"Dudani k={k}"] = (k, lambda s: (s - s[:, -1:]) / np.maximum(s[:, :1] - s[:, -1:], 1e-9))
    return out


def top1(found, y, k, weight=None) -> float:
    """Top-1 (%) of a rule over precomputed neighbours; weight None: steps.evaluate.vote."""
    import numpy as np

    from steps.evaluate import vote

    sims, ids, labels = found
    if weight is None:
        return float((vote(sims[:, :k], ids[:, :k], labels) == y).mean() * 100)
    w = weight(sims[:, :k].astype(np.float64))
    w[:, 0] += 1e-9   # exact ties to the nearest
    lab = labels[ids[:, :k]]
    return float((np.stack([(w * (lab == c)).sum(1) for c in range(10)], 1).argmax(1) == y).mean() * 100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mnist"))
    ap.add_argument("--models", default="/tmp/bench-vote", help="work dir: data, models, embeddings (reused)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds, nothing judged")
    ap.add_argument("--gallery-augment", action="store_true",
                    help="the served rule with each batch added with augmented copies (AUGMENTS)")
    args = ap.parse_args(argv)

    import numpy as np

    from steps.evaluate import DEFAULT_K, VOTE_SCALE

    work = work_dir(args, "bench-vote")
    h, hy = embedded(work, "hist", "hist")
    batches = [embedded(work, "hist", f"batch{r}") for r in range(1, 6)]
    evals = {ev: embedded(work, "hist", f"eval_{ev}") for ev in ("clean", "shifted")}
    y = evals["clean"][1]
    found = {}
    for n in range(6):
        g = np.concatenate([h] + [b[0] for b in batches[:n]])
        gy = np.concatenate([hy] + [b[1] for b in batches[:n]])
        found.update({(ev, n): neighbours(g, gy, evals[ev][0]) for ev in evals})
    fg, fgy = embedded(work, "hist1", "hist1")
    for ev in evals:
        found[(ev, "full")] = neighbours(fg, fgy, embedded(work, "hist1", f"eval_{ev}")[0])
    now = f"* exp({VOTE_SCALE:g}(cos-1)) k={DEFAULT_K} (now)"
    if args.gallery_augment:
        print_table({now: (DEFAULT_K, None)}, found, y)
        for name in AUGMENTS:   # the same rule, each batch added with augmented copies of it
            extra = [embedded(work, "hist", augment(work, f"batch{r}", name)) for r in range(1, 6)]
            aug = dict(found)
            for n in range(1, 6):
                g = np.concatenate([h] + [b[0] for b in batches[:n]] + [e[0] for e in extra[:n]])
                gy = np.concatenate([hy] + [b[1] for b in batches[:n]] + [e[1] for e in extra[:n]])
                aug.update({(ev, n): neighbours(g, gy, evals[ev][0]) for ev in evals})
            print_table({f"  + {name}": (DEFAULT_K, None)}, aug, y, header=False)
        return 0
    table = {now: (DEFAULT_K, None), **rules()}
    print_table(table, found, y)
    return 0


# --gallery-augment: a refresh that adds each new image with copies of it moved the way
# training augments (rotation, shift), embedded with production's weights.
AUGMENTS = {"rotated +-6 deg": (("rot", 6), ("rot", -6)),
            "rotated +-10 deg": (("rot", 10), ("rot", -10)),
            "shifted 1 px, 4 ways": (("shift", (1, 0)), ("shift", (-1, 0)), ("shift", (0, 1)), ("shift", (0, -1)))}


def augment(work: Path, part: str, name: str) -> str:
    """data/<part>_<slug>.npz: the part's images once per move of AUGMENTS[name]; returns its part name."""
    import numpy as np
    from PIL import Image

    slug = "".join(c for c in name if c.isalnum())
    out = work / "data" / f"{part}_{slug}.npz"
    if not out.is_file():
        with np.load(work / "data" / f"{part}.npz") as d:
            x, y = d["x"], d["y"]
        moved = []
        for kind, v in AUGMENTS[name]:
            if kind == "rot":
                moved.append(np.stack([np.asarray(Image.fromarray(i).rotate(v, resample=Image.BILINEAR)) for i in x]))
            else:
                moved.append(np.roll(np.roll(x, v[0], axis=2), v[1], axis=1))
        np.savez(out, x=np.concatenate(moved), y=np.tile(y, len(moved)))
    return out.stem


def print_table(table: dict, found: dict, y, header: bool = True) -> None:
    if header:
            print(f"{'rule':<26}{'fullC':>6}{'fullS':>6}" + "".join(f"{'c' + str(n):>6}" for n in range(6))
              + "".join(f"{'s' + str(n):>6}" for n in range(6)) + f"{'drift':>6}  rec n=1..5 (min, mean)")
    for name, (k, weight) in table.items():
        c = [top1(found[("clean", n)], y, k, weight) for n in range(6)]
        s = [top1(found[("shifted", n)], y, k, weight) for n in range(6)]
        full = [top1(found[(ev, "full")], y, k, weight) for ev in ("clean", "shifted")]
        gap = full[1] - s[0]
        rec = [(s[n] - s[0]) / gap if gap > 0 else float("nan") for n in range(1, 6)]
        drift = max(abs(c[n] - c[0]) for n in range(1, 6))
        print(f"{name:<26}{full[0]:>6.2f}{full[1]:>6.2f}" + "".join(f"{v:>6.2f}" for v in c + s)
              + f"{drift:>6.2f}  " + " ".join(f"{r:.2f}" for r in rec)
              + f"  ({min(rec):.2f}, {sum(rec) / 5:.2f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
