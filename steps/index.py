"""Build a faiss index over gallery embeddings.

    python -m steps.index --emb gallery_emb.npz --out-dir D [--kind flat|ivf|hnsw]

Embeddings are L2-normalised, so inner product is cosine similarity. "flat" is exact
(IndexFlatIP) and right at MNIST scale; "ivf" and "hnsw" are approximate indexes for
galleries that outgrow exact search. Writes index.faiss, labels.npy (label per row) and
index.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, LABELS_FILE, INFO_FILE = "index.faiss", "labels.npy", "index.json"
GALLERY_FILES = (INDEX_FILE, LABELS_FILE, INFO_FILE)
# Where embed puts a copy of production's index for a refresh to append to.
BASE_DIR = "base_index"


def _make(kind: str, emb: np.ndarray):
    import faiss

    n, dim = emb.shape
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "ivf":
        # ~4*sqrt(n) lists, but keep >= 39 training points per list (faiss' own minimum).
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = min(nlist, max(1, nlist // 8))
        return index, {"nlist": nlist, "nprobe": index.nprobe}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        return index, {"M": 32, "efSearch": 64}
    raise ValueError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}")


def build_index(emb_path: str, out_dir: str, kind: str = "flat", *, base_dir: str | None = None) -> dict:
    """A new index over the embeddings, or with ``base_dir`` (a refresh) a copy of that
    index with them appended: the base's kind and settings are kept."""
    import faiss

    t0 = time.time()
    kind = kind.lower()
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}")
    with np.load(emb_path) as d:
        emb = np.ascontiguousarray(d["emb"], dtype=np.float32)
        labels = d["y"]
    if base_dir is not None:
        return _append(base_dir, emb, labels, out_dir, t0)
    if emb.ndim != 2 or len(emb) == 0 or len(labels) != len(emb):
        raise ValueError(f"{emb_path}: need emb (N,D) with N>0 and one label per row")
    index, settings = _make(kind, emb)
    index.add(emb)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / INDEX_FILE))
    np.save(out / LABELS_FILE, labels)
    info = {"kind": kind, "n": int(index.ntotal), "dim": int(emb.shape[1]), **settings,
            "seconds": round(time.time() - t0, 2)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def _append(base_dir: str, emb: np.ndarray, labels: np.ndarray, out_dir: str, t0: float) -> dict:
    import faiss

    index, base_labels = load_index(base_dir)
    base_info = json.loads((Path(base_dir) / INFO_FILE).read_text())
    if len(emb) and (emb.ndim != 2 or emb.shape[1] != index.d):
        raise ValueError(f"cannot append {emb.shape} embeddings to an index of dimension {index.d}")
    base_n = int(index.ntotal)
    if len(emb):
        index.add(emb)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / INDEX_FILE))
    np.save(out / LABELS_FILE, np.concatenate([base_labels, labels.astype(base_labels.dtype)]))
    settings = {k: v for k, v in base_info.items() if k not in ("n", "seconds", "base_n", "added")}
    info = {**settings, "n": int(index.ntotal), "base_n": base_n, "added": int(len(emb)),
            "seconds": round(time.time() - t0, 2)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def load_index(index_dir: str | Path):
    """(faiss index, labels array) from a directory written by build_index."""
    import faiss

    d = Path(index_dir)
    if not (d / INDEX_FILE).is_file():
        raise FileNotFoundError(f"no {INDEX_FILE} in {d}")
    return faiss.read_index(str(d / INDEX_FILE)), np.load(d / LABELS_FILE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.index", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emb", required=True, help="npz with emb (N,D) and y, from embed")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--kind", default="flat", choices=KINDS)
    args = ap.parse_args(argv)
    print(json.dumps(build_index(args.emb, args.out_dir, args.kind)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
