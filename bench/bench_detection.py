"""Cost of a data-watch detection tick against bucket size.

    .venv/bin/python bench/bench_detection.py [--sizes 1000 10000 100000] [--new 100] [--smoke]

For each bucket size N it seeds N objects and the cursor a previous sweep would have
left, then times and counts ticks:
  fast      ListObjectsV2 with StartAfter: after --new objects arrived, with nothing
            new, and after 10 old keys were rewritten (which it cannot see)
  sweep     the periodic full listing, i.e. what a full scan costs; it finds the rewrites

S3 is moto in-process (``moto.mock_aws``): the boto3 client and the S3 API are real,
the network is not. Seeding goes straight into moto's backend (``put_object`` on the
S3 backend, not through boto3) because 100k boto puts take ~20 minutes in moto; the
seeded objects are backdated 30 days, as old data in a real bucket would be, so the
sweep's overlap window holds only recent objects. State lives in a private
redis-server (started here; or set REDIS_URL).

Moto sorts the whole bucket on every list call, so its StartAfter call still does
O(N) work server-side; real S3 seeks the key index. The "objects listed" and "list
calls" columns are what the tick costs on any S3; the seconds are moto's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
             "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(k, v)
os.environ.pop("S3_ENDPOINT_URL", None)  # in-process moto, not a server

BUCKET = "ct-bench-detection"


def start_redis() -> tuple[str, subprocess.Popen | None, str | None]:
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"], None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="ct-bench-redis-")
    proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/15", proc, d


class ListCalls:
    def __init__(self, client):
        self.n = 0
        client.meta.events.register("before-call.s3.ListObjectsV2", self._hit)

    def _hit(self, **_):
        self.n += 1

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def seed(backend, keys, spread: timedelta | None = None, body=b"0123456789") -> None:
    """Straight into moto's S3 backend; with ``spread``, LastModified is spread evenly
    over that much past time (oldest first), like data that arrived over a month."""
    from moto.core.utils import utcnow
    now = utcnow()
    for i, k in enumerate(keys):
        obj = backend.put_object(BUCKET, k, body)
        if spread is not None:
            obj.last_modified = now - spread + spread * (i / len(keys)) - timedelta(days=1)


def bench_size(n: int, n_new: int, redis_url: str) -> list[dict]:
    import boto3
    from moto import mock_aws
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from core.state import StateStore
    from scheduler.watcher import BucketWatcher
    from steps.storage import open_store

    rows = []
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        t = time.perf_counter()
        old = [f"data/2026-10-{i % 28 + 1:02d}-batch/{i % 10}/{i:07d}.png" for i in range(n)]
        seed(backend, old, spread=timedelta(days=30))
        seed_s = time.perf_counter() - t

        state = StateStore.from_url(redis_url)
        state.r.flushdb()
        store = open_store(f"s3://{BUCKET}/", client=client)
        calls = ListCalls(client)

        def tick(name, **kw):
            t0 = time.perf_counter()
            scan = w.scan(**kw)
            w.commit(scan, waiting={})
            rows.append({"size": n, "tick": name, "seconds": time.perf_counter() - t0,
                         "listed": scan.listed, "calls": calls.take(), "found": len(scan.found)})

        w = BucketWatcher(state, store, "data/", sweep_seconds=10**9, overlap_seconds=3600)
        # Start from the cursor a previous sweep would have left (newest key, newest
        # LastModified, the tail of objects inside the overlap window), so that the
        # largest bucket is listed in full only once, by the sweep below.
        objs = [(o.name, o.last_modified.replace(tzinfo=UTC), o.etag.strip('"'))
                for o in backend.get_bucket(BUCKET).keys.values()]
        wm = max(lm for _, lm, _ in objs)
        tail = {k: etag for k, lm, etag in objs if lm >= wm - w.overlap}
        state.commit_watch("data/", BucketWatcher._cursor(max(old), wm, swept_at=time.time()),
                           tail=tail, replace_tail=True, waiting={})
        seed(backend, [f"data/2026-11-22T0900-batch/{i % 10}/{i:05d}.png" for i in range(n_new)])
        tick(f"fast, {n_new} new")
        tick("fast, nothing new")
        seed(backend, old[:: max(1, n // 10)][:10], body=b"rewritten")
        tick("fast, 10 rewrites")
        tick("sweep, 10 rewrites", sweep=True)
        rows[-1]["tail"] = len(state.cursor_hash("data/", "tail"))
        rows[0]["seed_s"] = seed_s
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="one small bucket: the script still runs (no figures judged)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.new = [200], 10
    redis_url, proc, tmp = start_redis()
    try:
        print(f"{'bucket':>8}  {'tick':<22} {'seconds':>8} {'listed':>8} {'calls':>6} {'found':>6}")
        for n in args.sizes:
            rows = bench_size(n, args.new, redis_url)
            for r in rows:
                print(f"{r['size']:>8}  {r['tick']:<22} {r['seconds']:>8.3f} {r['listed']:>8} "
                      f"{r['calls']:>6} {r['found']:>6}", flush=True)
            print(f"{'':>8}  (seeding {n} objects into moto's backend: {rows[0]['seed_s']:.1f} s; "
                  f"tail kept in Redis after the sweep: {rows[-1]['tail']} keys)", flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait(5)
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
