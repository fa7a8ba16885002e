"""Read a data snapshot into a data set plus a data card (steps.dataset: the images
themselves, or with a shard cache their rows).

    python -m steps.ingest --out-dir D [--eval-uri URI] URI [URI ...]

A URI is an object (s3://bucket/key or a local path) or a prefix (ending in '/', or a
local directory) that expands to its objects. Formats:
  * .npz with x (N,28,28) or (N,784) and y (N,)
  * PNG folders <label>/<name>.png (the label is the parent folder's name)
  * IDX pairs, raw or .gz: '<stem>-images-idx3-ubyte' with '<stem>-labels-idx1-ubyte'

Nothing here raises on bad data: unreadable objects go to card["errors"], wrong shapes to
card["shape_issues"], bad labels to card["label_issues"] and bad pixel values to
card["value_issues"], each naming the object's URI, for validate to judge. Training rows
identical to an eval image are dropped here (and counted in card["leakage"]) so no later
step can train or search on them.

Shard cache (``cache=`` a store): what an object decodes to is kept in the store under
cache/shards/, keyed by the object's URI and content tag (its S3 ETag; an MD5 of the file
locally): its pixels in <tag>.npz and, in a small sidecar <tag>.meta.npz, its labels, one
hash per image and the issues found. A run reads and decodes only objects it has not
seen (a rewritten object has a new tag and is read again) and of the others only the
sidecars, which for data of several objects come in one read: the shard index
(cache/shards/index/, keyed by the URIs) holds every sidecar those URIs had at their last
ingest, and is rewritten when that changes. The output directory then holds the rows
form of steps.dataset (labels, hashes and where each row's pixels are), not the pixels,
which train and embed read from the cache. Leakage is still checked against the whole eval set, from the hashes. The
card's "cache" says how many objects were new and how many came from the cache; its
"prep" the step's own seconds and the bytes it read.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import posixpath
import re
import struct
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steps import dataset, storage
from steps.dataset import image_hashes
from steps.layout import DATA_CARD_JSON, shard_index_key, shard_key, shard_meta_key

# Bump when what a shard holds, or how an object is decoded, changes: old shards are ignored.
SHARD_FORMAT = 2

DIGITS = [str(d) for d in range(10)]


@dataclass
class Loaded:
    """What one source (an object, or an IDX pair) contributed."""
    uri: str
    size: int
    fmt: str
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    issues: dict = field(default_factory=dict)  # kind -> issue dict, kinds as in the card
    h: np.ndarray | None = None   # image_hashes(x), computed once and cached with the shard
    tag: str | None = None        # the content tag of the unit it came from (see _units)
    part: str | None = None       # the shard key that holds its pixels (None: only in x)
    offset: int = 0               # its first row in that shard


class BadObject(Exception):
    """The object cannot be read at all (corrupt, truncated, wrong format)."""


# ---------------------------------------------------------------- listing

def expand(uris: list[str], reader: _Reader | None = None) -> tuple[list[tuple[str, int, str]], list[dict]]:
    """((uri, size, etag) of every object, prefixes expanded, sorted and de-duplicated;
    errors for prefixes that hold nothing). The etag is "" where the listing has none
    (local files)."""
    reader = reader or _Reader()
    found: dict[str, tuple[int, str]] = {}
    errors = []
    for uri in uris:
        local = not uri.startswith("s3://")
        path = Path(uri.removeprefix("file://")) if local else None
        if not local and not uri.endswith("/") and not _looks_like_data(uri):
            uri += "/"  # s3://bucket/data means the folder, as a person would mean it
        if uri.endswith("/") or (local and path.is_dir()):
            objs = reader.list(uri)
            if not objs:
                errors.append({"uri": uri, "error": "no objects under this prefix"})
            for o in objs:
                found[o.key] = (o.size, o.etag)
        elif local:
            found[str(path)] = (path.stat().st_size if path.is_file() else -1, "")
        else:
            # one listing call gives the size and ETag; a missing key is reported when read
            same = [o for o in reader.list(uri) if o.key == uri]
            found[uri] = (same[0].size, same[0].etag) if same else (-1, "")
    return sorted((u, size, etag) for u, (size, etag) in found.items()), errors


def _looks_like_data(uri: str) -> bool:
    n = _name(uri).lower()
    return n.endswith((".npz", ".png", ".gz")) or _idx_role(uri) is not None


def _name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def _idx_role(uri: str) -> str | None:
    n = _name(uri).lower()
    if "idx3" in n:
        return "images"
    if "idx1" in n:
        return "labels"
    return None


def _idx_stem(uri: str) -> str:
    """Pairs 'train-images-idx3-ubyte.gz' with 'train-labels-idx1-ubyte' (same folder)."""
    d, n = posixpath.split(uri)
    n = re.sub(r"\.gz$", "", n.lower())
    n = n.replace("images", "{}").replace("labels", "{}").replace("idx3", "idx").replace("idx1", "idx")
    return f"{d}/{n}"


# ---------------------------------------------------------------- decoding

def _to_uint8(x: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """Pixels as uint8 0..255. Floats in 0..1 are scaled; floats in 0..255 rounded."""
    if x.dtype == np.uint8:
        return x, None
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
        return np.zeros(x.shape, np.uint8), {"problem": f"pixel dtype {x.dtype} is not numeric"}
    xf = x.astype(np.float64, copy=False)
    if not np.isfinite(xf).all():
        return np.zeros(x.shape, np.uint8), {"problem": "pixels contain NaN or inf"}
    lo, hi = (float(xf.min()), float(xf.max())) if xf.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        return np.clip(np.rint(xf), 0, 255).astype(np.uint8), {
            "problem": f"pixel values {lo:g}..{hi:g} outside 0..255", "min": lo, "max": hi}
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0:
        xf = xf * 255.0
    return np.rint(xf).astype(np.uint8), None


def _images(x: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """(N,28,28) view of x, or a description of its wrong shape."""
    if x.ndim == 2 and x.shape[1] == 784:
        return x.reshape(-1, 28, 28), None
    if x.ndim == 4 and 1 in (x.shape[1], x.shape[3]):
        x = x.reshape(x.shape[0], *[s for s in x.shape[1:] if s != 1] or [1])
    if x.ndim == 3 and x.shape[1:] == (28, 28):
        return x, None
    shape = "x".join(str(s) for s in x.shape[1:]) or "scalar"
    return None, f"images are {shape}, need 28x28 (array shape {tuple(x.shape)})"


def _labels(y: np.ndarray, uri: str, out: Loaded) -> np.ndarray:
    """Labels as uint8; values that are not integers 0..255 are recorded and become 255
    (out of range, so validate names them) rather than silently wrapping."""
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.isfinite(y).all()):
        out.issues["label_issues"] = {"uri": uri, "problem": f"labels of dtype {y.dtype} are not integers"}
        return np.full(len(y), 255, np.uint8)
    yi = np.rint(y).astype(np.int64)
    bad = (yi != y) | (yi < 0) | (yi > 9)
    if bad.any():
        vals = sorted({float(v) if v != int(v) else int(v) for v in np.unique(y[bad])})
        out.issues["label_issues"] = {"uri": uri, "count": int(bad.sum()), "values": vals[:20],
                                      "problem": "labels out of range 0-9: "
                                                 + ", ".join(str(v) for v in vals[:20])}
    return np.where((yi < 0) | (yi > 255) | (yi != y), 255, yi).astype(np.uint8)


def _load_npz(data: bytes, uri: str, size: int) -> Loaded:
    if not data.startswith(b"PK"):
        raise BadObject("not a zip file (an .npz must be a numpy zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            keys = set(z.files)
            kx = next((k for k in ("x", "X", "images", "x_train") if k in keys), None)
            ky = next((k for k in ("y", "Y", "labels", "y_train") if k in keys), None)
            if kx is None or ky is None:
                raise BadObject(f"needs arrays x and y, has {sorted(keys) or 'none'}")
            x, y = z[kx], z[ky]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise BadObject(f"unreadable npz: {e}") from None
    out = Loaded(uri, size, "npz")
    if len(x) != len(np.asarray(y).reshape(-1)):
        raise BadObject(f"x has {len(x)} images but y has {np.asarray(y).size} labels")
    imgs, problem = _images(x)
    if problem:
        out.issues["shape_issues"] = {"uri": uri, "shape": list(x.shape), "problem": problem}
        return out
    out.x, vproblem = _to_uint8(imgs)
    if vproblem:
        out.issues["value_issues"] = {"uri": uri, **vproblem}
    out.y = _labels(y, uri, out)
    return out


def _load_png(data: bytes, uri: str, size: int) -> Loaded:
    from PIL import Image, UnidentifiedImageError

    out = Loaded(uri, size, "png")
    label = posixpath.basename(posixpath.dirname(uri))
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadObject(f"unreadable PNG: {e}") from None
    arr = np.asarray(img.convert("L"))
    if arr.shape != (28, 28):
        out.issues["shape_issues"] = {"uri": uri, "shape": list(arr.shape),
                                      "problem": f"image is {arr.shape[0]}x{arr.shape[1]}, need 28x28"}
        return out
    if label not in DIGITS:
        out.issues["label_issues"] = {"uri": uri, "count": 1, "values": [label],
                                      "problem": f"folder name {label!r} is not a label 0-9"}
        out.x, out.y = arr[None], np.array([255], np.uint8)
        return out
    out.x, out.y = arr[None].astype(np.uint8), np.array([int(label)], np.uint8)
    return out


def _parse_idx(data: bytes, what: str) -> np.ndarray:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise BadObject(f"corrupt gzip in IDX {what}: {e}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise BadObject(f"not an unsigned-byte IDX {what} file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BadObject(f"truncated IDX {what} header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    n = int(np.prod(dims)) if dims else 0
    if len(data) - header != n:
        raise BadObject(f"IDX {what} holds {len(data) - header} bytes, header says {n}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _load_idx_pair(img_uri: str, img_data: bytes, lab_uri: str, lab_data: bytes, size: int) -> Loaded:
    x = _parse_idx(img_data, "images")
    y = _parse_idx(lab_data, "labels")
    out = Loaded(img_uri, size, "idx")
    if y.ndim != 1 or len(x) != len(y):
        raise BadObject(f"{len(x)} images but {y.size} labels in {lab_uri}")
    imgs, problem = _images(x)
    if problem:
        out.issues["shape_issues"] = {"uri": img_uri, "shape": list(x.shape), "problem": problem}
        return out
    out.x, out.y = imgs, _labels(y, lab_uri, out)
    return out


# ---------------------------------------------------------------- ingest

class _Reader:
    """Lists and reads objects by URI with one S3 client for every bucket (a client costs
    ~0.1 s to make, the first in a process more) and a few threads, so a folder of
    thousands of small PNGs does not take minutes."""

    def __init__(self, client=None):
        self._client = client   # e.g. the shard cache's, when it is in S3 too
        self._stores: dict[str, storage.Store] = {}
        self.bytes = 0   # read so far (the data card reports it)

    def store(self, bucket: str) -> storage.Store:
        if bucket not in self._stores:
            store = storage.open_store(f"s3://{bucket}", client=self._client)
            self._client = store.client   # built once, here, before any threads race
            self._stores[bucket] = store
        return self._stores[bucket]

    def list(self, uri: str) -> list[storage.ObjectInfo]:
        if uri.startswith("s3://"):
            return storage.list_uri(uri, client=self.store(storage.split_s3_uri(uri)[0]).client)
        return storage.list_uri(uri)

    def read(self, uri: str) -> bytes:
        data = self._read(uri)
        self.bytes += len(data)
        return data

    def _read(self, uri: str) -> bytes:
        try:
            if uri.startswith("s3://"):
                bucket, key = storage.split_s3_uri(uri)
                return self.store(bucket).get_bytes(key)
            return storage.read_uri(uri)
        except KeyError:
            raise BadObject("object not found") from None
        except (IsADirectoryError, PermissionError) as e:
            raise BadObject(str(e)) from None

    def read_many(self, uris: list[str]):
        """(uri, bytes | BadObject) in order."""
        from concurrent.futures import ThreadPoolExecutor

        for bucket in {storage.split_s3_uri(u)[0] for u in uris if u.startswith("s3://")}:
            self.store(bucket)   # before the threads race

        def one(uri):
            try:
                return uri, self._read(uri)
            except BadObject as e:
                return uri, e
        with ThreadPoolExecutor(max_workers=8) as pool:
            for uri, data in pool.map(one, uris):
                self.bytes += 0 if isinstance(data, BadObject) else len(data)  # counted here, not in threads
                yield uri, data


def _units(objects: list[tuple[str, int, str]]):
    """Group the listing into units that decode together: one .npz, an IDX pair, or a
    folder tree of PNGs (<root>/<label>/<name>.png). Returns (units, errors, skipped);
    a unit is (kind, [(uri, size, etag), ...])."""
    errors, skipped = [], []
    idx_parts: dict[str, dict[str, tuple]] = {}
    pngs: dict[str, list] = {}
    units = []
    for obj in objects:
        uri = obj[0]
        name = _name(uri).lower()
        if _idx_role(uri):
            idx_parts.setdefault(_idx_stem(uri), {})[_idx_role(uri)] = obj
        elif name.endswith(".npz"):
            units.append(("npz", [obj]))
        elif name.endswith(".png"):
            pngs.setdefault(posixpath.dirname(posixpath.dirname(uri)), []).append(obj)
        else:
            skipped.append({"uri": uri, "reason": "not .npz, .png or IDX"})
    units += [("png", objs) for _root, objs in sorted(pngs.items())]
    for _stem, parts in sorted(idx_parts.items()):
        if set(parts) != {"images", "labels"}:
            (obj,) = parts.values()
            missing = "labels-idx1" if "images" in parts else "images-idx3"
            errors.append({"uri": obj[0], "error": f"IDX file without its {missing} partner"})
            continue
        units.append(("idx", [parts["images"], parts["labels"]]))
    return units, errors, skipped


def _content_tag(uri: str, etag: str) -> str | None:
    """The object's ETag, or for a local file the MD5 of its bytes (a path's mtime would
    miss a same-second rewrite); None when it cannot be read (the read reports why)."""
    if etag:
        return etag
    if uri.startswith("s3://"):
        return None
    try:
        return hashlib.md5(Path(uri.removeprefix("file://")).read_bytes(), usedforsecurity=False).hexdigest()
    except OSError:
        return None


def _unit_tag(kind: str, objs: list[tuple]) -> str | None:
    tags = [_content_tag(uri, etag) for uri, _size, etag in objs]
    if any(t is None for t in tags):
        return None
    doc = json.dumps([SHARD_FORMAT, kind, [[o[0], t] for o, t in zip(objs, tags, strict=True)]])
    return hashlib.sha256(doc.encode()).hexdigest()


def _shard_files(items: list[Loaded]) -> tuple[bytes, bytes]:
    """(pixels, sidecar) of one unit: its images concatenated, and the labels, hashes and,
    as JSON, each item's source, issues and row count."""
    meta = [{"uri": it.uri, "size": it.size, "fmt": it.fmt, "issues": it.issues,
             "n": None if it.y is None else int(len(it.y))} for it in items]
    with_x = [it for it in items if it.y is not None]
    pixels, sidecar = io.BytesIO(), io.BytesIO()
    np.savez(pixels, x=np.concatenate([it.x for it in with_x]) if with_x else np.zeros((0, 28, 28), np.uint8))
    np.savez(sidecar, meta=np.array(json.dumps(meta)),
             y=np.concatenate([it.y for it in with_x]) if with_x else np.zeros(0, np.uint8),
             h=np.concatenate([it.h for it in with_x]) if with_x else np.zeros(0, "S16"))
    return pixels.getvalue(), sidecar.getvalue()


