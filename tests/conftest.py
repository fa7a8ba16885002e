"""Real local services for tests: a redis-server and a moto S3 server, one per session."""
from __future__ import annotations

import os
import uuid

import pytest

from devkit.localservices import free_port, start_redis, start_s3  # noqa: F401  (free_port: for tests)

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def redis_server():
    """URL of a private redis-server (started here unless TEST_REDIS_URL is given)."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    try:
        server = start_redis()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A clean database for each test."""
    import redis
    redis.Redis.from_url(redis_server).flushdb()
    return redis_server


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server speaking the real HTTP API; S3_ENDPOINT_URL points at it."""
    server = start_s3()
    old = os.environ.get("S3_ENDPOINT_URL")
    os.environ["S3_ENDPOINT_URL"] = server.endpoint_url
    yield server.endpoint_url
    server.stop()
    if old is None:
        os.environ.pop("S3_ENDPOINT_URL", None)
    else:
        os.environ["S3_ENDPOINT_URL"] = old


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh bucket name on the local S3 server."""
    from steps.storage import s3_client
    name = f"ct-{uuid.uuid4().hex[:10]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(bucket):
    from steps.storage import open_store
    return open_store(f"s3://{bucket}/")
