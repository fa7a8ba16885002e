"""What evaluation reuses across runs, kept in the store and keyed by content.

  cache/eval_emb/<weights>-<eval>.npz          the eval set embedded with those weights
                                               (embed's eval.npz: emb, y)
  cache/scores/<weights>-<gallery>-<eval>-<vote>.json   {"top1", "n"}: that model's top-1 on
                                               that eval set with that gallery and vote
  cache/neighbours/<weights>-<gallery>-<eval>-k<k>.npz  sims, ids: each eval image's k
                                               nearest rows of that gallery (exact search)

A refresh reuses production's weights, so the eval set's embeddings under them are the
ones production's own run made, and production's score on the eval set is the one its
run measured: embed then encodes only the new images, and evaluate votes only for the
candidate. A full or warm run reuses production's score the same way. A refresh's gallery
is production's with rows appended, so its nearest rows are production's cached
neighbours merged with the nearest of the appended rows: evaluate searches only the new
rows (steps.evaluate.search_appended).

Fingerprints are content hashes, the same whether computed from local files or from a
published version's manifest.json (which lists each file's sha256): ``weights`` over the
weight files, ``gallery`` over the index and its labels, ``eval`` over the eval set's
labels and image hashes in order (steps.dataset). A changed weight file, gallery or eval
set is another key, so an entry is never stale; EMBED_FORMAT and the vote in a score's key
cover changes of code. Deleting cache/eval_emb/ or cache/scores/ is safe (the next run
embeds or measures again). Torch-free.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from steps import dataset

WEIGHT_FILES = ("model.pt", "model_export.pt")
GALLERY_FILES = ("index.faiss", "labels.npy")
# Bump when how images become embeddings changes (steps.model's input scaling, the
# network's head): cached embeddings of the old code are then never read.
EMBED_FORMAT = 1
EVAL_EMB_PREFIX, SCORES_PREFIX, NEIGHBOURS_PREFIX = "cache/eval_emb/", "cache/scores/", "cache/neighbours/"
# The eval embeddings are 5 MB for 10k images at 128 dimensions, one entry per trained
# model: the ones used or written last are kept (a refresh uses production's; one
# pruned all the same is embedded and written again by the next refresh).
KEEP_EVAL_EMB = 8
# 4 MB for 10k eval images at k=50 (float32 sims, int32 ids), one entry per evaluated
# candidate; only production's is read (by a refresh), so a few suffice.
KEEP_NEIGHBOURS = 8
USED_SUFFIX = ".used"


def _combine(kind: str, digests: dict[str, str], names: tuple[str, ...]) -> str:
    present = [n for n in names if n in digests]
    if not present:
        raise ValueError(f"no {kind} files ({', '.join(names)}) to fingerprint")
    text = "".join(f"{n}:{digests[n]}\n" for n in present)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _file_digests(directory: str | Path, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        path = Path(directory) / name
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def weights_fingerprint(model_dir: str | Path) -> str:
    return _combine("weight", _file_digests(model_dir, WEIGHT_FILES), WEIGHT_FILES)


def gallery_fingerprint(index_dir: str | Path) -> str:
    return _combine("gallery", _file_digests(index_dir, GALLERY_FILES), GALLERY_FILES)


def manifest_fingerprints(manifest: dict) -> tuple[str, str]:
    """(weights, gallery) of a published version, from its manifest's sha256s."""
    digests = {n: f["sha256"] for n, f in manifest["files"].items()}
    return _combine("weight", digests, WEIGHT_FILES), _combine("gallery", digests, GALLERY_FILES)


def eval_fingerprint(data_dir: str | Path) -> str:
    rows = dataset.read_rows(data_dir, "eval")
    h = hashlib.sha256(np.ascontiguousarray(rows["y"], np.int64).tobytes())
    h.update(np.ascontiguousarray(rows["h"]).tobytes())
    return h.hexdigest()[:32]


def eval_emb_key(weights: str, eval_fp: str) -> str:
    return f"{EVAL_EMB_PREFIX}{weights}-{eval_fp}-f{EMBED_FORMAT}.npz"


def score_key(weights: str, gallery: str, eval_fp: str, vote: str) -> str:
    return f"{SCORES_PREFIX}{weights}-{gallery}-{eval_fp}-{vote}-f{EMBED_FORMAT}.json"


def get_eval_embeddings(store, weights: str, eval_fp: str, out_path: str | Path, y: np.ndarray) -> bool:
    """Write the cached eval embeddings to out_path and mark the entry used; False when
    there are none (or they do not fit the eval set's labels: a damaged entry is embedded
    again)."""
    key = eval_emb_key(weights, eval_fp)
    try:
        data = store.get_bytes(key)
        with np.load(io.BytesIO(data)) as z:
            ok = z["emb"].ndim == 2 and np.array_equal(z["y"], y)
    except (KeyError, FileNotFoundError, ValueError, OSError):   # absent, pruned meanwhile, or unreadable
        return False
    if ok:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_bytes(data)
        store.put_bytes(key + USED_SUFFIX, b"")   # its last use, for pruning
    return ok


def put_eval_embeddings(store, weights: str, eval_fp: str, path: str | Path) -> None:
    """Cache embed's eval.npz, then keep only the KEEP_EVAL_EMB entries used or written last."""
    key = eval_emb_key(weights, eval_fp)
    store.put_bytes(key, Path(path).read_bytes())
    _prune(store, EVAL_EMB_PREFIX, KEEP_EVAL_EMB, key)


def _prune(store, prefix: str, keep: int, written: str) -> None:
    """Keep the ``keep`` entries under prefix used or written last (never ``written``)."""
    last: dict[str, tuple] = {}
    for o in store.list(prefix):
        entry = o.key.removesuffix(USED_SUFFIX)
        last[entry] = max(last.get(entry, ()), (o.last_modified, o.key))
    for entry in sorted(last, key=last.__getitem__, reverse=True)[keep:]:
        if entry != written:
            store.delete(entry + USED_SUFFIX)
            store.delete(entry)


def neighbours_key(weights: str, gallery: str, eval_fp: str, k: int) -> str:
    return f"{NEIGHBOURS_PREFIX}{weights}-{gallery}-{eval_fp}-k{int(k)}-f{EMBED_FORMAT}.npz"


def get_neighbours(store, key: str, n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(sims float32 (n, <=k), ids int64) cached under key, marked used; None when absent
    or not for n_queries queries and k neighbours (a damaged entry is searched again)."""
    try:
        with np.load(io.BytesIO(store.get_bytes(key))) as z:
            sims, ids = z["sims"], z["ids"].astype(np.int64)
    except (KeyError, FileNotFoundError, ValueError, OSError):
        return None
    if sims.shape != ids.shape or sims.ndim != 2 or len(sims) != n_queries or sims.shape[1] > k:
        return None
    store.put_bytes(key + USED_SUFFIX, b"")
    return sims, ids


def put_neighbours(store, key: str, sims: np.ndarray, ids: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, sims=np.asarray(sims, np.float32), ids=np.asarray(ids, np.int32))
    store.put_bytes(key, buf.getvalue())
    _prune(store, NEIGHBOURS_PREFIX, KEEP_NEIGHBOURS, key)


def get_score(store, key: str) -> float | None:
    try:
        doc = store.get_json(key)
    except (ValueError, json.JSONDecodeError):
        return None
    return float(doc["top1"]) if isinstance(doc, dict) and "top1" in doc else None


def put_score(store, key: str, top1: float, n: int) -> None:
    store.put_json(key, {"top1": float(top1), "n": int(n)})
