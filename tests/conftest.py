"""Real local services for tests: a redis-server and a moto S3 server, one per session."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server():
    """URL of a private redis-server (started here unless TEST_REDIS_URL is given)."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    exe = shutil.which("redis-server")
    if not exe:
        pytest.fail("redis-server not found: run ./dev.sh test, which installs it")
    port = free_port()
    d = tempfile.mkdtemp(prefix="ct-redis-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", d],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server):
    """A clean database for each test."""
    import redis
    redis.Redis.from_url(redis_server).flushdb()
    return redis_server


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server speaking the real HTTP API; S3_ENDPOINT_URL points at it."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = os.environ.get("S3_ENDPOINT_URL")
    os.environ["S3_ENDPOINT_URL"] = url
    yield url
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
