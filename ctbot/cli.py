"""The ``ctbot`` command line.

Each subcommand lives in its own module, registered in COMMANDS with a one-line help.
A module provides ``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy
imports inside ``run``; only the module of the command being run is imported, so
``ctbot --help`` and unrelated commands stay fast. To add one (e.g. ``serve``)::

    COMMANDS["serve"] = ("ctbot.serve", "run the Slack bot")

``demo`` lives in devkit/, a development tool; it is named here as a string and loaded
only when run, so no product module imports it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("ctbot.pipeline_cli", "compile the training pipeline, or run it locally or on Kubeflow"),
    "serve": ("ctbot.serve", "run the Slack bot (HTTP or Socket Mode) and the scheduler in one process"),
    "scheduler": ("ctbot.scheduler_cmd", "run only the scheduler (weekly retrain, data watch, run watch)"),
    "demo": ("devkit.demo", "the whole CT loop offline, ending in a posted report"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``load`` names the one command whose arguments are added (None: all)."""
    from ctbot import __version__

    ap = argparse.ArgumentParser(prog="ctbot", description="Slack-driven continuous training")
    ap.add_argument("--version", action="version", version=f"ctbot {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load is None or load == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_handler=mod.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")  # "": load no module
    args = parser.parse_args(argv)
    handler = getattr(args, "_handler", None)
    if handler is None:
        parser.parse_args([args.command, "--help"])
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
