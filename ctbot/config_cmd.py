"""``ctbot config``: check a settings file, or show the effective settings.

    ctbot config check ctbot.yaml          # "ctbot.yaml: ok" (exit 0), or every problem (exit 2)
    ctbot [--config FILE] config show      # each setting and where it came from; secrets masked
    ctbot config docs > docs/configuration.md   # every key's reference, from the settings model

Settings come from the defaults, then the file (--config or $CT_CONFIG), then the
environment; see core/config.py and ctbot.example.yaml.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="{check,show,docs}", required=True)
    c = sub.add_parser("check", help="validate a settings file; exit 2 naming every problem")
    c.add_argument("file", help="YAML settings file")
    c.add_argument("--env", action="store_true",
                   help="apply the environment over the file too, as serve would (default: the file alone)")
    c.set_defaults(_config_handler=check)
    s = sub.add_parser("show", help="the effective settings (defaults, --config/$CT_CONFIG, environment)")
    s.set_defaults(_config_handler=show)
    d = sub.add_parser("docs", help="print docs/configuration.md: every key, generated from the settings model")
    d.set_defaults(_config_handler=docs)


def run(args: argparse.Namespace) -> int:
    return args._config_handler(args)


def check(args: argparse.Namespace) -> int:
    from core.config import ConfigError, load_settings

    try:
        # The file alone by default, so a file checks the same on any machine.
        load_settings(args.file, env=None if args.env else {})
    except ConfigError as e:
        print(f"{args.file}: {len(e.problems)} problem(s)", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok")
    return 0


def show(args: argparse.Namespace) -> int:
    from core.config import load_settings

    settings = load_settings(getattr(args, "config", None))  # a ConfigError is reported by cli.main
    for line in render(settings):
        print(line)
    return 0


def render(settings) -> list[str]:
    """YAML lines (JSON values), each followed by its source as a comment; secrets masked."""
    from pydantic import BaseModel

    from core.config import masked

    rows: list[tuple[str, str]] = []

    def walk(model: BaseModel, prefix: str, indent: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                rows.append((f"{indent}{name}:", ""))
                walk(value, f"{key}.", indent + "  ")
            else:
                shown = json.dumps(masked(key, value), default=str, ensure_ascii=False)
                rows.append((f"{indent}{name}: {shown}", settings.origin(key)))

    walk(settings, "", "")
    width = max(len(text) for text, source in rows if source)
    return [f"{text:<{width}}  # {source}" if source else text for text, source in rows]


def docs(args: argparse.Namespace) -> int:
    from core.config_docs import reference

    print(reference(), end="")
    return 0
