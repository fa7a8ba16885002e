"""The nearest-neighbour search the server runs over a package's gallery.

A package carries an exact (flat) index, which is what the pipeline evaluated. Exact
search reads the whole gallery for every query: 60k x 128 floats, 30 MB, about 4 ms
per image on these machines whether alone or batched, more than the network itself.
"ivf" builds an inverted-file index from the same vectors while the package loads
(before the swap, so no request waits for it): k-means splits the gallery into about
sqrt(N) lists and a query scans the `nprobe` lists nearest to it. The embeddings
cluster by class, so the neighbours that vote are almost always in those lists;
`bench/bench_serving.py` prints how often ivf's label equals the exact one.
"""
from __future__ import annotations

import math
import time

SEARCH_MODES = ("exact", "ivf")
MIN_IVF_GALLERY = 20_000     # below this, exact search is already well under a millisecond
NPROBE_FRACTION = 1 / 16     # of the lists; recall and speed measured in bench_serving
KMEANS_SEED = 1234           # the same package gives the same lists on every replica


def check_mode(mode: str) -> str:
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}: use one of {', '.join(SEARCH_MODES)}")
    return mode


def serving_index(index, mode: str = "ivf") -> tuple[object, dict]:
    """(index to search, what was built). Rows keep their ids, so the package's label
    array still applies. Indexes that are not flat (already approximate) are kept."""
    import faiss

    check_mode(mode)
    n = int(index.ntotal)
    if mode == "exact" or not isinstance(index, faiss.IndexFlat) or n < MIN_IVF_GALLERY:
        return index, {"search": "exact", "n": n}
    t0 = time.perf_counter()
    vectors = index.reconstruct_n(0, n)
    dim = vectors.shape[1]
    nlist = int(round(math.sqrt(n)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlat(dim, index.metric_type), dim, nlist, index.metric_type)
    ivf.cp.niter, ivf.cp.seed = 10, KMEANS_SEED
    ivf.train(vectors)
    ivf.add(vectors)
    ivf.nprobe = max(1, round(nlist * NPROBE_FRACTION))
    return ivf, {"search": "ivf", "n": n, "nlist": nlist, "nprobe": ivf.nprobe,
                 "build_seconds": round(time.perf_counter() - t0, 2)}
