"""New-data detection under the store's data prefix, at a cost of O(new objects).

S3 lists keys in lexicographic order and cannot filter by LastModified, so no single
cursor is both cheap and complete. The watcher therefore has two listing modes:

* fast (every tick): ``list(prefix, StartAfter=<largest key seen>)``. It returns only
  keys that sort after everything seen, so it costs O(new) *when new data arrives
  under keys that sort later*: date- or batch-named folders such as
  ``data/2026-11-22T0912-batch/3/x.png``. It cannot see a rewrite of an existing
  key, nor a new key that sorts earlier (``data/3/new.png`` after ``data/9/``).

* sweep (every ``sweep_seconds``, default ``settings.data_sweep_minutes``): one full
  listing, O(bucket), that catches those two cases with dagster's cursor: an object
  is new when its LastModified is after the watermark (the newest LastModified seen
  by the previous sweep) *minus an overlap*, and it is not in the "tail": the
  {key: etag} of every object inside that overlap window at the previous sweep, plus
  whatever fast ticks have found since. The overlap covers objects that become
  visible after younger ones (LastModified of a multipart upload is its start time,
  and listings are only eventually ordered); the tail stops them being reported
  twice. Redis holds O(objects in the window + found since the sweep), not O(bucket).

Trade-off: an object whose LastModified is older than (watermark - overlap) when it
first becomes visible is missed: a multipart upload open longer than the overlap, or
files copied into a local store with their old mtimes (``cp -p``, ``rsync -a``).
Rewrites are seen within one sweep interval, not one tick. A full per-key manifest
would close the first gap at O(bucket) Redis memory; at 1M PNG keys that is ~100 MB.

A baseline tick (no cursor yet) takes everything already present as seen.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.state import StateStore
from core.types import NewData
from steps.storage import ObjectInfo

CURSOR_VERSION = 1


def tag(o: ObjectInfo) -> str:
    """What identifies one version of an object: the ETag on S3 (an identical rewrite is
    not new data), size + mtime in a local directory (which has no ETag)."""
    return o.etag or f"{o.size}:{o.last_modified.timestamp():.6f}"


def is_data(key: str) -> bool:
    """Folder markers and hidden files (uploaders' temp files) are not data."""
    return not key.endswith("/") and not key.rsplit("/", 1)[-1].startswith(".")


def fingerprint(entries: dict) -> str:
    """Dedupe key of a set of objects: sha256 over sorted key + tag lines."""
    h = hashlib.sha256()
    for key in sorted(entries):
        h.update(f"{key}\t{entries[key]['tag']}\n".encode())
    return "sha256:" + h.hexdigest()


def label_of(key: str) -> str | None:
    """The class of a PNG in a ``.../<label>/<name>.png`` folder, else None."""
    parts = key.split("/")
    if len(parts) >= 2 and key.lower().endswith(".png") and parts[-2].isascii() and parts[-2].isdigit():
        return parts[-2]
    return None


def class_counts(keys) -> dict:
    counts: dict = {}
    for k in keys:
        label = label_of(k)
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    return counts


def entry(o: ObjectInfo) -> dict:
    return {"tag": tag(o), "size": o.size,
            "last_modified": o.last_modified.astimezone(UTC).isoformat()}


def new_data(entries: dict) -> NewData:
    """NewData for a set of {key: entry}: keys oldest first, per-class counts for PNGs."""
    keys = sorted(entries, key=lambda k: (entries[k]["last_modified"], k))
    return NewData(keys=keys, total_bytes=sum(int(entries[k]["size"]) for k in keys),
                   fingerprint=fingerprint(entries), counts=class_counts(keys))


@dataclass
class Scan:
    """One listing's findings and the cursor state to commit if the tick goes through."""
    mode: str                  # baseline | fast | sweep
    listed: int                # objects the listing returned: the tick's cost
    found: dict                # key -> entry, new since the cursor (waiting ones excluded)
    waiting: dict              # key -> entry, found earlier but not yet alerted/run
    cursor: dict
    tail: dict = field(default_factory=dict)   # key -> tag to add (or to replace the tail with)
    replace_tail: bool = False


class BucketWatcher:
    def __init__(self, state: StateStore, store, prefix: str, *, clock=time.time,
                 sweep_seconds: float = 3600.0, overlap_seconds: float = 3600.0):
        self.state = state
        self.store = store
        self.prefix = prefix
        self.clock = clock
        self.sweep_seconds = sweep_seconds
        self.overlap = timedelta(seconds=overlap_seconds)

    def cursor(self) -> dict | None:
        return self.state.get_cursor(self.prefix)

    def scan(self, sweep: bool | None = None) -> Scan:
        """List what is new. sweep=None: a sweep when one is due, else a fast tick."""
        cursor = self.cursor()
        if cursor is None:
            return self._baseline()
        waiting = {k: json.loads(v) for k, v in self.state.cursor_hash(self.prefix, "waiting").items()}
        due = self.clock() - float(cursor.get("swept_at") or 0) >= self.sweep_seconds
        if sweep or (sweep is None and due):
            return self._sweep(cursor, waiting)
        return self._fast(cursor, waiting)

    def commit(self, scan: Scan, *, waiting: dict) -> None:
        """Advance the cursor; ``waiting`` is what stays found-but-unhandled. The pending
        summary grows by this scan's new objects in the same Redis transaction."""
        self.state.commit_watch(
            self.prefix, scan.cursor, tail=scan.tail, replace_tail=scan.replace_tail,
            waiting={k: json.dumps(v) for k, v in waiting.items()},
            pending_objects=len(scan.found),
            pending_bytes=sum(int(e["size"]) for e in scan.found.values()),
            pending_counts=class_counts(scan.found))

    def reset(self) -> None:
        self.state.reset_cursor(self.prefix)

    # ---- the three listing modes ----------------------------------------------------

    def _baseline(self) -> Scan:
        objs = list(self.store.list(self.prefix))
        wm = max((o.last_modified for o in objs), default=None)
        cursor = self._cursor(max((o.key for o in objs), default=None), wm, swept_at=self.clock())
        return Scan("baseline", len(objs), found={}, waiting={}, cursor=cursor,
                    tail=self._window(objs, wm), replace_tail=True)

    def _fast(self, cursor: dict, waiting: dict) -> Scan:
        after = cursor.get("key")
        objs = list(self.store.list(self.prefix, start_after=after))
        found = {o.key: entry(o) for o in objs if is_data(o.key) and o.key not in waiting}
        new_cursor = dict(cursor, key=max([after or ""] + [o.key for o in objs]) or None)
        return Scan("fast", len(objs), found=found, waiting=waiting, cursor=new_cursor,
                    tail={o.key: tag(o) for o in objs}, replace_tail=False)

    def _sweep(self, cursor: dict, waiting: dict) -> Scan:
        objs = list(self.store.list(self.prefix))
        tail = self.state.cursor_hash(self.prefix, "tail")
        wm = _parse(cursor.get("last_modified"))
        since = wm - self.overlap if wm else None
        found = {}
        for o in objs:
            if not is_data(o.key) or (since is not None and o.last_modified < since):
                continue
            known = waiting[o.key]["tag"] if o.key in waiting else tail.get(o.key)
            if known != tag(o):
                found[o.key] = entry(o)
        waiting = {k: v for k, v in waiting.items() if k not in found}  # rewritten again
        new_wm = max([o.last_modified for o in objs] + ([wm] if wm else []), default=None)
        keys = [o.key for o in objs] + ([cursor["key"]] if cursor.get("key") else [])
        new_cursor = self._cursor(max(keys, default=None), new_wm, swept_at=self.clock())
        return Scan("sweep", len(objs), found=found, waiting=waiting, cursor=new_cursor,
                    tail=self._window(objs, new_wm), replace_tail=True)

    def _window(self, objs: list[ObjectInfo], wm: datetime | None) -> dict:
        if wm is None:
            return {}
        return {o.key: tag(o) for o in objs if o.last_modified >= wm - self.overlap}

    @staticmethod
    def _cursor(key: str | None, wm: datetime | None, swept_at: float) -> dict:
        return {"version": CURSOR_VERSION, "key": key,
                "last_modified": wm.astimezone(UTC).isoformat() if wm else None,
                "swept_at": swept_at}


def _parse(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None
