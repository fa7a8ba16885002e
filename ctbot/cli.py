"""The ``ctbot`` command line.

Each subcommand lives in its own module, registered in COMMANDS with a one-line help.
A module provides ``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy
imports inside ``run``; only the module of the command being run is imported, so
``ctbot --help`` and unrelated commands stay fast. To add one (e.g. ``serve``)::

    COMMANDS["serve"] = ("ctbot.serve", "run the Slack bot")

``demo`` lives in devkit/, a development tool; it is named here as a string and loaded
only when run, so no product module imports it. An image leaves out what its process
never runs (the bot's has no devkit/ or serving/): a command whose package is absent is
not offered there, and naming it says why.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("ctbot.pipeline_cli", "compile the training pipeline, or run it locally or on Kubeflow"),
    "serve": ("ctbot.serve", "run the Slack bot (HTTP or Socket Mode) and the scheduler in one process"),
    "scheduler": ("ctbot.scheduler_cmd", "run only the scheduler (weekly retrain, data watch, run watch)"),
    "serve-model": ("ctbot.serve_model", "serve the production model (KServe Open Inference Protocol v2, REST)"),
    "demo": ("devkit.demo", "the whole CT loop offline, ending in a posted report"),
    "config": ("ctbot.config_cmd", "check a config file, or show the effective settings and their sources"),
    "audit": ("ctbot.audit_cmd", "who did what, when, from which channel, with what outcome"),
}

# The package a command needs beyond ctbot's own, where an image may leave it out, and
# where to find it then.
NEEDS = {"serve-model": ("serving", "the trainer image (ctbot-trainer) has it"),
         "demo": ("devkit", "a development tool: run `./dev.sh demo` in a source checkout")}


def available(name: str) -> bool:
    return name not in NEEDS or importlib.util.find_spec(NEEDS[name][0]) is not None


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``load`` names the one command whose arguments are added (None: all)."""
    from ctbot import __version__

    ap = argparse.ArgumentParser(prog="ctbot", description="Slack-driven continuous training")
    ap.add_argument("--version", action="version", version=f"ctbot {__version__}")
    ap.add_argument("--config", metavar="FILE",
                    help="YAML settings file (default: $CT_CONFIG); the environment overrides it")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if not available(name):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load is None or load == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_handler=mod.run)
    return ap


def command_of(argv: list[str]) -> str | None:
    """The subcommand's name: the first word that is neither an option nor --config's value."""
    words = iter(argv)
    for a in words:
        if a == "--config":
            next(words, None)
        elif not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_of(argv)
    if command in COMMANDS and not available(command):
        package, where = NEEDS[command]
        print(f"ctbot: `{command}` needs the {package}/ package, which this installation leaves out; {where}",
              file=sys.stderr)
        return 2
    parser = build_parser(command if command in COMMANDS else "")  # "": load no module
    args = parser.parse_args(argv)
    handler = getattr(args, "_handler", None)
    if handler is None:
        parser.parse_args([args.command, "--help"])
        return 2
    try:
        return int(handler(args) or 0)
    except Exception as e:
        # Imported here, not at the top, so `ctbot --help` does not load pydantic.
        from core.config import ConfigError
        if not isinstance(e, ConfigError):
            raise
        print(f"ctbot: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
