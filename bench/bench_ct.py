"""Continuous-training benchmark: refresh, warm and full runs side by side on a drift scenario.

    .venv/bin/python bench/bench_ct.py [--rounds 5] [--smoke] [--data ../shared/data/mnist]

One process: a moto S3 server in a thread (the real S3 API, as in the tests), the bucket
filled from full MNIST, and every run through the real pipeline on kfp.local
(pipelines.local_run.run_local), one after another.

Scenario
  history  50,000 training digits (a seeded permutation of the 60k), 25 objects of 2,000
  new      five batches of 2,000 further training digits, shifted: strokes thickened by a
           2x2 grey dilation, then rotated by 12 degrees (bilinear), deterministic
  eval     the 10k test set clean, and the same with the same shift
Production is a full run on history (v1). After each new batch arrives, full, warm and
refresh each run on history + the batches so far, against the same production (runs wait
for approval, so none replaces it); "no update" is production as it was. Top-1 is
evaluate's vote (steps.evaluate.vote_row, DEFAULT_K) of each run's candidate package on
both eval sets (the pipeline's own eval set is the clean one).

Printed: per round, each mode's top-1 clean/shifted, wall, and wall relative to the full
retrain of the same round; refresh's wall split into its steps' compute and the
pipeline's own overhead (kfp.local's task processes and imports). Every run is a local
run as ctbot makes them, its tasks forked from a warm host (pipelines.task_host); each
round also runs the refresh once more with a fresh process per task (kfp.local as it
comes), side by side, and prints both. Then one line per goal:
`goal <name>: met|missed (<figure against its target>)`.

Data preparation (ingest + validate, the pipeline's own components chained alone on
kfp.local) is measured on a cold shard cache before production runs, and again when the
first new batch has arrived, before any run has read it: the steps' own compute (each
records it), the overhead (kfp.local's task start-up and imports, fresh task processes
with no host: the wall minus the compute) and the bytes read. Its goal judges the compute; the wall is printed beside it.

--smoke: 1,000 history digits, one batch of 200, 500 eval images, one round, one epoch;
runs in about a minute and judges nothing (figures printed, goals "not judged").
--rounds N: fewer rounds (each costs about three full trainings' time).
--prep-only: data preparation alone (history, then history + one batch), no training:
about a minute at full size.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared/data/mnist"
MODES = ("full", "warm", "refresh")
ROTATE_DEG = 12.0


def shift(x):
    """The drift: 2x2 grey dilation (thicker strokes), then a 12 degree rotation."""
    import numpy as np
    from PIL import Image

    d = x.copy()
    d[:, :-1, :] = np.maximum(d[:, :-1, :], x[:, 1:, :])
    d[:, :, :-1] = np.maximum(d[:, :, :-1], d[:, :, 1:].copy())
    return np.stack([np.asarray(Image.fromarray(img).rotate(ROTATE_DEG, resample=Image.BILINEAR))
                     for img in d]).astype(np.uint8)


def npz_bytes(**arrays) -> bytes:
    import numpy as np
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def top1_of_candidate(store, run_id: str, eval_npz: Path) -> float:
    from steps import layout
    from steps.deploy import download_package
    from steps.evaluate import evaluate_package

    with tempfile.TemporaryDirectory() as pkg:
        download_package(store, layout.candidate_prefix(run_id), pkg)
        return evaluate_package(pkg, str(eval_npz))


def measure_prep(store, root: str, run_id: str, work: Path) -> dict:
    """Run ingest + validate on everything under data/ through kfp.local; the steps' own
    compute (what each recorded: ingest in its data card, validate in its result) and the
    wall, whose difference is kfp.local's task start-up and imports."""
    from kfp import local

    from pipelines.local_run import _kfp_local_env, _kfp_output
    from pipelines.pipeline import build_prep_pipeline
    from steps.results import read_steps

    workdir = work / "prep" / run_id
    (workdir / "tmp").mkdir(parents=True)
    with _kfp_local_env(workdir / "tmp"):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "root"))
        with _kfp_output(workdir / "kfp.log", verbose=False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # as run_local does
            t0 = time.time()
            build_prep_pipeline()(run_id=run_id, store=root, data_uris=[root + "data/"], eval_uri=root + "eval/eval.npz")
            wall = time.time() - t0
    steps = read_steps(store, run_id)
    ingest, validate = steps["ingest"]["summary"], steps["validate"]["summary"]
    compute = ingest["prep"]["seconds"] + validate["seconds"]
    return {"compute": compute, "overhead": wall - compute, "wall": wall, "ingest": ingest["prep"]["seconds"],
            "validate": validate["seconds"], "bytes_read": ingest["prep"]["bytes_read"],
            "objects_new": ingest["objects_new"], "objects_cached": ingest["objects_cached"], "n": ingest["n"]}


def print_prep(first: dict, one_new: dict, *, smoke: bool) -> None:
    """Data preparation of the first run against a run with one new batch, and the goal,
    judged on the steps' own compute."""
    print("\ndata preparation (ingest + validate through kfp.local):")
    print(f"  {'run':<16} {'images':>7} {'objects new/cached':>19} {'compute s':>10} {'overhead s':>11} "
          f"{'wall s':>7}  bytes read (objects, shard sidecars)")
    for name, m in (("first", first), ("one new batch", one_new)):
        print(f"  {name:<16} {m['n']:>7} {m['objects_new']:>9}/{m['objects_cached']:<9} {m['compute']:>10.2f} "
              f"{m['overhead']:>11.2f} {m['wall']:>7.2f}  {m['bytes_read']['objects']:,}, "
              f"{m['bytes_read']['shard_sidecars']:,}   (ingest {m['ingest']:.2f}s, validate {m['validate']:.2f}s)")
    ratio = {k: one_new[k] / first[k] for k in ("compute", "overhead", "wall")}
    print(f"  one new batch / first: compute {ratio['compute']:.3f}x, overhead {ratio['overhead']:.3f}x, "
          f"wall {ratio['wall']:.3f}x")
    verdict = "not judged (--smoke)" if smoke else ("met" if ratio["compute"] <= 0.2 else "missed")
    print(f"goal data_prep: {verdict} ({ratio['compute']:.3f}x the first run's, target <= 0.2x; the steps' "
          f"own compute, ingest + validate; with kfp.local's task start-up the wall is {ratio['wall']:.3f}x)",
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="new batches to run every mode after (max 5)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds, no goal judged")
    ap.add_argument("--prep-only", action="store_true",
                    help="only data preparation (ingest + validate): history, then history + one batch")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    args = ap.parse_args(argv)

    import numpy as np

    from core.config import Settings
    from devkit.localservices import scratch_bucket
    from pipelines.local_run import run_local
    from steps.results import read_steps

    if args.smoke:
        n_hist, n_obj, n_batch, n_eval, rounds, extra = 1000, 500, 200, 500, 1, {"epochs": 1}
    else:
        n_hist, n_obj, n_batch, n_eval, rounds, extra = 50000, 2000, 2000, 10000, min(args.rounds, 5), {}
    rounds = 1 if args.prep_only else rounds
    data = Path(args.data)
    if not (data / "train.npz").is_file():
        print(f"no MNIST at {data}: pass --data DIR with train.npz and test.npz")
        return 2
    with np.load(data / "train.npz") as d:
        order = np.random.default_rng(0).permutation(len(d["y"]))
        x, y = d["x"][order], d["y"][order]
    with np.load(data / "test.npz") as d:
        ex, ey = d["x"][:n_eval], d["y"][:n_eval]

    with scratch_bucket("bench-ct") as (store, work):
        for i in range(0, n_hist, n_obj):
            store.put_bytes(f"data/history-{i // n_obj:03d}.npz", npz_bytes(x=x[i:i + n_obj], y=y[i:i + n_obj]))
        store.put_bytes("eval/eval.npz", npz_bytes(x=ex, y=ey))
        clean, shifted = work / "eval-clean.npz", work / "eval-shifted.npz"
        np.savez(clean, x=ex, y=ey)
        np.savez(shifted, x=shift(ex), y=ey)
        print(f"scenario: history {n_hist} digits in {n_hist // n_obj} objects; {rounds} batch(es) of "
              f"{n_batch} shifted digits (2x2 dilation + {ROTATE_DEG:g} deg rotation); eval "
              f"{n_eval} test digits clean and shifted", flush=True)

        def put_batch(r):
            lo = n_hist + (r - 1) * n_batch
            store.put_bytes(f"data/new-{r:02d}.npz", npz_bytes(x=shift(x[lo:lo + n_batch]), y=y[lo:lo + n_batch]))

        # data preparation first, on a cold shard cache: the first run's
        prep = {"first": measure_prep(store, "s3://bench-ct/", "prep-first", work)}
        if args.prep_only:
            put_batch(1)
            prep["one_new"] = measure_prep(store, "s3://bench-ct/", "prep-one-new", work)
            print_prep(prep["first"], prep["one_new"], smoke=args.smoke)
            return 0

        base = dict(store="s3://bench-ct/", run_workdir=str(work / "runs"), deploy_floor=0.5)
        production_settings = Settings(**base)
        held = Settings(**base, deploy={"require_approval": True})   # production stays v1

        def run(settings, run_id, params, warm_tasks=True):
            t0 = time.time()
            report = run_local(settings, store, run_id, [], {**extra, **params}, "", warm_tasks=warm_tasks)
            wall = time.time() - t0
            if report["status"] != "succeeded":
                raise SystemExit(f"{run_id} failed: {report['error']}")
            return {"report": report, "wall": wall, "steps": read_steps(store, run_id),
                    "clean": top1_of_candidate(store, run_id, clean),
                    "shifted": top1_of_candidate(store, run_id, shifted)}

        prod = run(production_settings, "production", {})
        assert prod["report"]["model_version"] == 1, prod["report"]["reason"]
        print(f"production: full on history, wall {prod['wall']:.1f}s, top-1 clean "
              f"{prod['clean']:.4%} shifted {prod['shifted']:.4%}", flush=True)

        rows = []
        for r in range(1, rounds + 1):
            put_batch(r)
            if r == 1:   # before any run has cached the new batch
                prep["one_new"] = measure_prep(store, "s3://bench-ct/", "prep-one-new", work)
            got = {m: run(held, f"round{r}-{m}", {"mode": m}) for m in MODES}
            # the same refresh again, every task a fresh process (kfp.local as it comes)
            got["cold"] = run(held, f"round{r}-refresh-cold", {"mode": "refresh"}, warm_tasks=False)
            rows.append(got)
            print_round(r, prod, got)
            # the goals over the rounds so far: a run cut short still says where it stood
            judge(prod, rows, smoke=args.smoke)
            print_prep(prep["first"], prep["one_new"], smoke=args.smoke)
    return 0


def print_round(r: int, prod: dict, got: dict) -> None:
    full = got["full"]["wall"]
    print(f"\nround {r}: history + {r} new batch(es)")
    print(f"  {'mode':<10} {'top-1 clean':>12} {'top-1 shifted':>14} {'wall s':>8} {'wall/full':>10}")
    print(f"  {'no update':<10} {prod['clean']:>12.4%} {prod['shifted']:>14.4%} {'-':>8} {'-':>10}")
    for m in MODES:
        g = got[m]
        print(f"  {m:<10} {g['clean']:>12.4%} {g['shifted']:>14.4%} {g['wall']:>8.1f} {g['wall'] / full:>10.3f}")
    ref, cold = got["refresh"], got["cold"]
    for name, run_ in (("full", got["full"]), ("warm", got["warm"]), ("refresh", ref),
                       ("refresh, fresh task processes", cold)):
        compute = sum(run_["report"]["timings"].values())
        print(f"  {name}: compute (sum of its steps) {compute:.1f}s, pipeline overhead "
              f"{run_['wall'] - compute:.1f}s of {run_['wall']:.1f}s wall; steps "
              + ", ".join(f"{s} {t:.1f}" for s, t in run_["report"]["timings"].items()), flush=True)
    print(f"  the task host (pipelines.task_host): refresh {ref['wall']:.1f}s against {cold['wall']:.1f}s with a "
          f"fresh process per task, {ref['wall'] / cold['wall']:.2f}x; with fresh processes the refresh would be "
          f"{cold['wall'] / full:.3f}x full (top-1 {cold['clean']:.4%} / {cold['shifted']:.4%})")
    for step in ("embed", "evaluate"):   # their sections (steps.laps)
        inside = ref["steps"][step]["summary"].get("timings") or {}
        print(f"  refresh's {step} step: " + ", ".join(f"{s} {t:.2f}s" for s, t in inside.items()))
    for m in MODES:   # what each run took from the eval cache (steps.eval_cache)
        emb, ev = got[m]["steps"]["embed"]["summary"], got[m]["steps"]["evaluate"]["summary"]
        print(f"  {m}: embedded {emb['gallery']['n']} gallery images and "
              f"{'none of' if emb['eval']['cached'] else 'all'} the {emb['eval']['n']} eval images "
              f"(eval set {emb['eval']['seconds']:.1f}s); production's score: {ev.get('production_from')}; "
              f"{_searched(ev.get('searched'))}")


def _searched(s: dict | None) -> str:
    """How much of the gallery evaluate searched (steps.evaluate.candidate_neighbours)."""
    if not s:
        return "searched: not recorded"
    tail = f", merged with production's neighbours ({s['base_from']})" if "base_from" in s else ""
    return f"searched {s['rows']} of {s['of']} gallery rows{tail}"


def judge(prod: dict, rows: list[dict], *, smoke: bool) -> None:
    def line(name, ok, text):
        verdict = "not judged (--smoke)" if smoke else ("met" if ok else "missed")
        print(f"goal {name}: {verdict} ({text})")

    print(f"\ngoals over {len(rows)} round(s):")
    ratios = [g["refresh"]["wall"] / g["full"]["wall"] for g in rows]
    recov = []
    for g in rows:
        gap = g["full"]["shifted"] - prod["shifted"]
        recov.append((g["refresh"]["shifted"] - prod["shifted"]) / gap if gap > 0 else float("nan"))
    # pp rounded to 1e-6: one image of 10k is 0.01 pp, and 0.9955 - 0.9950 is 0.0500000000000056 pp
    clean_drift = [round(abs(g["refresh"]["clean"] - prod["clean"]) * 100, 6) for g in rows]
    warm_ratio = [g["warm"]["wall"] / g["full"]["wall"] for g in rows]
    # warm - full in pp, signed: the goal is warm not more than 0.05 pp below full (ahead is no miss)
    warm_diff = [{ev: round((g["warm"][ev] - g["full"][ev]) * 100, 6) for ev in ("clean", "shifted")} for g in rows]
    warm_behind = [max(-d["clean"], -d["shifted"]) for d in warm_diff]
    print("warm - full (pp): " + "; ".join(f"round {i} clean {d['clean']:+.2f}, shifted {d['shifted']:+.2f}"
                                          for i, d in enumerate(warm_diff, 1)))
    worst = lambda v, f=max: f(v) if v else float("nan")  # noqa: E731
    line("refresh_wall", worst(ratios) <= 0.10, f"worst {worst(ratios):.3f}x full, target <= 0.10x")
    line("refresh_recovers_shifted", worst(recov, min) >= 0.5,
         f"worst {worst(recov, min):.2f} of the no-update..full gap recovered, target >= 0.50")
    line("refresh_clean", worst(clean_drift) <= 0.05,
         f"worst {worst(clean_drift):.3f} pp from production on clean, target <= 0.05 pp")
    line("warm_wall", worst(warm_ratio) <= 0.35, f"worst {worst(warm_ratio):.3f}x full, target <= 0.35x")
    line("warm_quality", worst(warm_behind) <= 0.05,
         f"worst {worst(warm_behind):+.3f} pp below full on either eval (negative: ahead), target <= 0.05 pp")


if __name__ == "__main__":
    sys.exit(main())
