"""`ctbot audit`: who did what, when, from which channel, with what outcome."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=50, help="how many entries (default 50)")
    p.add_argument("--since", help="only entries at or after this ISO time, e.g. 2026-11-30 or 2026-11-30T09:00")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    from core.config import load_settings
    from ctbot.wiring import build_state

    state = build_state(load_settings(args.config))
    entries = list(reversed(state.read_audit(args.n)))
    if args.since:
        entries = [e for e in entries if str(e.get("at", "")) >= args.since]
    for e in entries:
        if args.json:
            print(json.dumps(e, sort_keys=True))
            continue
        rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "at", "who", "action", "channel",
                                                                           "team", "outcome"))
        where = f" in {e['channel']}" if e.get("channel") else ""
        outcome = " REFUSED" if e.get("outcome") == "refused" else ""
        print(f"{e.get('at', '')[:19]}  {e.get('who', ''):<12} {e.get('action', ''):<18}{where}{outcome}  {rest}".rstrip())
    if not entries:
        print("the audit is empty" + (f" since {args.since}" if args.since else ""))
    return 0
