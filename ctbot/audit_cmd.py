"""`ctbot audit`: who did what, when, from which channel, with what outcome.

Redis holds the last 10k entries; anything older is read from the store's archive
(core/audit.py), so ``--since 90d`` reaches as far back as the archive does.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=None,
                   help="at most this many entries, the newest (default 50, or all of them with --since)")
    p.add_argument("--since", help="entries at or after this: a span (7d, 12h, 30m, 2w) or an ISO date or time "
                                   "(2026-11-30, 2026-11-30T09:00, UTC unless it says otherwise)")
    p.add_argument("--user", default="", help="only this Slack user id (U…), or scheduler")
    p.add_argument("--action", default="", help="only this action (e.g. deploy, promote, rollback, approve, train); "
                                                "a refusal matches the action it refused")
    p.add_argument("--outcome", default="", help="only this outcome, e.g. refused (entries without one are ok)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="json: one JSON object per line")
    p.add_argument("--json", action="store_true", help="the same as --format json")


def run(args: argparse.Namespace) -> int:
    from core.audit import AuditArchive, parse_since
    from core.config import load_settings
    from ctbot.wiring import build_state, build_store

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        print(f"ctbot audit: {e}", file=sys.stderr)
        return 2
    if args.n is not None and args.n < 1:
        print("ctbot audit: -n must be at least 1", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    archive = AuditArchive(build_state(settings), build_store(settings) if since else None)   # the store: only for --since
    limit = args.n if args.n is not None else (None if since else 50)
    entries = archive.query(since=since, user=args.user, action=args.action, outcome=args.outcome, limit=limit)
    as_json = args.json or args.format == "json"
    for e in entries:
        if as_json:
            print(json.dumps(e, sort_keys=True))
            continue
        rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "at", "who", "action", "channel",
                                                                           "team", "outcome"))
        where = f" in {e['channel']}" if e.get("channel") else ""
        outcome = " REFUSED" if e.get("outcome") == "refused" else ""
        print(f"{e.get('at', '')[:19]}  {e.get('who', ''):<12} {e.get('action', ''):<18}{where}{outcome}  {rest}".rstrip())
    if not entries and not as_json:
        filters = [f"--{k} {v}" for k, v in (("since", args.since), ("user", args.user), ("action", args.action),
                                              ("outcome", args.outcome)) if v]
        print("no audit entries" + (" match " + " ".join(filters) if filters else "")
              + ("" if since else " in Redis's recent entries; --since also searches the store's archive"))
    return 0