def _shard_items(sidecar: bytes, tag: str) -> list[Loaded]:
    """The items of a cached unit from its sidecar: labels and hashes, the pixels left in
    the shard (``part``/``offset`` say where)."""
    with np.load(io.BytesIO(sidecar), allow_pickle=False) as z:
        meta, y, h = json.loads(str(z["meta"])), z["y"], z["h"]
    items, at = [], 0
    for m in meta:
        item = Loaded(m["uri"], m["size"], m["fmt"], issues=m["issues"], tag=tag)
        if m["n"] is not None:
            item.y, item.h = y[at:at + m["n"]], h[at:at + m["n"]]
            item.part, item.offset = shard_key(tag), at
            at += m["n"]
        items.append(item)
    return items


def _fetch_sidecars(cache: storage.Store, tags: list[str]) -> dict[str, bytes | None]:
    """Every unit's sidecar at once (None: not cached), a few requests in flight: with
    many objects, a request's round trip is most of a cached run's data preparation."""
    from concurrent.futures import ThreadPoolExecutor

    getattr(cache, "client", None)  # build an S3 client once, before the threads race

    def one(tag):
        try:
            return tag, cache.get_bytes(shard_meta_key(tag))
        except (KeyError, OSError):
            return tag, None
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, tags))


def _read_index(cache: storage.Store, key: str, wanted: set[str]) -> tuple[dict[str, bytes], int]:
    """(tag -> sidecar for the wanted tags the shard index holds, the bytes read); an
    index that is missing or unreadable holds nothing."""
    try:
        data = cache.get_bytes(key)
    except (KeyError, OSError):
        return {}, 0
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {t: z[t].tobytes() for t in wanted & set(z.files)}, len(data)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return {}, len(data)


