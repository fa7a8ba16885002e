"""`ctbot scheduler`: the scheduler without the Slack server (runs and alerts still go
to Slack when it is configured, else to the log)."""
from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    from core.config import load_settings
    from core.logs import configure_logging
    from ctbot.lifetime import until_signalled
    from ctbot.wiring import build_deps, runner_problem

    settings = load_settings(getattr(args, "config", None))
    configure_logging(settings, args.log_level)
    deps = build_deps(settings)
    if problem := runner_problem(deps.runner):
        print(f"ctbot scheduler: {problem}", file=sys.stderr)
        return 2
    sched = deps.scheduler
    sched.start()
    logging.getLogger("ctbot.scheduler").info("scheduler started; next weekly retrain %s", sched.next_retrain())
    until_signalled()
    sched.shutdown()
    return 0
