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
    import torch

    from steps.model import EMBED_BATCH, available_cpus, embed_images, load_embedder, optimize_for_cpu

    t0 = time.time()
    torch.set_num_threads(threads or available_cpus())
    with np.load(npz_path) as d:
        x = d["x"]
        y = d["y"] if "y" in d.files else np.full(len(x), 255, np.uint8)
    if x.ndim == 2 and x.shape[1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"{npz_path}: x must be (N,28,28) images, got {x.shape}")
    fn, runtime = optimize_for_cpu(load_embedder(model_dir, prefer=prefer))
    emb = embed_images(fn, x, batch_size=batch_size or EMBED_BATCH).numpy().astype(np.float32)
    # The network normalises already; renormalising guards inner-product search against drift.
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # an explicit handle keeps numpy from appending '.npz'
        np.savez(f, emb=emb, y=y)
    return {"n": int(len(emb)), "dim": int(emb.shape[1]), "out": str(out), "runtime": runtime,
            "seconds": round(time.time() - t0, 2)}


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