def _write_index(cache: storage.Store, key: str, sidecars: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{t: np.frombuffer(b, np.uint8) for t, b in sidecars.items()})
    with contextlib.suppress(OSError):   # the index only saves requests: the sidecars are written
        cache.put_bytes(key, buf.getvalue())


def _cache_unit(cache: storage.Store, tag: str, items: list[Loaded]) -> bytes:
    """Pixels first, then the sidecar that makes the shard visible to later runs; returns
    the sidecar."""
    pixels, sidecar = _shard_files(items)
    cache.put_bytes(shard_key(tag), pixels)
    cache.put_bytes(shard_meta_key(tag), sidecar)
    at = 0
    for it in items:
        if it.y is not None:
            it.part, it.offset = shard_key(tag), at
            at += len(it.y)
    return sidecar


def _decode_unit(kind: str, objs: list[tuple], reader: _Reader) -> tuple[list[Loaded], list[dict]]:
    items, errors = [], []
    if kind == "idx":
        (iu, _, _), (lu, _, _) = objs
        try:
            idata, ldata = reader.read(iu), reader.read(lu)
            items.append(_load_idx_pair(iu, idata, lu, ldata, len(idata) + len(ldata)))
        except BadObject as e:
            errors.append({"uri": f"{iu} + {_name(lu)}", "error": str(e)})
    else:
        decode = _load_npz if kind == "npz" else _load_png
        for uri, data in reader.read_many([o[0] for o in objs]):
            try:
                if isinstance(data, BadObject):
                    raise data
                items.append(decode(data, uri, len(data)))
            except BadObject as e:
                errors.append({"uri": uri, "error": str(e)})
    for it in items:
        if it.x is not None:
            it.h = image_hashes(it.x)
    return items, errors


