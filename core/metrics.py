"""Prometheus metrics of the bot process, served at GET /metrics (bot/server.py).

The objects live here, below bot/, scheduler/ and pipelines/, so each of them records
with one line (``metrics.run_finished(run)``, ``metrics.dependency_error(e)``). They sit
in their own registry, so /metrics shows ctbot's series and the process's, nothing a
library registered by accident. Job worker processes (bot/background.py) keep their own
copies, which nobody scrapes: what matters for alerts (acks, commands, finished runs,
the data watch) is recorded in the bot process. Suggested alerts: docs/operations.md.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Slack's limit is 3 s; the buckets resolve the range around it.
ACK_SECONDS = Histogram("ctbot_ack_seconds", "Time from a Slack request's arrival to its ack",
                        ["kind"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5),
                        registry=REGISTRY)
COMMANDS = Counter("ctbot_commands_total", "Slash commands and button clicks by name and outcome",
                   ["command", "outcome"], registry=REGISTRY)
SLACK_CALLS = Counter("ctbot_slack_api_calls_total", "Slack Web API calls", ["method"], registry=REGISTRY)
SLACK_RATE_LIMITED = Counter("ctbot_slack_api_rate_limited_total", "Slack Web API answers with HTTP 429",
                             ["method"], registry=REGISTRY)
SLACK_ERRORS = Counter("ctbot_slack_api_errors_total", "Slack Web API calls that failed",
                       ["method", "error"], registry=REGISTRY)
RUNS = Counter("ctbot_runs_finished_total", "Finished training runs by outcome", ["outcome"],
               registry=REGISTRY)
# Demo runs take seconds, full MNIST on CPU minutes, a sweep up to hours.
RUN_SECONDS = Histogram("ctbot_run_duration_seconds", "Training run duration, request to finish",
                        ["outcome"], buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
                        registry=REGISTRY)
LAST_RETRAIN = Gauge("ctbot_last_successful_retrain_timestamp_seconds",
                     "When the last training run succeeded (Unix time)", registry=REGISTRY)
LAST_DEPLOY = Gauge("ctbot_last_deploy_timestamp_seconds",
                    "When a run last published a production model (Unix time)", registry=REGISTRY)
PRODUCTION_TOP1 = Gauge("ctbot_production_top1", "kNN top-1 of the production model on the eval set",
                        registry=REGISTRY)
PRODUCTION_VERSION = Gauge("ctbot_production_version", "The registry version the production alias points at "
                           "(0 before the first deploy)", registry=REGISTRY)
ACTIVE_RUN_STARTED = Gauge("ctbot_active_run_started_timestamp_seconds",
                           "When the active run was requested (Unix time); 0 when none", registry=REGISTRY)
DATA_WATCH_LAG = Gauge("ctbot_data_watch_lag_seconds",
                       "Age of the oldest new object when the data watch found it", registry=REGISTRY)
DATA_WATCH_LAST_TICK = Gauge("ctbot_data_watch_last_tick_timestamp_seconds",
                             "When the data watch last listed the bucket (Unix time)", registry=REGISTRY)
DEPENDENCY_ERRORS = Counter("ctbot_dependency_errors_total", "Errors talking to Redis, the store (S3) or KFP",
                            ["dependency"], registry=REGISTRY)

DEPENDENCIES = ("redis", "s3", "kfp")
# An exception's top-level module names the dependency that raised it.
_MODULES = {"redis": "redis", "botocore": "s3", "boto3": "s3", "kfp": "kfp", "kfp_server_api": "kfp"}

for _dep in DEPENDENCIES:   # every series exists from the start, so rate() and alerts see 0
    DEPENDENCY_ERRORS.labels(_dep)
for _outcome in ("succeeded", "failed", "canceled"):
    RUNS.labels(_outcome)


# The production gauges follow the registry's alias, whichever process moved it: a promote
# or rollback runs in a job worker (its gauges are never scraped), a pipeline deploy in
# the pipeline. The process that serves /metrics sets them when it learns of a move (a
# finished run, its own promote), and a scrape more than this after the last read starts
# another read of the alias, off the scrape's thread (the ack path's event loop serves
# /metrics too), so the following scrape shows it.
PRODUCTION_MAX_AGE = 5.0
_production_source: dict = {"read": None, "at": float("-inf"), "busy": False}
_production_lock = threading.Lock()


def follow_production(read=None) -> None:
    """``read() -> {"version", "top1"} | None`` (TrainingService.production) is asked at
    most every PRODUCTION_MAX_AGE seconds, in the background of a scrape; None stops."""
    with _production_lock:
        _production_source.update(read=read, at=float("-inf"))
    _refresh_production()   # the first scrape already sees the alias, as far as it can


def production(version, top1) -> None:
    """Production is now ``version`` with ``top1`` (None: unknown, left as it was)."""
    if version is not None:
        PRODUCTION_VERSION.set(int(version))
    if top1 is not None:
        PRODUCTION_TOP1.set(float(top1))


def _refresh_production() -> None:
    with _production_lock:
        read, now = _production_source["read"], time.monotonic()
        if read is None or _production_source["busy"] or now - _production_source["at"] < PRODUCTION_MAX_AGE:
            return
        _production_source.update(at=now, busy=True)
    threading.Thread(target=_read_production, args=(read,), name="ctbot-production-gauges", daemon=True).start()


def _read_production(read) -> None:
    try:
        prod = read()
    except Exception as e:  # scrapes answer with the last known values
        dependency_error(e)
        prod = None
    finally:
        with _production_lock:
            _production_source["busy"] = False
    if prod and _production_source["read"] is read:   # no alias yet: what a finished run set stands
        production(prod.get("version"), prod.get("top1"))


def exposition() -> tuple[bytes, str]:
    """(body, content type) of a scrape."""
    _refresh_production()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def command(name: str, outcome: str) -> None:
    COMMANDS.labels(name or "unknown", outcome).inc()


def slack_call(method: str, *, status: int | None = None, error: str = "") -> None:
    SLACK_CALLS.labels(method).inc()
    if status == 429:
        SLACK_RATE_LIMITED.labels(method).inc()
    if error:
        SLACK_ERRORS.labels(method, error).inc()


def dependency_error(what) -> None:
    """Count an error against redis, s3 or kfp: ``what`` is that name or the exception
    (classified by the module that defines it; others are not counted)."""
    if isinstance(what, BaseException):
        what = _MODULES.get(type(what).__module__.split(".")[0])
    if what in DEPENDENCIES:
        DEPENDENCY_ERRORS.labels(what).inc()


def run_finished(run) -> None:
    """Record a finished core.types.RunRecord: outcome, duration, retrain and deploy times."""
    outcome = run.state if run.state in ("succeeded", "failed", "canceled") else "failed"
    end = run.finished_at or time.time()
    RUNS.labels(outcome).inc()
    RUN_SECONDS.labels(outcome).observe(max(0.0, end - (run.started_at or run.created_at)))
    _seed(run)
    ACTIVE_RUN_STARTED.set(0)


def run_started(run) -> None:
    ACTIVE_RUN_STARTED.set(run.created_at)


def seed(runs: Iterable) -> None:
    """Set the timestamps and production top-1 from past runs (newest first), so a
    restarted bot does not look as if it never retrained."""
    for run in reversed(list(runs)):
        if run.active:
            ACTIVE_RUN_STARTED.set(run.created_at)
        else:
            _seed(run)


def _seed(run) -> None:
    end = run.finished_at or time.time()
    if run.state == "succeeded":
        LAST_RETRAIN.set(max(end, LAST_RETRAIN._value.get()))
        if run.model_version is not None:
            LAST_DEPLOY.set(max(end, LAST_DEPLOY._value.get()))
            production(run.model_version, run.top1)   # the alias, when followed, has the last word


def data_watch_tick(found: dict | None = None, now: float | None = None) -> None:
    """A data-watch listing: ``found`` maps the new keys to entries with an ISO
    ``last_modified`` (scheduler.watcher.entry); the lag is the oldest one's age."""
    from datetime import datetime

    now = time.time() if now is None else now
    DATA_WATCH_LAST_TICK.set(now)
    stamps = [datetime.fromisoformat(e["last_modified"]).timestamp()
              for e in (found or {}).values() if e.get("last_modified")]
    if stamps:
        DATA_WATCH_LAG.set(max(0.0, now - min(stamps)))


# ---- what ctbot owes Slack (core/outbox.py) -------------------------------------------
# Read from Redis at each scrape, so every replica shows the one shared outbox.
OUTBOX_PENDING = Gauge("ctbot_outbox_pending", "Messages owed to Slack and not yet delivered", registry=REGISTRY)
OUTBOX_OLDEST = Gauge("ctbot_outbox_oldest_seconds", "How long the oldest message owed to Slack has waited",
                      registry=REGISTRY)


def watch_outbox(outbox) -> None:
    """Serve the outbox gauges from ``outbox`` (core.outbox.Outbox); NaN while Redis is away."""
    def read(fn):
        def value() -> float:
            try:
                return float(fn())
            except Exception as e:   # a scrape must answer
                dependency_error(e)
                return float("nan")
        return value
    OUTBOX_PENDING.set_function(read(outbox.pending_count))
    OUTBOX_OLDEST.set_function(read(outbox.oldest_age))
