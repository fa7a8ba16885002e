"""Embed images with a trained model.

    python -m steps.embed --model-dir M --npz data.npz --out emb.npz

The model directory is a train output or a published package: the torch.export program
(model_export.pt) is used when present, else model.pt. Output: npz with emb float32
(N, D), L2-normalised, and y (the labels, copied through).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def embed(model_dir: str, npz_path: str, out_path: str, batch_size: int = 0,
          *, prefer: str = "export", threads: int = 0) -> dict:
    with np.load(npz_path) as d:
        x = d["x"]
        y = d["y"] if "y" in d.files else np.full(len(x), 255, np.uint8)
    if x.ndim == 2 and x.shape[1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"{npz_path}: x must be (N,28,28) images, got {x.shape}")
    return embed_arrays(model_dir, x, y, out_path, batch_size, prefer=prefer, threads=threads)


def embed_arrays(model_dir: str, x: np.ndarray, y: np.ndarray, out_path: str, batch_size: int = 0,
                 *, prefer: str = "export", threads: int = 0, embedder=None) -> dict:
    """embed() of images already in memory (x uint8 (N,28,28), y their labels).
    ``embedder``: one from load_for_embedding(), to load and trace the model once for
    several calls."""
    t0 = time.time()
    fn, runtime = embedder or load_for_embedding(model_dir, prefer=prefer, threads=threads)
    emb = _embed(fn, x, batch_size)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # an explicit handle keeps numpy from appending '.npz'
        np.savez(f, emb=emb, y=y)
    return {"n": int(len(emb)), "dim": int(emb.shape[1]), "out": str(out), "runtime": runtime,
            "seconds": round(time.time() - t0, 2)}


def load_for_embedding(model_dir: str, *, prefer: str = "export", threads: int = 0) -> tuple:
    """(callable, runtime name): the model loaded and optimised for this CPU."""
    import torch

    from steps.model import available_cpus, load_embedder, optimize_for_cpu

    torch.set_num_threads(threads or available_cpus())
    return optimize_for_cpu(load_embedder(model_dir, prefer=prefer))


def _embed(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    from steps.model import EMBED_BATCH, embed_images

    emb = embed_images(fn, x, batch_size=batch_size or EMBED_BATCH).numpy().astype(np.float32)
    # The network normalises already; renormalising guards inner-product search against drift.
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def embed_for_run(store, model_prefix: str, model_dir: str, data_dir: str, out_dir: str) -> dict:
    """The pipeline's embed step: fetch the run's staged model (steps.reuse) and embed the
    gallery (the run's training data, steps.dataset) and the eval set into out_dir. For a
    refresh the gallery is only the rows from objects production has not seen (so only
    their pixels are read), production's index is copied to out_dir/base_index/ for index
    to append to, and added.json names what was added. The eval set's embeddings come from
    the store's cache when these weights embedded this eval set before (steps.eval_cache:
    a refresh's weights are production's), and go into it otherwise."""
    import shutil

    from steps import dataset, eval_cache, layout, reuse
    from steps.index import BASE_DIR, GALLERY_FILES
    from steps.laps import Laps

    lap = Laps()
    reuse.fetch_staged(store, model_prefix, model_dir)
    lap("fetch")
    lineage = reuse.read_lineage(model_dir)
    data, out = Path(data_dir), Path(out_dir)
    select, added = None, None
    if lineage.get("mode") == "refresh":
        card = json.loads((data / layout.DATA_CARD_JSON).read_text())
        base_card = json.loads((Path(model_dir) / layout.DATA_CARD_JSON).read_text())
        select, objects = reuse.new_rows(card, dataset.read_rows(data, "data")["src"], base_card)
        (out / BASE_DIR).mkdir(parents=True, exist_ok=True)
        for name in GALLERY_FILES:
            shutil.copy(Path(model_dir) / name, out / BASE_DIR / name)
        added = {**lineage, "added_images": int(len(select)), "added_objects": objects}
        (out / "added.json").write_text(json.dumps(added))
    weights, eval_fp = eval_cache.weights_fingerprint(model_dir), eval_cache.eval_fingerprint(data)
    eval_path = out / "eval.npz"
    # The checkpoint, not the export program: the same network (model.pt's config and
    # weights) without torch.export's loader, whose first use in a process costs more than
    # the rest of a refresh's embedding (a fresh process, torch's import included, quiet:
    # 2.6-3.7 s from the export program, 1.2 s from the checkpoint; the command is in
    # docs/continuous-training.md). Steps have the project's code; servers need not.
    lap("prepare")
    embedder = load_for_embedding(model_dir, prefer="checkpoint")
    lap("load_model")
    gallery = embed_arrays(model_dir, *dataset.images(data, "data", select), str(out / "gallery.npz"),
                           embedder=embedder)
    lap("gallery")
    t_eval = time.time()
    eval_y = dataset.read_rows(data, "eval")["y"]
    if eval_cache.get_eval_embeddings(store, weights, eval_fp, eval_path, eval_y):
        evaluated = {"n": int(len(eval_y)), "out": str(eval_path), "cached": True}
    else:
        evaluated = {**embed_arrays(model_dir, *dataset.images(data, "eval"), str(eval_path), embedder=embedder),
                     "cached": False}
        eval_cache.put_eval_embeddings(store, weights, eval_fp, eval_path)
    evaluated["seconds"] = round(time.time() - t_eval, 2)
    lap("eval")
    summary = {"gallery": gallery, "eval": evaluated, "weights": weights, "eval_set": eval_fp, "timings": lap.seconds,
               "mode": lineage.get("mode"), "weights_from": lineage.get("weights_from")}
    if added:
        summary["added_images"], summary["added_objects"] = added["added_images"], len(objects)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.embed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--npz", required=True, help="images: npz with x (N,28,28) uint8 and y")
    ap.add_argument("--out", required=True, help="output npz path")
    ap.add_argument("--batch-size", type=int, default=0, help="0: steps.model.EMBED_BATCH (measured there)")
    args = ap.parse_args(argv)
    print(json.dumps(embed(args.model_dir, args.npz, args.out, args.batch_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