def load_sources(uris: list[str], cache: storage.Store | None = None
                 ) -> tuple[list[Loaded], list[dict], list[dict], dict]:
    """(loaded sources, errors [{uri, error}], skipped [{uri, reason}], cache stats).

    With a cache store, a unit whose content tag has a shard there is taken from its
    sidecar (labels and hashes; the pixels stay in the store); any other unit is read,
    decoded and hashed, and (when nothing in it was unreadable) its shard written for the
    next run. The sidecars of a snapshot of several units come from its shard index (one
    request) where it has them, and the index is rewritten when they changed. The stats
    count objects new and cached, and the bytes read of each."""
    reader = _Reader(getattr(cache, "client", None))   # one S3 client for the listing, reads and cache
    objects, errors = expand(uris, reader)
    units, unit_errors, skipped = _units(objects)
    errors += unit_errors
    loaded: list[Loaded] = []
    stats = {"objects_new": 0, "objects_cached": 0, "new": [], "sidecar_bytes": 0}
    tags = [_unit_tag(kind, objs) for kind, objs in units]
    known = {t for t in tags if t}
    sidecars: dict[str, bytes | None] = {}
    index_key = shard_index_key(uris) if cache is not None and len(known) > 1 else None
    if index_key:
        sidecars, n_bytes = _read_index(cache, index_key, known)
        stats["sidecar_bytes"] += n_bytes
    from_index = set(sidecars)
    missing = [t for t in tags if t and t not in sidecars]
    if cache is not None and missing:
        fetched = _fetch_sidecars(cache, missing)
        sidecars.update(fetched)
        stats["sidecar_bytes"] += sum(len(b) for b in fetched.values() if b is not None)
    usable: dict[str, bytes] = {}   # what the index is to hold afterwards
    for (kind, objs), tag in zip(units, tags, strict=True):
        if sidecars.get(tag) is not None:
            try:
                loaded += _shard_items(sidecars[tag], tag)
                stats["objects_cached"] += len(objs)
                usable[tag] = sidecars[tag]
                continue
            except (KeyError, ValueError, OSError, zipfile.BadZipFile):
                pass   # an unreadable sidecar: a miss, the objects are read again
        items, bad = _decode_unit(kind, objs, reader)
        for it in items:
            it.tag = tag
        loaded += items
        errors += bad
        stats["objects_new"] += len(objs)
        stats["new"] += [o[0] for o in objs]
        if cache is not None and tag and not bad:
            usable[tag] = _cache_unit(cache, tag, items)
    if index_key and set(usable) != from_index:
        _write_index(cache, index_key, usable)
    stats["object_bytes"] = reader.bytes
    return loaded, sorted(errors, key=lambda e: e["uri"]), skipped, stats


