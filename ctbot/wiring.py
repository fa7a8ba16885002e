"""The one place ctbot is assembled: settings, Redis, the store, the runner, the Slack
client and notifier, the training service, the scheduler and the bot.

    deps = build_deps(load_settings())             # or build_deps(settings, runner=...)
    proc = build_bot(deps)                         # ctbot serve
    proc.start(); ...; proc.stop()

The CLI, the job workers (``init_job_worker``), the demo and the tests all build through
here and override parts by keyword. Network clients are made here, never at import time.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from core.config import Settings, reveal
from core.notify import SafeNotifier

log = logging.getLogger("ctbot.wiring")


@dataclass
class Deps:
    settings: Settings
    state: object          # core.state.StateStore
    store: object          # steps.storage store
    runner: object         # pipelines.runners.Runner
    client: object | None  # slack_sdk.WebClient, None when Slack is not configured
    notifier: SafeNotifier
    outbox: object         # core.outbox.Outbox: what ctbot owes Slack
    delivery: object | None  # bot.notifier.SlackDelivery, None without Slack
    service: object        # core.service.TrainingService
    jobs: object           # scheduler.jobs.Jobs
    scheduler: object      # scheduler.app.CtScheduler, not started


def build_store(settings: Settings):
    from steps.storage import open_store
    return open_store(settings.store)


def build_state(settings: Settings):
    from core.state import StateStore
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set: ctbot keeps runs, locks and cursors in Redis")
    return StateStore.from_url(settings.redis_url, timeout=settings.redis_timeout_seconds,
                               ack_timeout=settings.redis_ack_timeout_seconds)


def build_runner(settings: Settings, store):
    if settings.runner == "local":
        from pipelines.local_runner import LocalRunner
        return LocalRunner(settings, store)
    if settings.runner == "kfp":
        from pipelines.kfp_runner import KfpRunner
        return KfpRunner(settings, store)
    raise ValueError(f"unknown runner {settings.runner!r}: use 'local' or 'kfp'")


def runner_problem(runner) -> str | None:
    """Checked at start-up: why the runner cannot work (a KFP backend too old for the
    pipeline), or None. An unreachable KFP API is only logged: Slack still needs its
    answers while it is down, and each submit reports its own failure."""
    check = getattr(runner, "check_backend", None)
    if check is None:
        return None
    from pipelines.kfp_runner import KfpBackendTooOld
    try:
        log.info("KFP backend %s", check() or "(no release named)")
    except KfpBackendTooOld as e:
        return str(e)
    except Exception as e:
        log.warning("could not read the KFP backend's version at start-up: %s: %s", type(e).__name__, e)
    return None


def build_slack_client(settings: Settings):
    """The Web API client, or None when neither a token nor a stand-in URL is set."""
    if not (reveal(settings.slack_bot_token) or settings.slack_api_url):
        return None
    from bot.slack_client import slack_client
    return slack_client(reveal(settings.slack_bot_token), settings.slack_api_url)


def build_access(settings: Settings, client):
    from core.access import AccessPolicy
    members_of = None
    if client is not None:
        from bot.slack_client import group_members
        members_of = group_members(client)
    return AccessPolicy(settings.access, members_of)


def build_delivery(settings: Settings, client, state, store, outbox):
    if client is None:
        return None
    from bot.notifier import SlackDelivery
    return SlackDelivery(client, settings.slack_channel, state, store, outbox,
                         min_update_seconds=settings.slack_min_update_seconds,
                         auto_retrain=settings.auto_retrain, serving_url=settings.serving.url)


def build_deps(settings: Settings, *, state=None, store=None, runner=None, client=None,
               notifier=None, clock=time.time) -> Deps:
    """Everything but the Bolt app; each part can be passed in instead of built."""
    from core.audit import AuditArchive
    from core.outbox import Outbox, OutboxNotifier
    from core.service import TrainingService
    from scheduler.app import CtScheduler
    from scheduler.data_watch import DataWatch
    from scheduler.fires import WeeklySchedule
    from scheduler.jobs import Jobs

    store = store if store is not None else build_store(settings)
    state = state if state is not None else build_state(settings)
    runner = runner if runner is not None else build_runner(settings, store)
    client = client if client is not None else build_slack_client(settings)
    outbox = Outbox.from_settings(state, settings, clock)
    delivery = build_delivery(settings, client, state, store, outbox)
    if notifier is None and delivery is not None:
        from bot.homes import HomeRefreshingNotifier
        notifier = HomeRefreshingNotifier(OutboxNotifier(outbox, delivery), state)   # changes mark Home tabs stale
    safe = SafeNotifier(notifier)
    schedule = WeeklySchedule(settings, clock)
    service = TrainingService(settings, state, store, runner, safe, clock=clock,
                              next_retrain=schedule.next_fire, access=build_access(settings, client))
    watch = DataWatch(settings, state, store, service, safe, clock=clock)
    jobs = Jobs(settings, state, service, watch, safe, schedule=schedule, clock=clock)
    extra = [("audit_archive", AuditArchive(state, store).archive, settings.audit.archive_seconds)]
    if delivery:
        extra.append(("slack_outbox", delivery.drain, settings.outbox_drain_seconds))
    if delivery is not None:
        from bot.homes import HomeTab
        extra.append(("home_tabs", HomeTab(service, client, settings).flush, min(2.0, settings.home_refresh_seconds)))
    return Deps(settings, state, store, runner, client, safe, outbox, delivery, service, jobs,
                CtScheduler(settings, jobs, extra_jobs=extra))


def check_bot_settings(settings: Settings) -> None:
    missing = [name for name, value in (("SLACK_BOT_TOKEN", reveal(settings.slack_bot_token)),
                                        ("REDIS_URL", settings.redis_url)) if not value]
    if not reveal(settings.slack_app_token) and not reveal(settings.slack_signing_secret):
        missing.append("SLACK_SIGNING_SECRET (or SLACK_APP_TOKEN for Socket Mode)")
    if missing:
        raise SystemExit("ctbot serve: missing settings: " + ", ".join(missing))


# Job workers yield to the ack path (nice 0) and go before local runs (pipelines.local_runner
# RUN_NICE). Not 19: a command's reply is someone waiting, and at 19 any busy process on
# the machine starved it (a button's run took over 30 s to be recorded with two CPU hogs).
JOB_NICE = 5


def build_bot(deps: Deps, *, with_scheduler: bool = True, job_workers: int = 2):
    """The bot process around ``deps``. Slow work runs in ``job_workers`` niced worker
    processes that build their own deps from the settings (0: threads in this process,
    sharing ``deps``)."""
    from bot.app import create_app
    from bot.background import ProcessBackground
    from bot.runtime import BotProcess
    from core import metrics

    s = deps.settings
    metrics.watch_outbox(deps.outbox)
    background = None
    if job_workers:
        background = ProcessBackground(workers=job_workers, initializer=init_job_worker,
                                       initargs=(s, JOB_NICE, logging.getLogger().getEffectiveLevel()))
    app = create_app(s, deps.service, deps.client, background=background)
    if with_scheduler:
        # Commands acked just before a crash are resumed here (the first run is at start).
        from bot.background import JobContext
        from bot.listeners.commands import resume_interrupted
        ctx = JobContext(deps.service, deps.client, s)
        deps.scheduler.extra_jobs.append(("resume_commands", lambda: resume_interrupted(ctx),
                                          s.command_resume_seconds))
    return BotProcess(s, deps.client, deps.notifier, deps.service, app,
                      deps.scheduler if with_scheduler else None)


def init_job_worker(settings: Settings, nice: int, log_level: int) -> None:
    """Runs once in each job worker process: lower its priority, build its own deps."""
    from bot.background import JobContext, set_worker_context
    from core.logs import configure_logging

    if nice:
        os.nice(nice)
    # Runs started here are children of this worker; let the kernel reap them when they
    # end (the run watch in the bot process follows them through /proc and the store).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    configure_logging(settings, log_level, process="worker")
    deps = build_deps(settings)
    set_worker_context(JobContext(deps.service, deps.client, settings))
