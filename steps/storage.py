"""One interface over an S3 bucket (AWS, MinIO, GCS interop) and a local directory.

A store is addressed by a root URI: ``s3://bucket/prefix`` or a filesystem path.
Keys are always '/'-separated and relative to the root. botocore is imported lazily
so that importing this module costs nothing.
"""
from __future__ import annotations

import os
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (if_none_match) or changed (if_match)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime  # timezone-aware UTC
    etag: str = ""


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def is_aws(endpoint_url: str | None) -> bool:
    if not endpoint_url:
        return True
    return (urllib.parse.urlsplit(endpoint_url).hostname or "").endswith(".amazonaws.com")


_session_lock = threading.Lock()
_session = None


def _create_client(**kwargs):
    """An S3 client from this process's one botocore session, as boto3's default: the
    session caches the service model, and making clients from it is not thread-safe."""
    global _session
    import botocore.session

    with _session_lock:
        if _session is None:
            _session = botocore.session.get_session()
        return _session.create_client("s3", **kwargs)


def s3_client(endpoint_url: str | None = None):
    """An S3 client honouring S3_ENDPOINT_URL (MinIO, GCS interop, moto). Since botocore
    1.36 every request carries a CRC checksum by default, which GCS's interop API and
    older MinIO reject: other endpoints get checksums only where S3 requires them.

    botocore's own client, not boto3's: the calls used here are the same, and every
    pipeline task is a fresh process, where importing boto3 (and s3transfer) cost about
    0.1 s of each task's start."""
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("S3_ENDPOINT_URL") or None
    compat = {} if is_aws(endpoint_url) else {"request_checksum_calculation": "when_required",
                                                "response_checksum_validation": "when_required"}
    return _create_client(
        endpoint_url=endpoint_url,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(retries={"max_attempts": 5, "mode": "standard"},
                      s3={"addressing_style": "path"} if endpoint_url else None, **compat),
    )


def preload_s3() -> None:
    """Load botocore's S3 model into this process's session (pipelines.task_host, before
    it forks its tasks), so that a client made after costs milliseconds, not 0.2 s.
    Placeholder keys: no credentials are looked up here, nor kept in the session."""
    _create_client(region_name="us-east-1", aws_access_key_id="preload", aws_secret_access_key="preload")


class Store:
    """Conditional writes (``if_none_match``: only if absent; ``if_match``: only if the
    object still has that tag) make read-modify-write safe across processes: the model
    registry relies on them (S3 since 2024, MinIO, moto; a lock file locally)."""
    root: str

    def get_bytes(self, key: str) -> bytes: ...
    def get_tagged(self, key: str) -> tuple[bytes | None, str | None]: ...
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None, *,
                  if_match: str | None = None, if_none_match: bool = False) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[ObjectInfo]: ...
    def uri(self, key: str) -> str: ...

    # Derived helpers, shared by both backends.
    def get_json(self, key: str, default=None):
        import json
        try:
            return json.loads(self.get_bytes(key))
        except KeyError:
            return default

    def put_json(self, key: str, obj) -> None:
        import json
        self.put_bytes(key, json.dumps(obj, indent=1, sort_keys=True, default=str).encode(),
                       "application/json")

    def upload_file(self, path: str | Path, key: str) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def download_file(self, key: str, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.get_bytes(key))
        return path

    # A package's files are moved a few at a time: each transfer is mostly a round trip
    # to the store (bench/bench_ct.py's refresh spent 0.8 s uploading ten small files).
    TRANSFER_THREADS = 4

    def map(self, fn, items) -> list:
        """[fn(item) for item in items] with up to TRANSFER_THREADS at once, results in
        order; the first failure (in order) is raised once all have ended."""
        items = list(items)
        if len(items) < 2:
            return [fn(item) for item in items]
        self._before_threads()
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(self.TRANSFER_THREADS, len(items))) as pool:
            futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    def _before_threads(self) -> None:
        """What must exist before threads share this store."""

    def copy_prefix(self, src: str, dst: str) -> list[str]:
        """Copy every object under ``src`` to ``dst``; returns the new keys."""
        out = []
        for obj in list(self.list(src)):
            new = dst + obj.key[len(src):]
            self.put_bytes(new, self.get_bytes(obj.key))
            out.append(new)
        return out