@dataclass
class Merged:
    """What ingest writes for one side (training data or eval): ``rows`` y, h, src and,
    per row, part and row (where its pixels are: ``parts[part]`` is a shard key, or None
    for ``inline``, the decoded images no shard holds)."""
    rows: dict
    parts: list[str | None]
    inline: np.ndarray
    sources: list[dict]
    issues: dict


def _merge(loaded: list[Loaded]) -> Merged:
    """Concatenate; PNGs from one folder are reported as one source (one entry per object
    would bloat the card for thousands of files)."""
    groups: dict[str, dict] = {}
    cols: dict[str, list] = {"y": [], "h": [], "src": [], "part": [], "row": []}
    inline, n_inline, parts = [], 0, {}
    issues: dict[str, list] = {"shape_issues": [], "label_issues": [], "value_issues": []}
    for item in loaded:
        for kind, issue in item.issues.items():
            issues[kind].append(issue)
        if item.y is None:
            continue
        key = posixpath.dirname(posixpath.dirname(item.uri)) + "/" if item.fmt == "png" else item.uri
        g = groups.setdefault(key, {"uri": key, "format": item.fmt, "size": 0, "n": 0, "objects": 0,
                                    "tag": item.tag, "_i": len(groups)})
        n = len(item.y)
        g["size"] += item.size
        g["n"] += n
        g["objects"] += 1
        start = item.offset if item.part else n_inline
        if not item.part:
            inline.append(item.x)
            n_inline += n
        cols["y"].append(item.y)
        cols["h"].append(item.h if item.h is not None else image_hashes(item.x))
        cols["src"].append(np.full(n, g["_i"], np.int32))
        cols["part"].append(np.full(n, parts.setdefault(item.part, len(parts)), np.int32))
        cols["row"].append(np.arange(start, start + n, dtype=np.int64))
    sources = [{k: v for k, v in g.items() if k != "_i"} for g in groups.values()]
    for s in sources:
        if s["format"] != "png":
            s.pop("objects")
    empty = {"y": np.uint8, "h": "S16", "src": np.int32, "part": np.int32, "row": np.int64}
    rows = {k: np.concatenate(v) if v else np.zeros(0, empty[k]) for k, v in cols.items()}
    return Merged(rows, list(parts), np.concatenate(inline) if inline else np.zeros((0, 28, 28), np.uint8),
                  sources, issues)


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    return fingerprint_of(image_hashes(x), y)


