"""A run's data set on disk: what ingest writes, validate checks, and train, embed and
evaluate read. Two forms, one reader; ``which`` is "data" (training) or "eval".

  arrays  ``<which>.npz`` with x (N,28,28) uint8, y, h (image hashes), src: ingest without
          a shard cache, and data sets made by hand.
  rows    ``<which>_rows.npz`` with y, h, src and, per row, where its pixels are: ``part``
          (an index into parts.json's "parts") and ``row`` (the row in that part).
          ``<which>_parts.json`` is {"store": root, "parts": [{"key": k} | {"file": name}]}: a shard in
          the cache store (steps.ingest), or a file in this directory (rows of objects that
          could not be cached). Ingest with a cache writes this form, so a run's data
          preparation moves only the new objects' bytes plus the cached shards' small
          sidecars; the steps that need pixels (train, embed, evaluate) read them from the
          shard cache themselves.

Validation reads only y, h and src (``read_rows``) and drops rows with ``keep_rows``.
Torch-free.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

META = ("y", "h", "src")


def image_hashes(x: np.ndarray) -> np.ndarray:
    """One 16-byte digest per image, for duplicate and leakage checks."""
    if len(x) == 0:
        return np.zeros(0, dtype="S16")
    flat = np.ascontiguousarray(x, np.uint8).reshape(len(x), -1)
    return np.array([hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in flat], dtype="S16")


def parts_path(data_dir: str | Path, which: str) -> Path:
    return Path(data_dir) / f"{which}_parts.json"


def rows_path(data_dir: str | Path, which: str) -> Path:
    return Path(data_dir) / f"{which}_rows.npz"


def arrays_path(data_dir: str | Path, which: str) -> Path:
    return Path(data_dir) / f"{which}.npz"


def exists(data_dir: str | Path, which: str) -> bool:
    return rows_path(data_dir, which).is_file() or arrays_path(data_dir, which).is_file()


def write_rows(data_dir: str | Path, which: str, meta: dict, parts: list[dict], store_root: str) -> None:
    """The rows form: ``meta`` has y, h, src, part, row; ``parts`` as in <which>_parts.json."""
    np.savez(rows_path(data_dir, which), **meta)
    parts_path(data_dir, which).write_text(json.dumps({"store": store_root, "parts": parts}))


def read_rows(data_dir: str | Path, which: str) -> dict:
    """y, h, src (and part, row in the rows form) without any pixels in the rows form;
    the arrays form is read whole (x included) and its hashes computed when absent.
    FileNotFoundError when neither form is there; ValueError when it is unreadable."""
    rp, ap = rows_path(data_dir, which), arrays_path(data_dir, which)
    path = rp if rp.is_file() else ap
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{ap} is missing: run ingest first") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is unreadable: {e}") from None
    if path == ap:
        x, y = arrays.get("x"), arrays.get("y")
        if x is None or y is None:
            raise ValueError(f"{path} lacks arrays x and y")
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{path}: images must be uint8 28x28, got {x.dtype} {x.shape}")
        if "h" not in arrays or len(arrays["h"]) != len(x):
            arrays["h"] = image_hashes(x)
    y = arrays.get("y")
    if y is None or y.ndim != 1 or any(len(arrays.get(k, y)) != len(y) for k in ("h", "part", "row", "x")):
        raise ValueError(f"{path}: arrays of different lengths (y {None if y is None else y.shape})")
    arrays.setdefault("src", np.zeros(len(y), np.int32))
    return arrays


def keep_rows(data_dir: str | Path, which: str, keep: np.ndarray) -> None:
    """Keep only the rows where ``keep`` is true, in whichever form the data set is."""
    path = rows_path(data_dir, which)
    if not path.is_file():
        path = arrays_path(data_dir, which)
    with np.load(path) as z:
        arrays = {k: z[k][keep] for k in z.files}
    np.savez(path, **arrays)


def images(data_dir: str | Path, which: str, select: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N,28,28), y) of the data set, or of its rows ``select`` only; in the rows
    form only the parts those rows live in are read."""
    if not rows_path(data_dir, which).is_file():
        path = arrays_path(data_dir, which)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run ingest first")
        with np.load(path) as z:
            x, y = z["x"], z["y"]
        return (x, y) if select is None else (x[select], y[select])
    meta = read_rows(data_dir, which)
    part, row, y = meta["part"], meta["row"], meta["y"]
    if select is not None:
        part, row, y = part[select], row[select], y[select]
    x = np.zeros((len(y), 28, 28), np.uint8)
    doc = json.loads(parts_path(data_dir, which).read_text())
    for p in np.unique(part):
        at = part == p
        x[at] = _part_pixels(data_dir, doc, int(p))[row[at]]
    return x, y


def _part_pixels(data_dir, doc: dict, p: int) -> np.ndarray:
    from steps import storage

    spec = doc["parts"][p]
    if "file" in spec:
        data = (Path(data_dir) / spec["file"]).read_bytes()
    else:
        store = _stores.get(doc["store"]) or _stores.setdefault(doc["store"], storage.open_store(doc["store"]))
        try:
            data = store.get_bytes(spec["key"])
        except KeyError:
            sidecar = spec["key"].removesuffix(".npz") + ".meta.npz"
            raise FileNotFoundError(
                f"the shard cache lost {store.uri(spec['key'])} after ingest: run again (a deleted "
                f"cache/shards/ is rebuilt); if only that file went, delete {store.uri(sidecar)} "
                f"and the shard indexes under {store.uri('cache/shards/index/')} too, so that ingest "
                "reads its object anew") from None
    with np.load(io.BytesIO(data)) as z:
        return z["x"]


_stores: dict = {}  # one store (and S3 client) per root for the process


def materialize(data_dir: str | Path, which: str, out_dir: str | Path) -> Path:
    """A plain npz (x, y) of the data set, for code that takes a file: the arrays form's own
    file, else one written to out_dir."""
    path = arrays_path(data_dir, which)
    if path.is_file() and not rows_path(data_dir, which).is_file():
        return path
    x, y = images(data_dir, which)
    out = Path(out_dir) / f"{which}.npz"
    with open(out, "wb") as f:  # an explicit handle keeps numpy from appending '.npz'
        np.savez(f, x=x, y=y)
    return out