class S3Store(Store):
    def __init__(self, root: str, client=None):
        self.bucket, prefix = split_s3_uri(root)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.root = f"s3://{self.bucket}/{self.prefix}"
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _before_threads(self) -> None:
        _ = self.client   # one client, made once: botocore's clients are thread-safe, their creation is not

    def _k(self, key: str) -> str:
        return self.prefix + key.lstrip("/")

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise KeyError(self.uri(key)) from None

    def get_tagged(self, key):
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except self.client.exceptions.NoSuchKey:
            return None, None
        return resp["Body"].read(), resp["ETag"]

    def put_bytes(self, key, data, content_type=None, *, if_match=None, if_none_match=False):
        from botocore.exceptions import ClientError
        extra = {"ContentType": content_type} if content_type else {}
        if if_match:
            extra["IfMatch"] = if_match
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise PreconditionFailed(self.uri(key)) from None
            raise

    def exists(self, key):
        from botocore.exceptions import ClientError
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def list(self, prefix="", start_after=None):
        kwargs = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
        if start_after:
            kwargs["StartAfter"] = self._k(start_after)
        for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
            for o in page.get("Contents", []):
                yield ObjectInfo(o["Key"][len(self.prefix):], o["Size"], o["LastModified"],
                                 o.get("ETag", "").strip('"'))

    def uri(self, key):
        return f"s3://{self.bucket}/{self._k(key)}"


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.path = Path(root).expanduser().resolve()
        self.root = str(self.path)

    def _p(self, key: str) -> Path:
        p = (self.path / key.lstrip("/")).resolve()
        if self.path != p and self.path not in p.parents:
            raise ValueError(f"key escapes the store: {key!r}")
        return p

    def get_bytes(self, key):
        try:
            return self._p(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(self.uri(key)) from None

    def get_tagged(self, key):
        try:
            data = self._p(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None, None
        return data, _tag(data)

    def put_bytes(self, key, data, content_type=None, *, if_match=None, if_none_match=False):
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        if not (if_match or if_none_match):
            self._replace(p, data)
            return
        import fcntl
        with open(p.with_name(f".{p.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # check and write as one step, across processes
            current = p.read_bytes() if p.is_file() else None
            if (if_none_match and current is not None) or \
                    (if_match and (current is None or _tag(current) != if_match)):
                raise PreconditionFailed(self.uri(key))
            self._replace(p, data)

    @staticmethod
    def _replace(p: Path, data: bytes) -> None:
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)  # atomic, like an S3 put

    def exists(self, key):
        return self._p(key).is_file()

    def delete(self, key):
        self._p(key).unlink(missing_ok=True)

    def list(self, prefix="", start_after=None):
        if not self.path.exists():
            return
        keys = sorted(
            str(p.relative_to(self.path)).replace(os.sep, "/")
            for p in self.path.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        for key in keys:
            if key.startswith(prefix) and (start_after is None or key > start_after):
                st = self._p(key).stat()
                yield ObjectInfo(key, st.st_size,
                                 datetime.fromtimestamp(st.st_mtime, tz=UTC))

    def uri(self, key):
        return str(self._p(key))

    def remove_tree(self, prefix: str) -> None:
        shutil.rmtree(self._p(prefix), ignore_errors=True)


def _tag(data: bytes) -> str:
    import hashlib
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def open_store(root: str, client=None) -> Store:
    """``s3://bucket/prefix`` -> S3Store, anything else -> LocalStore."""
    if root.startswith("s3://"):
        return S3Store(root, client=client)
    if "://" in root and not root.startswith("file://"):
        raise ValueError(f"unsupported store URI {root!r}: use s3://bucket/prefix or a path")
    return LocalStore(root.removeprefix("file://"))


def read_uri(uri: str) -> bytes:
    """Read one object given its full URI (s3://bucket/key or a local path)."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        return S3Store(f"s3://{bucket}").get_bytes(key)
    try:
        return Path(uri.removeprefix("file://")).read_bytes()
    except FileNotFoundError:
        raise KeyError(uri) from None


def list_uri(uri: str, client=None) -> list[ObjectInfo]:
    """Objects under a URI prefix, with keys given as full URIs (``client``: an S3 client
    to reuse)."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        st = S3Store(f"s3://{bucket}", client=client)
        return [ObjectInfo(f"s3://{bucket}/{o.key}", o.size, o.last_modified, o.etag)
                for o in st.list(prefix)]
    p = Path(uri.removeprefix("file://"))
    if p.is_file():
        st = p.stat()
        return [ObjectInfo(str(p), st.st_size, datetime.fromtimestamp(st.st_mtime, tz=UTC))]
    return [ObjectInfo(str(p / o.key), o.size, o.last_modified) for o in LocalStore(p).list()]