def fingerprint_of(h: np.ndarray, y: np.ndarray) -> str:
    """The data set's content: its images' hashes and labels, in order (so it is the same
    whether the pixels were read or not)."""
    d = hashlib.sha256()
    d.update(np.ascontiguousarray(h, "S16").tobytes())
    d.update(np.ascontiguousarray(y, np.uint8).tobytes())
    return "sha256:" + d.hexdigest()


def counts(y: np.ndarray) -> dict[str, int]:
    c = np.bincount(y[y <= 9].astype(np.int64), minlength=10) if len(y) else np.zeros(10, int)
    return {str(i): int(c[i]) for i in range(10)}


def _drop_leaked(rows: dict, sources: list[dict], eval_h: np.ndarray) -> tuple[dict, dict]:
    """``rows`` without the training images identical to an eval image, and what was dropped."""
    h, src = rows["h"], rows["src"]
    leaked = np.isin(h, eval_h) if len(h) else np.zeros(0, bool)
    by_source = {}
    for i in np.flatnonzero(leaked):
        by_source[sources[src[i]]["uri"]] = by_source.get(sources[src[i]]["uri"], 0) + 1
    info = {"dropped": int(leaked.sum()), "n_before": int(len(h)),
            "by_source": [{"uri": u, "n": n} for u, n in sorted(by_source.items())]}
    return {k: v[~leaked] for k, v in rows.items()}, info


