"""Model benchmark: ctbot's defaults against today's (v0) and two outside recipes, side by side.

    .venv/bin/python bench/bench_model.py [--rows 1,2,3,4] [--pipeline] [--votes] [--limit N] [--threads 2] [--smoke]

Rows, each in its own process (so peak RSS is the row's own), in one run on one machine:
  1 new    ctbot's default TrainParams: ingest -> validate -> train -> embed -> index -> evaluate
  2 v0     the same steps with preset=v0 (the first release's recipe)
  3 seed   the seed system's recipe rebuilt: ctbot's network + ArcFace, one epoch of plain SGD
           (no momentum), L2 search on the unnormalised embeddings
  4 pml    pytorch-metric-learning's ArcFaceLoss (documented defaults: margin 28.6 deg, scale 64,
           its own SGD for the loss's weights) on ctbot's network, trained for row 1's train CPU time
Each row prints kNN top-1 on the 10k test set (60k gallery; rows 1 and 2: evaluate's
similarity-weighted k=5 vote, what ctbot evaluates and serves, with k=1 beside it; rows 3
and 4: the nearest neighbour), train / embed / whole wall, peak
RSS, and wall and accuracy relative to row 2. Rows 3 and 4 have no ingest/validate steps:
their whole wall is train + embed + search. ``--pipeline`` adds rows 1 and 2 through the real
pipeline (``ctbot pipeline run --runner local``) with its wall against the sum of step times.

Machines differ and are shared, so read the ratios, not the seconds; rows run one after
another and the machine's speed drifts, so rerun with ``--rows 2,1`` (v0 first) to see it.
``--limit N`` trains on N of the 60k images (seeded), for a quick look on a busy machine. Needs the bench extra for
row 4 (``pip install -e .[bench]``). Data: ../shared/data/mnist/{train,test}.npz, never copied
into the repo; scratch goes to a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared/data/mnist"
NAMES = {1: "new defaults", 2: "v0 (preset)", 3: "seed recipe", 4: "pml ArcFaceLoss"}


def peak_rss_mb() -> int:
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def limited(train_npz: Path, limit: int, work: Path) -> Path:
    """The first `limit` images of a seeded permutation of the training set."""
    import numpy as np
    if not limit:
        return train_npz
    with np.load(train_npz) as d:
        order = np.random.default_rng(0).permutation(len(d["y"]))[:limit]
        x, y = d["x"][order], d["y"][order]
    out = work / f"train-{limit}.npz"
    np.savez(out, x=x, y=y)
    return out


def knn_top1(gallery, g_y, query, q_y, metric: str, k: int = 1) -> float:
    import faiss
    import numpy as np
    index = faiss.IndexFlatL2(gallery.shape[1]) if metric == "l2" else faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
    return float((g_y[ids[:, 0]] == q_y).mean())


# --------------------------------------------------------------------- rows 1 and 2: the steps


def vote_variants(work: Path, test_npz: Path) -> dict:
    """Top-1 of other ways to vote, on the row's own gallery and eval embeddings: k and
    weighting, an edited gallery (training images their own 5 neighbours outvote
    dropped, Wilson 1972) and test-time augmentation (each query the mean embedding of
    itself and its four 1-pixel shifts). Same model: only the vote changes."""
    import faiss
    import numpy as np

    from steps.evaluate import vote
    from steps.model import embed_images, load_embedder

    with np.load(work / "data.npz.emb.npz") as g, np.load(work / "eval.npz.emb.npz") as q:
        gallery, g_y, query, q_y = g["emb"], g["y"].astype(np.int64), q["emb"], q["y"]
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)

    def top1(idx, labels, queries, k, weight=None) -> float:
        sims, ids = idx.search(queries, k)
        return float((vote(weight(sims) if weight else sims, ids, labels) == q_y).mean())

    soft = lambda s: np.exp(30.0 * (s - s[:, :1]))  # noqa: E731 - the ArcFace head's own scale
    out = {f"k={k}": top1(index, g_y, query, k) for k in (1, 3, 5, 7, 10)}
    out.update({f"k={k} exp(30 cos)": top1(index, g_y, query, k, soft) for k in (5, 10)})
    sims, ids = index.search(gallery, 6)
    keep = vote(sims[:, 1:], ids[:, 1:], g_y) == g_y
    edited = faiss.IndexFlatIP(gallery.shape[1])
    edited.add(gallery[keep])
    out.update({f"edited gallery (-{int((~keep).sum())}) k={k}": top1(edited, g_y[keep], query, k) for k in (1, 5)})
    with np.load(test_npz) as d:
        x = np.pad(d["x"], ((0, 0), (1, 1), (1, 1)))
    fn = load_embedder(work / "model")
    shifted = [embed_images(fn, np.ascontiguousarray(x[:, dy:dy + 28, dx:dx + 28])).numpy()
               for dy, dx in ((1, 1), (0, 1), (2, 1), (1, 0), (1, 2))]
    mean = np.mean(shifted, axis=0)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    out["TTA 5 shifts k=5"] = top1(index, g_y, np.ascontiguousarray(mean, dtype=np.float32), 5)
    return {k: round(v, 5) for k, v in out.items()}


def row_steps(train_npz, test_npz, work: Path, tokens: list[str], threads: int, votes: bool = False) -> dict:
    t_start = time.time()
    import numpy as np
    import torch

    from steps.embed import embed
    from steps.evaluate import evaluate
    from steps.index import build_index
    from steps.ingest import ingest
    from steps.params import TrainParams
    from steps.train import train
    from steps.validate import validate

    torch.set_num_threads(threads)
    params = TrainParams.from_dict({"threads": threads, **TrainParams.parse_tokens(tokens)})
    imports = time.time() - t_start
    t, cpu = {}, {}

    def step(name, fn, *a, **kw):
        w, c = time.time(), time.process_time()
        out = fn(*a, **kw)
        t[name], cpu[name] = time.time() - w, time.process_time() - c
        return out

    step("ingest", ingest, [str(train_npz)], str(work / "data"), str(test_npz))
    step("validate", validate, str(work / "data"))
    trained = step("train", train, str(work / "data"), str(work / "model"), params)
    step("embed", lambda: [embed(str(work / "model"), str(work / "data" / n), str(work / f"{n}.emb.npz"),
                                 threads=threads) for n in ("data.npz", "eval.npz")])
    step("index", build_index, str(work / "data.npz.emb.npz"), str(work / "index"), "flat")
    metrics = step("evaluate", evaluate, str(work / "index"), str(work / "eval.npz.emb.npz"), str(work / "eval"))
    with np.load(work / "data.npz.emb.npz") as g, np.load(work / "eval.npz.emb.npz") as q:
        top1_k1 = knn_top1(g["emb"], g["y"], q["emb"], q["y"], "ip")
    extra = {"votes": vote_variants(work, test_npz)} if votes else {}
    return {**extra, "top1": metrics["top1"], "top1_k1": top1_k1, "train_s": t["train"], "embed_s": t["embed"],
            "wall_s": sum(t.values()), "cpu_s": sum(cpu.values()), "train_cpu_s": cpu["train"],
            "imports_s": imports,
            "train_rss_mb": trained.get("peak_rss_mb"), "steps": {k: round(v, 2) for k, v in t.items()},
            "epochs": params.epochs, "params": params.to_dict()}


# --------------------------------------------------------------- rows 3 and 4: outside recipes


def _load(train_npz, test_npz):
    import numpy as np
    with np.load(train_npz) as d, np.load(test_npz) as e:
        return d["x"], d["y"].astype(np.int64), e["x"], e["y"].astype(np.int64)


def _loop(net, loss_fn, opts, x, y, batch, *, epochs=None, budget_s=None, shift=0, seed=0):
    """Plain mini-batch loop over uint8 images; stops after `epochs` or `budget_s` seconds of
    process CPU time (CPU, not wall: on a shared machine wall time depends on the neighbours)."""
    import torch

    from steps.train import _shift_all
    gen = torch.Generator().manual_seed(seed + 1)
    xt = torch.from_numpy(x).unsqueeze(1)
    yt = torch.from_numpy(y)
    pad = torch.nn.functional.pad(xt, (shift,) * 4) if shift else None
    t0, epoch, steps = time.process_time(), 0, 0
    net.train()
    while True:
        epoch += 1
        xe = _shift_all(pad, shift, gen) if shift else xt
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(len(perm) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = loss_fn(net(xe[idx].float().div_(255.0).contiguous(memory_format=torch.channels_last)), yt[idx])
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            steps += 1
            if budget_s is not None and time.process_time() - t0 >= budget_s:
                return epoch - 1 + (i + 1) / (len(perm) // batch), steps
        if epochs is not None and epoch >= epochs:
            return epoch, steps


def row_seed(train_npz, test_npz, threads: int) -> dict:
    """ArcFace + one epoch of SGD without momentum; search by L2 on unnormalised embeddings."""
    import torch

    from steps.model import ArcFace, EmbeddingNet, arch_config, embed_images
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y, ex, ey = _load(train_npz, test_npz)
    c0 = time.process_time()
    net = EmbeddingNet(arch_config(128)).to(memory_format=torch.channels_last)
    head = ArcFace(128, 10, 30.0, 0.5)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.01, momentum=0.0)
    t = time.time()
    epochs, _ = _loop(net, lambda e, yb: head(e, yb), [opt], x, y, batch=64, epochs=1)
    train_s = time.time() - t

    net.eval()
    t = time.time()
    # The embedding before its L2 normalisation, as the seed searched it.
    g, q = embed_images(net.unnormalised, x).numpy(), embed_images(net.unnormalised, ex).numpy()
    embed_s = time.time() - t
    t = time.time()
    top1 = knn_top1(g, y, q, ey, "l2")
    search_s = time.time() - t
    return {"top1": top1, "train_s": train_s, "embed_s": embed_s, "wall_s": train_s + embed_s + search_s,
            "cpu_s": time.process_time() - c0, "epochs": epochs}


def row_pml(train_npz, test_npz, threads: int, budget_s: float) -> dict:
    """pytorch-metric-learning's ArcFaceLoss as documented, ctbot's network, row 1's train time."""
    import torch
    from pytorch_metric_learning import losses

    from steps.model import EmbeddingNet, arch_config, embed_images
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y, ex, ey = _load(train_npz, test_npz)
    c0 = time.process_time()
    net = EmbeddingNet(arch_config(128)).to(memory_format=torch.channels_last)
    loss_fn = losses.ArcFaceLoss(num_classes=10, embedding_size=128)  # margin 28.6 (degrees), scale 64
    opts = [torch.optim.Adam(net.parameters(), lr=1e-3),
            torch.optim.SGD(loss_fn.parameters(), lr=0.01)]  # the docs' separate loss optimizer
    t = time.time()
    epochs, _ = _loop(net, loss_fn, opts, x, y, batch=256, budget_s=budget_s, shift=2)
    train_s = time.time() - t
    net.eval()
    t = time.time()
    g, q = embed_images(net, x).numpy(), embed_images(net, ex).numpy()
    embed_s = time.time() - t
    t = time.time()
    top1 = knn_top1(g, y, q, ey, "ip")
    search_s = time.time() - t
    return {"top1": top1, "train_s": train_s, "embed_s": embed_s, "wall_s": train_s + embed_s + search_s,
            "cpu_s": time.process_time() - c0, "epochs": round(epochs, 2)}


