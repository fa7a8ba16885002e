"""The bot is not ready until its job workers are: a command acked before them waits for a
worker to spawn and import, which on a starved machine takes longer than Slack's users wait."""
from __future__ import annotations

import os
import time

from bot.background import ProcessBackground
from tests.helpers import wait_until


def _hold_until(gate: str) -> None:
    """A worker initializer that stays in start-up until the test creates ``gate``."""
    while not os.path.exists(gate):
        time.sleep(0.02)


def test_readiness_waits_for_the_job_workers(tmp_path):
    gate = tmp_path / "gate"
    jobs = ProcessBackground(workers=1, initializer=_hold_until, initargs=(str(gate),))
    try:
        assert jobs.starting() == ""                 # nothing asked to start yet: nothing to wait for
        jobs.start()
        assert jobs.starting() == "0 of 1 job workers up"
        gate.touch()
        wait_until(lambda: jobs.starting() == "", 60, "the job worker to come up")
        pid = jobs.submit(_pid).result(60)          # and it takes jobs
        assert isinstance(pid, int) and pid != os.getpid()
    finally:
        jobs.shutdown()


def _pid(ctx) -> int:
    return os.getpid()


def _fail_until(gate: str) -> None:
    """A worker initializer that fails (as building deps with Redis down would) until
    the test creates ``gate``."""
    if not os.path.exists(gate):
        raise ConnectionError("the state store is down")


def test_workers_that_failed_to_start_are_started_again_by_themselves(tmp_path):
    gate = tmp_path / "gate"
    jobs = ProcessBackground(workers=1, initializer=_fail_until, initargs=(str(gate),), retry_every=0.2)
    try:
        jobs.start()
        said = wait_until(lambda: (s := jobs.starting()).startswith("job workers failed to start") and s,
                          60, "the start to fail")
        assert said.endswith("trying again"), said
        gate.touch()                                 # the dependency is back: no job is submitted
        wait_until(lambda: jobs.starting() == "", 60, "the job workers to be started again")
        assert jobs.submit(_pid).result(60) != os.getpid()
    finally:
        jobs.shutdown()