def _write_side(out: Path, which: str, m: Merged, rows: dict, cache: storage.Store | None) -> None:
    """Without a cache, <which>.npz with the pixels (the arrays form of steps.dataset);
    with one, the rows form: the pixels stay in the shards, except images no shard holds
    (an object of a unit that had an unreadable one), kept in <which>_inline.npz."""
    if cache is None:
        x = m.inline[rows["row"]]
        np.savez(out / f"{which}.npz", x=x, y=rows["y"], h=rows["h"], src=rows["src"])
        return
    parts = []
    for key in m.parts:
        if key is None:
            np.savez(out / f"{which}_inline.npz", x=m.inline)
            parts.append({"file": f"{which}_inline.npz"})
        else:
            parts.append({"key": key})
    dataset.write_rows(out, which, rows, parts, cache.root)


def _side_card(m: Merged, rows: dict, errors: list, stats: dict, cache) -> dict:
    card = {"n": int(len(rows["y"])), "counts": counts(rows["y"]), "sources": m.sources,
            "fingerprint": fingerprint_of(rows["h"], rows["y"]), "errors": errors,
            **{k: v for k, v in m.issues.items() if v}}
    if cache is not None:
        card["cache"] = _cache_card(stats)
    return card


def ingest(uris: list[str], out_dir: str, eval_uri: str | None = None,
           cache: storage.Store | None = None) -> dict:
    """Write the data set (steps.dataset: data.npz and eval.npz, or with a cache their rows
    form) and data_card.json to out_dir. Returns the data card. ``cache``: the store that
    keeps decoded shards (module docstring)."""
    t0 = time.perf_counter()
    if isinstance(uris, str):
        uris = [uris]
    if not uris:
        raise ValueError("ingest needs at least one data URI")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The eval set loads beside the training data: with a warm shard cache both are mostly
    # round trips to the store (a listing, then sidecars), which overlap.
    from concurrent.futures import ThreadPoolExecutor

    getattr(cache, "client", None)   # one S3 client, built before the threads share it
    with ThreadPoolExecutor(max_workers=1) as pool:
        eval_loading = pool.submit(load_sources, [eval_uri], cache) if eval_uri else None
        loaded, errors, skipped, stats = load_sources(list(uris), cache)
        e_loaded, e_errors, _, e_stats = eval_loading.result() if eval_loading else ([], [], [], {})
    m = _merge(loaded)
    card_eval, rows, leakage = None, m.rows, None
    if eval_uri:
        em = _merge(e_loaded)
        _write_side(out, "eval", em, em.rows, cache)
        card_eval = {"uri": eval_uri, **_side_card(em, em.rows, e_errors, e_stats, cache)}
        if len(em.rows["h"]):
            rows, leakage = _drop_leaked(m.rows, m.sources, em.rows["h"])
    _write_side(out, "data", m, rows, cache)
    card = {**_side_card(m, rows, errors, stats, cache), "skipped": skipped, "uris": list(uris)}
    if leakage is not None:
        card["leakage"] = leakage
    if card_eval is not None:
        card["eval"] = card_eval
    card["prep"] = {"seconds": round(time.perf_counter() - t0, 3),
                    "bytes_read": {"objects": stats["object_bytes"] + e_stats.get("object_bytes", 0),
                                   "shard_sidecars": stats["sidecar_bytes"] + e_stats.get("sidecar_bytes", 0)}}
    (out / DATA_CARD_JSON).write_text(json.dumps(card, indent=1))
    return card


