"""`ctbot serve`: run the Slack bot, with the scheduler in-process."""
from __future__ import annotations

import argparse
import gc
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="HTTP bind address (default: CT_HTTP_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port, 0 for any free one (default: CT_HTTP_PORT or 3000)")
    p.add_argument("--no-scheduler", action="store_true",
                   help="serve Slack only; run the scheduler elsewhere (ctbot scheduler)")
    p.add_argument("--job-workers", type=int, default=2,
                   help="worker processes for slow work after the ack (0: threads in the bot process)")
    p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    from core.config import load_settings
    from core.logs import configure_logging
    from ctbot.lifetime import until_signalled
    from ctbot.wiring import build_bot, build_deps, check_bot_settings, runner_problem

    # Acks are ~1 ms of CPU each; with CPython's default 5 ms GIL slice one busy thread
    # makes a burst of concurrent acks queue behind it (bench/bench_ack.py: p99 halved).
    sys.setswitchinterval(0.001)
    settings = load_settings(getattr(args, "config", None))
    configure_logging(settings, args.log_level)
    check_bot_settings(settings)
    deps = build_deps(settings)
    if problem := runner_problem(deps.runner):
        print(f"ctbot serve: {problem}", file=sys.stderr)
        return 2
    proc = build_bot(deps, with_scheduler=not args.no_scheduler,
                     job_workers=args.job_workers)
    proc.start(host=args.host, port=args.port)
    # What start-up built lives as long as the process: out of the collector's way, so a
    # full collection doesn't walk it in the middle of a burst of acks.
    gc.collect()
    gc.freeze()
    where = proc.server.events_url if proc.server else "Socket Mode"
    # One machine-readable line: tests and the bench read the chosen port from it.
    print(f"ctbot serve: serving {where}", flush=True)
    if proc.server:
        print(f"ctbot serve: probes at {proc.server.probe_url}", flush=True)
    until_signalled()
    proc.stop()
    return 0
