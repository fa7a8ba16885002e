"""The server's search: an inverted-file index built from a package's flat index gives
the exact search's neighbours on clustered embeddings, with the rows' ids kept."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from serving.model import vote
from serving.search import MIN_IVF_GALLERY, serving_index


def clustered(n: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors around 10 class centres, like trained embeddings; plus 500 queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, dim)).astype(np.float32)
    labels = rng.integers(0, 10, n + 500)
    x = centres[labels] + 0.35 * rng.standard_normal((n + 500, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n], labels[:n], x[n:]


def flat(x: np.ndarray):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def test_ivf_finds_what_exact_search_finds():
    gallery, labels, queries = clustered(MIN_IVF_GALLERY + 5000)
    exact = flat(gallery)
    ivf, info = serving_index(exact, "ivf")
    assert info["search"] == "ivf" and ivf.ntotal == exact.ntotal and 1 <= info["nprobe"] < info["nlist"]
    s_e, i_e = exact.search(queries, 5)
    s_i, i_i = ivf.search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i_e, i_i, strict=True)])
    assert recall > 0.9, recall
    # ids are the gallery's rows: the labels array still applies
    same = vote(s_i, i_i, labels)["label"] == vote(s_e, i_e, labels)["label"]
    assert same.mean() >= 0.99, same.mean()
    assert np.allclose(s_i[:, 0][i_i[:, 0] == i_e[:, 0]], s_e[:, 0][i_i[:, 0] == i_e[:, 0]], atol=1e-5)


def test_exact_small_and_approximate_indexes_are_kept_as_they_are():
    gallery, _, _ = clustered(MIN_IVF_GALLERY + 10)
    exact = flat(gallery)
    assert serving_index(exact, "exact") == (exact, {"search": "exact", "n": exact.ntotal})
    small = flat(gallery[:1000])
    assert serving_index(small, "ivf")[0] is small   # exact search of 1,000 rows is already fast
    hnsw = faiss.IndexHNSWFlat(gallery.shape[1], 8, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(gallery[:2000])
    assert serving_index(hnsw, "ivf")[0] is hnsw


def test_an_unknown_mode_says_which_exist():
    with pytest.raises(ValueError, match="use one of exact, ivf"):
        serving_index(flat(np.eye(4, dtype=np.float32)), "annoy")