def _cache_card(stats: dict, limit: int = 50) -> dict:
    """The card's "cache": counts, and the new objects by name (the first ``limit``)."""
    new = stats["new"]
    return {"objects_new": stats["objects_new"], "objects_cached": stats["objects_cached"],
            "new": new[:limit], **({"new_not_listed": len(new) - limit} if len(new) > limit else {})}


def summary(card: dict) -> dict:
    """The short form printed by the CLI and kept in step status."""
    return {"n": card["n"], "counts": card["counts"], "fingerprint": card["fingerprint"],
            "sources": len(card["sources"]), "errors": len(card["errors"]),
            "skipped": len(card.get("skipped", [])),
            "eval_n": card.get("eval", {}).get("n"),
            "leaked_dropped": card.get("leakage", {}).get("dropped", 0),
            **({"prep": card["prep"]} if "prep" in card else {}),
            **({"objects_new": card["cache"]["objects_new"],
                "objects_cached": card["cache"]["objects_cached"]} if "cache" in card else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("uris", nargs="+", help="objects or prefixes (s3://bucket/key, paths)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--eval-uri", help="the fixed eval set (npz or any supported format)")
    ap.add_argument("--cache", help="store root (s3://bucket/prefix or a directory) that keeps "
                                    "decoded shards, so unchanged objects are not read again")
    args = ap.parse_args(argv)
    cache = storage.open_store(args.cache) if args.cache else None
    print(json.dumps(summary(ingest(args.uris, args.out_dir, args.eval_uri, cache))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
