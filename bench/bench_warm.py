"""mode=warm's schedule on bench_ct's drift scenario: how many of production's first conv
layers to keep (freeze), what each costs and what it changes.

    .venv/bin/python bench/bench_warm.py [--data ../shared/data/mnist] [--models /tmp/bench-vote]
                                         [--rounds 1,2,3,4,5] [--freeze 0,1,2,3] [--full] [--smoke]

--smoke: 1,000 history digits, batches of 100, 300 eval images, one epoch, round 1, freeze
0 and 2 and the full retrain, a temporary work dir; seconds, so that ./dev.sh bench --smoke
keeps it running; nothing to read in its figures.

bench_ct.py's scenario without the pipeline (bench_vote.py's data and production, kept in
--models and shared with it): production is the default recipe on history (seed 0). For
each round r (history + r shifted batches) every --freeze value trains preset warm from
production with that many conv layers kept, in one process, side by side; the order of
the candidates turns round every round, so a slower minute does not always land on the
same one. Each candidate is embedded (its gallery: all the round's data) and judged with
steps.evaluate's vote on the clean and the shifted test set, as bench_ct judges a run.

  train s   steps.train.train's wall (the first call in a process also pays torch's lazy
            imports: the first round's first candidate)
  epoch s   the training epoch alone; x f=0: against freeze=0's epoch in the same round
  full      --full: the full retrain (default recipe, seed 0) on the round's data, as
            bench_ct's; warm - full is then printed as bench_ct's warm_quality reads it
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def round_data(work: Path, r: int) -> Path:
    """data/hist<r>/data.npz: history + the first r shifted batches (bench_ct's round r)."""
    import numpy as np

    out = work / "data" / f"hist{r}"
    if not (out / "data.npz").is_file():
        out.mkdir(parents=True, exist_ok=True)
        parts = [np.load(work / "data" / "hist" / "data.npz")] + [
            np.load(work / "data" / f"batch{b}.npz") for b in range(1, r + 1)]
        np.savez(out / "data.npz", x=np.concatenate([p["x"] for p in parts]),
                 y=np.concatenate([p["y"] for p in parts]))
    return out


def judged(model_dir: Path, gallery_npz: Path, work: Path) -> tuple[float, float]:
    """(clean, shifted) top-1 in % of a model over its own gallery, steps.evaluate's vote."""
    import numpy as np
    from bench_vote import neighbours, top1

    from steps.embed import embed
    from steps.evaluate import DEFAULT_K

    emb = {}
    for part, src in (("gallery", gallery_npz), ("clean", work / "data" / "eval_clean.npz"),
                      ("shifted", work / "data" / "eval_shifted.npz")):
        embed(str(model_dir), str(src), str(model_dir / f"emb_{part}.npz"))
        with np.load(model_dir / f"emb_{part}.npz") as d:
            emb[part] = d["emb"], d["y"].astype(np.int64)
    g, gy = emb["gallery"]
    return tuple(top1(neighbours(g, gy, emb[ev][0]), emb[ev][1], DEFAULT_K) for ev in ("clean", "shifted"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mnist"))
    ap.add_argument("--models", default="/tmp/bench-vote", help="work dir: data and production (reused)")
    ap.add_argument("--rounds", default="1,2,3,4,5", help="bench_ct's rounds to run (1..5)")
    ap.add_argument("--freeze", default="0,1,2,3", help="freeze values to compare")
    ap.add_argument("--full", action="store_true", help="also the full retrain of each round (about 60 s each)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds, nothing judged")
    args = ap.parse_args(argv)
    import shutil
    import tempfile

    from bench_vote import TRAIN_PARAMS, embedded, work_dir

    from steps.train import train

    rounds = [int(r) for r in args.rounds.split(",")]
    freezes = [int(f) for f in args.freeze.split(",")]
    extra = {}
    if args.smoke:
        extra["epochs"] = 1
        rounds, freezes, args.full = [1], [0, 2], True
    work = work_dir(args, "bench-warm")
    embedded(work, "hist", "hist")   # production: trained once, kept in --models
    production = work / "models" / "hist"
    print(f"{'round':>5} {'candidate':<10} {'train s':>8} {'epoch s':>8} {'x f=0':>6} "
          f"{'clean %':>8} {'shifted %':>10} {'- full (pp)':>16}", flush=True)
    for r in rounds:
        data = round_data(work, r)
        full = None
        if args.full:
            full_dir = work / "models" / f"full{r}"
            if not (full_dir / "model_export.pt").is_file():
                train(str(data), str(full_dir), dict(TRAIN_PARAMS))
            full = judged(full_dir, data / "data.npz", work)
            print(f"{r:>5} {'full':<10} {'':>8} {'':>8} {'':>6} {full[0]:>8.2f} {full[1]:>10.2f}", flush=True)
        rows = {}
        for f in (freezes if r % 2 else freezes[::-1]):
            out = Path(tempfile.mkdtemp(prefix=f"warm-f{f}-", dir=work))
            try:
                t0 = time.perf_counter()
                got = train(str(data), str(out), {"mode": "warm", "freeze": f, **extra}, init_from=str(production))
                rows[f] = (time.perf_counter() - t0, _epoch_seconds(out), got["final_loss"],
                           *judged(out, data / "data.npz", work))
            finally:
                shutil.rmtree(out, ignore_errors=True)
        for f in freezes:   # printed once the round is done: the ratios need freeze=0's epoch
            wall, epoch, loss, clean, shifted = rows[f]
            ratio = f"{epoch / rows[0][1]:.2f}" if 0 in rows else "-"
            diff = f"{clean - full[0]:+.2f} / {shifted - full[1]:+.2f}" if full else "-"
            print(f"{r:>5} {'freeze=' + str(f):<10} {wall:>8.1f} {epoch:>8.1f} {ratio:>6} "
                  f"{clean:>8.2f} {shifted:>10.2f} {diff:>16}  (loss {loss:.4f})", flush=True)
    return 0


def _epoch_seconds(model_dir: Path) -> float:
    import json
    return float(json.loads((model_dir / "train_metrics.json").read_text())["history"][0]["seconds"])


if __name__ == "__main__":
    sys.exit(main())