# ------------------------------------------------------------------------ pipeline rows


def row_pipeline(train_npz, test_npz, work: Path, tokens: list[str]) -> dict:
    ctbot = Path(sys.executable).with_name("ctbot")
    cmd = [str(ctbot), "pipeline", "run", "--runner", "local", "--store", str(work / "store"),
           "--workdir", str(work / "runs"), "--data", str(train_npz), "--eval-data", str(test_npz)]
    if tokens:
        cmd += ["--set", *tokens]
    env = {**os.environ, "TMPDIR": str(work)}  # kfp.local leaks a temp dir per task
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    where = re.search(r"^report: (.+)$", r.stdout, re.M).group(1).strip()
    report = json.loads(Path(where.removeprefix("file://")).read_text())
    steps = sum(v for v in report["timings"].values())
    return {"top1": report["metrics"]["top1"], "train_s": report["timings"].get("train"),
            "embed_s": report["timings"].get("embed"), "wall_s": wall, "steps_s": steps,
            "command": " ".join(cmd)}


# ------------------------------------------------------------------------------- driver


def run_row(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-row{args.row}-", dir=args.scratch))
    try:
        train_npz, test_npz = Path(args.train_npz), Path(args.test_npz)
        if args.row == 1:
            out = row_steps(train_npz, test_npz, work, args.param, args.threads, args.votes)
        elif args.row == 2:
            out = row_steps(train_npz, test_npz, work, ["preset=v0", *args.param], args.threads, args.votes)
        elif args.row == 3:
            out = row_seed(train_npz, test_npz, args.threads)
        elif args.row == 4:
            out = row_pml(train_npz, test_npz, args.threads, args.budget)
        elif args.row in (11, 12):
            out = row_pipeline(train_npz, test_npz, work, [] if args.row == 11 else ["preset=v0"])
        else:
            raise ValueError(f"unknown row {args.row}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def print_table(results: dict[int, dict]) -> None:
    base = results.get(2)
    hdr = (f"{'row':<22}{'top-1':>8}{'k=1':>8}{'epochs':>7}{'train s':>9}{'embed s':>9}{'wall s':>9}"
           f"{'CPU s':>8}{'RSS MB':>8}{'wall/v0':>9}{'CPU/v0':>8}{'acc-v0 pp':>10}")
    print(hdr)
    for r, v in results.items():
        name = f"{r} {NAMES[r]}" if r < 10 else f"{r - 10} pipeline {NAMES[r - 10].split()[0]}"
        ref = results.get(12) if r >= 10 else base
        cpu = v.get("cpu_s")
        cpu_rel = f"{cpu / ref['cpu_s']:>8.2f}" if ref and cpu and ref.get("cpu_s") else f"{'-':>8}"
        rel = (f"{v['wall_s'] / ref['wall_s']:>9.2f}{cpu_rel}{100 * (v['top1'] - ref['top1']):>+10.2f}"
               if ref else "")
        k1 = f"{v['top1_k1']:.2%}" if "top1_k1" in v else "-"
        rss = v.get("train_rss_mb") or v["peak_rss_mb"]
        print(f"{name:<22}{v['top1']:>8.2%}{k1:>8}{v.get('epochs', '-'):>7}{v['train_s'] or 0:>9.1f}"
              f"{v['embed_s'] or 0:>9.1f}{v['wall_s']:>9.1f}{cpu or 0:>8.1f}{rss:>8}{rel}")
    for r in (11, 12):
        if r in results:
            v = results[r]
            print(f"pipeline row {r - 10}: wall {v['wall_s']:.1f}s vs sum of step times {v['steps_s']:.1f}s "
                  f"= {v['wall_s'] / v['steps_s']:.2f}x   ({v['command']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with train.npz and test.npz")
    ap.add_argument("--rows", default="1,2,3,4", help="which rows, comma-separated, in this order (with 4, 1 goes first: 4 needs its time)")
    ap.add_argument("--pipeline", action="store_true", help="also rows 1 and 2 through ctbot pipeline run")
    ap.add_argument("--limit", type=int, default=0, help="train on this many images (0: all)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a TrainParams key in rows 1 and 2 (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--votes", action="store_true",
                    help="rows 1 and 2 also print other votes on their embeddings (k, weighting, "
                         "an edited gallery, test-time shifts)")
    ap.add_argument("--budget", type=float, default=0.0, help="row 4's train CPU seconds (default: row 1's)")
    # internal: run one row in this process and print its RESULT line
    ap.add_argument("--row", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--train-npz", help=argparse.SUPPRESS)
    ap.add_argument("--test-npz", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="row 1 on 500 images for one epoch: the script still runs (no figures judged)")
    args = ap.parse_args(argv)
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return 0

    data = Path(args.data_dir)
    if args.smoke:
        if not (data / "train.npz").is_file():
            print(f"bench_model --smoke: skipped, no MNIST at {data} (the full data set is not in the repo)")
            return 0
        args.rows, args.limit, args.param = "1", 500, args.param + ["epochs=1"]
    for p in (data / "train.npz", data / "test.npz"):
        if not p.is_file():
            ap.error(f"{p} not found (pass --data-dir)")
    rows = [int(r) for r in args.rows.split(",")]
    if 4 in rows and not args.budget and 1 not in rows:
        ap.error("row 4 needs row 1 (or --budget)")
    if 4 in rows:   # row 4 takes row 1's CPU time as its budget
        rows = sorted(rows, key=lambda r: (r != 1, r))
    # Otherwise the order given, pipeline rows too: `--rows 2,1` runs v0 first, so a
    # second run in reverse order shows how much the machine's drift moved the ratio.
    rows += [10 + r for r in rows if r in (1, 2)] if args.pipeline else []
    scratch = Path(tempfile.mkdtemp(prefix="bench-model-"))
    results: dict[int, dict] = {}
    t0 = time.time()
    try:
        train_npz = limited(data / "train.npz", args.limit, scratch)
        for r in rows:
            cmd = [sys.executable, __file__, "--row", str(r), "--train-npz", str(train_npz),
                   "--test-npz", str(data / "test.npz"), "--scratch", str(scratch),
                   "--threads", str(args.threads)] + [f"--param={p}" for p in args.param] + \
                (["--votes"] if args.votes else [])
            if r == 4:
                cmd += ["--budget", str(args.budget or results[1]["train_cpu_s"])]
            print(f"[row {r}] {NAMES[r] if r < 10 else 'pipeline ' + NAMES[r - 10]} ...", flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            if p.returncode or not line:
                print(f"[row {r}] failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}", flush=True)
                if args.smoke:
                    return 1
                continue
            results[r] = json.loads(line[-1][4:])
            print(f"[row {r}] " + json.dumps(results[r]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    load = os.getloadavg()
    n = args.limit or 60000
    print(f"\ntrain images: {n}, eval 10000, {args.threads} threads, bench wall {time.time() - t0:.0f}s, "
          f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} cores")
    print_table(results)
    for r, v in results.items():
        if "votes" in v:
            print(f"row {r} votes (top-1 on the same embeddings): "
                  + ", ".join(f"{k} {a:.2%}" for k, a in v["votes"].items()))
    print("RESULT " + json.dumps({str(k): v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
