"""A published model package, loaded for serving: embed (torch.export program) then
search (faiss), both in memory; nothing is read from disk after load."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steps import deploy, layout
from steps.evaluate import DEFAULT_K, neighbour_labels, vote_row

log = logging.getLogger("serving.model")

MANIFEST = "manifest.json"
MAX_K = 100


class PackageRefused(Exception):
    """The package failed its checksum or failed to load; str() says which and why."""


@dataclass
class LoadedModel:
    name: str
    version: int
    embed: object               # callable: float32 tensor (N,1,28,28) in [0,1] -> (N,D)
    index: object               # faiss index over L2-normalised gallery embeddings
    labels: np.ndarray          # gallery label per index row
    meta: dict = field(default_factory=dict)
    verified: bool = False      # checked against a manifest
    how: dict = field(default_factory=dict)   # how it searches (serving_index) and embeds ("runtime")

    @property
    def gallery_size(self) -> int:
        return int(self.index.ntotal)

    def predict(self, x: np.ndarray, k: int = DEFAULT_K) -> dict:
        """x: float32 (N,1,28,28) in [0,1]. Returns label (N,) int64, score (N,) float32
        (cosine similarity of the nearest neighbour with that label), neighbor_labels
        (N,k) int64 and neighbor_distances (N,k) float32 (1 - cosine similarity)."""
        sims, ids = self.neighbours(x, self.clamp_k(k))
        return vote(sims, ids, self.labels)

    def predict_many(self, xs: list[np.ndarray], ks: list[int]) -> list[dict]:
        """predict() of several requests as one call: their images in one embed and one
        search (with the largest k), then each request's rows voted with its own k. The
        first k of a search for more neighbours are the k nearest, so each answer is
        predict(x, k)'s up to float noise (tests/unit/test_serving_batching.py)."""
        if len(xs) == 1:
            return [self.predict(xs[0], ks[0])]
        ks = [self.clamp_k(k) for k in ks]
        sims, ids = self.neighbours(np.concatenate(xs), max(ks))
        answers, at = [], 0
        for x, k in zip(xs, ks, strict=True):
            rows = slice(at, at + len(x))
            answers.append(vote(sims[rows, :k], ids[rows, :k], self.labels))
            at += len(x)
        return answers

    def clamp_k(self, k: int) -> int:
        return max(1, min(int(k), self.gallery_size))

    def neighbours(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, gallery ids) of x's k nearest, nearest first."""
        import torch

        with torch.inference_mode():
            emb = self.embed(torch.from_numpy(x)).float().numpy()
        # No renormalising: the network ends in F.normalize, and a query's own scale
        # changes neither its neighbours nor their vote.
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        return self.index.search(emb, k)


def vote(sims: np.ndarray, ids: np.ndarray, gallery_labels: np.ndarray) -> dict:
    """The label by steps.evaluate.vote_row (the vote the pipeline evaluated), with its
    score (similarity of the nearest neighbour of that label) and the neighbours."""
    nb = neighbour_labels(ids, gallery_labels)
    label, score = [], []
    for row_sims, row_labels in zip(sims.tolist(), nb.tolist(), strict=True):
        c = vote_row(row_sims, row_labels)
        label.append(c)
        # Neighbours come nearest first: the first with the label is its best.
        score.append(next((s for s, lab in zip(row_sims, row_labels, strict=True) if lab == c), 0.0))
    dist = np.where(nb >= 0, 1.0 - sims, np.inf).astype(np.float32)
    return {"label": np.array(label, np.int64), "score": np.array(score, np.float32),
            "neighbor_labels": nb, "neighbor_distances": dist}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_manifest(pkg_dir: Path, version: int) -> dict | None:
    """Compare the downloaded files with manifest.json. None when the package has no
    manifest (published before manifests existed); raises PackageRefused on a mismatch."""
    path = pkg_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise PackageRefused(f"unreadable {MANIFEST}: {e}")
    if manifest.get("version") is not None and int(manifest["version"]) != int(version):
        raise PackageRefused(f"{MANIFEST} is for v{manifest['version']}, not v{version}")
    for name, want in sorted(files.items()):
        f = pkg_dir / name
        if not f.is_file():
            raise PackageRefused(f"{name} is in {MANIFEST} but missing")
        if f.stat().st_size != int(want.get("size", -1)) or _sha256(f) != want.get("sha256"):
            raise PackageRefused(f"{name} does not match its checksum in {MANIFEST}")
    return manifest


def fetch(store, model: str, version: int, dest: Path) -> dict | None:
    """Download models/<model>/v<N>/ into dest, checked against its manifest; returns the
    manifest, or None for a package published before manifests (loaded unchecked)."""
    prefix = layout.version_prefix(model, version)
    if not store.exists(prefix + MANIFEST):
        deploy.download_package(store, prefix, str(dest))
        return None
    if hasattr(deploy, "download_version"):  # checks the bytes it fetched: one read
        return deploy.download_version(store, model, version, str(dest))
    if hasattr(deploy, "verify_package"):
        deploy.verify_package(store, model, version)
    deploy.download_package(store, prefix, str(dest))
    return check_manifest(dest, version)


def load_version(store, model: str, version: int, workdir: str | None = None,
                 search: str = "ivf") -> LoadedModel:
    """Download, verify, load and warm up one package; PackageRefused on any failure.
    search: serving.search.SEARCH_MODES."""
    from serving.search import serving_index
    from steps.index import load_index
    from steps.model import load_embedder, optimize_for_cpu

    version = int(version)
    tmp = Path(tempfile.mkdtemp(prefix=f"serve-{model}-v{version}-", dir=workdir))
    try:
        try:
            manifest = fetch(store, model, version, tmp)
        except PackageRefused:
            raise
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise PackageRefused(f"{type(e).__name__}: {e}")
        try:
            embed, runtime = optimize_for_cpu(load_embedder(tmp))
            index, labels = load_index(tmp)
            index, searching = serving_index(index, search)
            meta = json.loads((tmp / "meta.json").read_text()) if (tmp / "meta.json").is_file() else {}
            loaded = LoadedModel(model, version, embed, index, np.asarray(labels), meta,
                                 verified=manifest is not None, how={**searching, "runtime": runtime})
            if loaded.gallery_size != len(loaded.labels) or loaded.gallery_size == 0:
                raise ValueError(f"index has {loaded.gallery_size} rows but {len(loaded.labels)} labels")
            # Warm up: the first calls of an export program are slow; do them before the swap.
            for n in (1, 8):
                loaded.predict(np.zeros((n, 1, 28, 28), np.float32))
        except Exception as e:  # a package that fails to load is refused, whatever the cause
            raise PackageRefused(f"failed to load: {type(e).__name__}: {e}")
        if manifest is None:
            log.warning("%s v%d has no %s: loaded without a checksum check", model, version, MANIFEST)
        return loaded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def set_threads(n: int = 1) -> int:
    """torch and faiss threads per call (0: the CPUs this process may use). One is the
    default: requests run in parallel on their own threads, and a single image is too
    little work to split (on the loaded 2-core machine, one image took 17.6 ms p50 with
    1 thread against 78-123 ms with 2, spinning OpenMP threads waiting on each other)."""
    import faiss
    import torch

    from steps.model import available_cpus
    n = n or available_cpus()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    # Exact search of a batch as one matrix product: this faiss build's default threshold
    # (128,000 queries) scanned per query, 3.6 ms an image at batch 64 against 0.4 ms.
    faiss.cvar.distance_compute_blas_threshold = 20
    return n
