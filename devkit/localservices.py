"""Throwaway local Redis and S3 for the demo and the tests, when none is configured."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRedis:
    url: str
    proc: subprocess.Popen
    workdir: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis() -> LocalRedis:
    """A private redis-server on a free loopback port, nothing persisted."""
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server is not installed: run ./dev.sh setup "
                           "(or apt-get install redis-server), or set REDIS_URL")
    import redis

    port, workdir = free_port(), tempfile.mkdtemp(prefix="ct-redis-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    return LocalRedis(f"redis://127.0.0.1:{port}/0", proc, workdir)


@dataclass
class LocalS3:
    endpoint_url: str
    server: object

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def scratch_bucket(bucket: str):
    """For a benchmark, one process end to end: moto's S3 server with ``bucket`` made, its
    endpoint in S3_ENDPOINT_URL (placeholder keys unless the environment has some), and a
    scratch directory. Yields (store, directory); both are gone afterwards."""
    from steps.storage import open_store, s3_client

    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    s3 = start_s3()
    os.environ["S3_ENDPOINT_URL"] = s3.endpoint_url
    work = Path(tempfile.mkdtemp(prefix=f"{bucket}-"))
    try:
        s3_client(s3.endpoint_url).create_bucket(Bucket=bucket)
        yield open_store(f"s3://{bucket}/"), work
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


def start_s3() -> LocalS3:
    """moto's S3 server: the real S3 HTTP API on loopback, for boto3 via endpoint_url."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise RuntimeError("moto[server] is not installed: run ./dev.sh setup") from None
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    return LocalS3(f"http://127.0.0.1:{port}", server)
