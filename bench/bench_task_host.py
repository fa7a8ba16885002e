"""Whole local runs with their tasks forked from the task host against fresh task processes.

    .venv/bin/python bench/bench_task_host.py [--data ../shared/data/mnist] [--digits 20000] [--pairs 2] [--smoke]

One process, a moto S3 server in a thread, the bucket filled with --digits training digits
(objects of 2,000) and 5,000 test digits. Then full runs (the default schedule) through
``pipelines.local_run.run_local``, alternating ``warm_tasks=True`` (pipelines.task_host)
and ``warm_tasks=False`` (every task a fresh process, kfp.local as it comes), --pairs
times. Every run waits for approval, so each is the same run on the same data.

Printed per run: the wall and each step's own seconds; then per side the median wall,
train and the rest (embed, index, evaluate, ingest, validate), and the host's ratio to the
fresh processes. What it answers: the host takes imports off every task, and training
forked from it is not slower (a forked process shares the host's memory pages and its
imported torch). bench_ct.py measures the refresh, where the host matters most, against
the full retrain with both side by side. --smoke: 1,000 digits, 500 eval digits, one epoch,
one pair (seconds; nothing to read in the figures).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared/data/mnist"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--digits", type=int, default=20000, help="training digits in the bucket")
    ap.add_argument("--pairs", type=int, default=2, help="host / fresh pairs, alternated")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one pair, seconds")
    args = ap.parse_args(argv)

    import numpy as np
    from bench_ct import npz_bytes  # bench/ is this script's directory, on sys.path

    from core.config import Settings
    from devkit.localservices import scratch_bucket
    from pipelines.local_run import run_local

    digits, n_eval, pairs, params = ((1000, 500, 1, {"epochs": 1}) if args.smoke
                                     else (args.digits, 5000, args.pairs, {}))
    data = Path(args.data)
    if not (data / "train.npz").is_file():
        print(f"no MNIST at {data}: pass --data DIR with train.npz and test.npz")
        return 2
    with np.load(data / "train.npz") as d:
        x, y = d["x"][:digits], d["y"][:digits]
    with np.load(data / "test.npz") as d:
        ex, ey = d["x"][:n_eval], d["y"][:n_eval]
    with scratch_bucket("bench-task-host") as (store, work):
        for i in range(0, digits, 2000):
            store.put_bytes(f"data/part-{i // 2000:03d}.npz", npz_bytes(x=x[i:i + 2000], y=y[i:i + 2000]))
        store.put_bytes("eval/eval.npz", npz_bytes(x=ex, y=ey))
        settings = Settings(store=store.root, run_workdir=str(work / "runs"), deploy_floor=0.3,
                            deploy={"require_approval": True})
        print(f"{digits} training digits, {n_eval} eval digits; full runs, {pairs} pair(s), host and fresh alternated",
              flush=True)
        got: dict[bool, list[dict]] = {True: [], False: []}
        for i in range(pairs):
            for warm in (True, False):
                t0 = time.time()
                report = run_local(settings, store, f"run-{i}-{'host' if warm else 'fresh'}", [], params, "",
                                   warm_tasks=warm)
                wall = time.time() - t0
                if report["status"] != "succeeded":
                    raise SystemExit(f"run failed: {report.get('error')}")
                timings = report["timings"]
                got[warm].append({"wall": wall, "train": timings.get("train", 0.0),
                                  "rest": sum(v for k, v in timings.items() if k != "train")})
                print(f"  {'host ' if warm else 'fresh'}  wall {wall:6.1f}s  steps "
                      + ", ".join(f"{k} {v:.2f}" for k, v in sorted(timings.items())), flush=True)
        med = {w: {k: statistics.median(r[k] for r in got[w]) for k in ("wall", "train", "rest")} for w in got}
        for part in ("wall", "train", "rest"):
            print(f"median {part:<5}: host {med[True][part]:6.2f}s, fresh {med[False][part]:6.2f}s, "
                  f"host/fresh {med[True][part] / med[False][part]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
