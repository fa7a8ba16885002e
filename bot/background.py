"""Slow work after the ack: answering through response_urls, calling the service.

A listener acks, then ``app.background.submit(job, *args)``. A job is a module-level
function ``job(ctx: JobContext, *args)`` with picklable args (the payload dict, a
parsed command), so it can run in this process or in another one:

* ThreadBackground: a thread pool in this process (tests, embedding the app).
* ProcessBackground: worker processes at a lower OS priority that build their own
  service from the settings. The bot process deploys with this one. Measured
  (bench/bench_ack.py, 2 cores): the slow half of a `/ct status` costs ~5 ms of CPU
  against ~1 ms for its ack, and in one Python process that work holds the GIL the
  acks need. At 20 concurrent commands, p99 ack latency was 75-120 ms with the work on
  threads, 38-58 ms with it in niced worker processes.

Not Bolt's lazy listeners: they deep-copy the whole request per call (~2.7 ms of CPU)
and can only run in this process.
"""
from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What jobs need: the training service, a Slack client and the settings."""
    service: object
    client: object
    settings: object

    @staticmethod
    def respond(response_url: str):
        from slack_bolt.context.respond import Respond
        return Respond(response_url=response_url)


def _run(ctx: JobContext, fn, args, what: str):
    try:
        return fn(ctx, *args)
    except Exception:  # jobs answer the user themselves; this is the last resort
        log.exception("background job %s failed", what)
        return None


class ThreadBackground:
    def __init__(self, ctx: JobContext, workers: int = 4):
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctbot-job")

    def submit(self, fn, *args, what: str = "") -> Future:
        return self._pool.submit(_run, self.ctx, fn, args, what or fn.__name__)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)


# ---- worker processes ---------------------------------------------------------------------

_worker_ctx: JobContext | None = None


def _init_worker(settings, nice: int, log_level: int) -> None:
    """Runs once in each worker process: lower its priority, build its own clients."""
    global _worker_ctx
    if nice:
        os.nice(nice)
    # Runs started here are children of this worker; let the kernel reap them when they
    # end (the run watch in the bot process follows them through /proc and the store).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s[worker] %(levelname)s %(message)s")
    from bot.runtime import build_service, slack_client
    from bot.notifier import SlackNotifier
    client = slack_client(settings)
    service = build_service(settings, SlackNotifier(client, settings.slack_channel, settings))
    _worker_ctx = JobContext(service, client, settings)


def _run_in_worker(fn, args, what: str):
    return _run(_worker_ctx, fn, args, what)


def _ready() -> int:
    return os.getpid()


class ProcessBackground:
    def __init__(self, settings, workers: int = 2, nice: int = 19, log_level: int | None = None):
        self.settings, self.workers, self.nice = settings, workers, nice
        # Workers log like the bot process does, unless told otherwise.
        self.log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing
        # spawn, not fork: the bot process has threads (server, scheduler) and forking
        # those can copy a held lock into the child.
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.settings, self.nice, self.log_level))

    def start(self, wait: bool = False, timeout: float = 60) -> list[int]:
        """Start the workers now rather than on the first job (they take ~1 s to import
        and connect). With ``wait``, block until they are up; returns their pids."""
        futures = [self._pool.submit(_ready) for _ in range(self.workers)]
        return [f.result(timeout) for f in futures] if wait else []

    def submit(self, fn, *args, what: str = "") -> Future:
        what = what or fn.__name__
        try:
            return self._pool.submit(_run_in_worker, fn, args, what)
        except BrokenProcessPool:  # a worker died (OOM, kill): start fresh ones
            log.error("background workers died; starting new ones")
            self._pool = self._new_pool()
            return self._pool.submit(_run_in_worker, fn, args, what)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
