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
import time
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


def set_worker_context(ctx: JobContext) -> None:
    """Called by the worker's initializer (ctbot.wiring.init_job_worker) once it has
    built its own service and client."""
    global _worker_ctx
    _worker_ctx = ctx


def _run_in_worker(fn, args, what: str):
    return _run(_worker_ctx, fn, args, what)


def _ready() -> int:
    return os.getpid()


class ProcessBackground:
    def __init__(self, *, workers: int = 2, initializer, initargs: tuple = (), retry_every: float = 10.0):
        """``initializer(*initargs)`` runs in each worker and must end by calling
        set_worker_context; it is a module-level function so spawn can pickle it. Workers
        that failed to start are started again every ``retry_every`` seconds."""
        self.workers, self.initializer, self.initargs = workers, initializer, initargs
        self.retry_every = retry_every
        self._pool = self._new_pool()
        self._warming: list[Future] = []
        self._failed_at = 0.0

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing
        # spawn, not fork: the bot process has threads (server, scheduler) and forking
        # those can copy a held lock into the child.
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=self.initializer, initargs=self.initargs)

    def start(self, wait: bool = False, timeout: float = 60) -> list[int]:
        """Start the workers now rather than on the first job (they take ~1 s to import
        and connect). With ``wait``, block until they are up; returns their pids."""
        self._warming = [self._pool.submit(_ready) for _ in range(self.workers)]
        return [f.result(timeout) for f in self._warming] if wait else []

    def starting(self) -> str:
        """'' once the workers started by start() have answered; else what readiness
        should say. Until then a job waits for a worker to spawn and import (about 1 s
        on a quiet machine, tens of seconds on a starved one), so the bot is not ready."""
        pending = [f for f in self._warming if not f.done()]
        if pending:
            return f"{len(self._warming) - len(pending)} of {len(self._warming)} job workers up"
        failed = next((f.exception() for f in self._warming if f.exception() is not None), None)
        if failed is None:
            return ""
        # Readiness asks every 0.5 s; a failed start (Redis or the store down as the
        # workers built their deps) is tried again by itself, not on the next job.
        now = time.monotonic()
        if not self._failed_at:
            self._failed_at = now
            log.error("job workers failed to start: %s: %s; trying again every %.0f s",
                      type(failed).__name__, failed, self.retry_every)
        elif now - self._failed_at >= self.retry_every:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self._failed_at = self._new_pool(), 0.0
            self.start()
        return f"job workers failed to start: {type(failed).__name__}; trying again"

    def submit(self, fn, *args, what: str = "") -> Future:
        what = what or fn.__name__
        try:
            return self._pool.submit(_run_in_worker, fn, args, what)
        except BrokenProcessPool:  # a worker died (OOM, kill): start fresh ones
            log.error("background workers died; starting new ones")
            self._pool, self._warming, self._failed_at = self._new_pool(), [], 0.0
            return self._pool.submit(_run_in_worker, fn, args, what)

    def shutdown(self, wait: bool = True) -> None:
        """``wait``: run the jobs already submitted (acked commands) first; else drop the
        queued ones (they are resumed from Redis by whoever runs next)."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
