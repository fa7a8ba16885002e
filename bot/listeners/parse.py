"""Parse `/ct <subcommand> [args]` text. Pure, so the ack path can answer bad input at once."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from bot.blocks.replies import SUBCOMMANDS

# Words people reach for, mapped to what they probably meant.
ALIASES = {"promote": "deploy", "start": "train", "retrain": "train", "run": "train", "stop": "cancel",
           "abort": "cancel", "list": "runs", "versions": "history", "undo": "rollback", "revert": "rollback",
           "pause": "schedule pause", "resume": "schedule resume", "info": "status", "?": "help"}
MAX_RUNS = 50


class UsageError(Exception):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class UnknownSubcommand(Exception):
    def __init__(self, sub: str, suggestions: list[str]):
        super().__init__(sub)
        self.sub, self.suggestions = sub, suggestions


@dataclass
class Parsed:
    sub: str
    args: list[str] = field(default_factory=list)
    n: int = 10                       # runs
    version: int | None = None        # rollback
    run_id: str = ""                  # deploy, cancel
    action: str = ""                  # schedule: "", "pause" or "resume"


def suggest(sub: str) -> list[str]:
    out = []
    if sub in ALIASES:
        out.append(ALIASES[sub])
    out += [s for s in difflib.get_close_matches(sub, list(SUBCOMMANDS), n=2, cutoff=0.6) if s not in out]
    return out


def _usage(command: str, sub: str) -> str:
    args, _ = SUBCOMMANDS[sub]
    return f"Usage: `{command} {sub}{(' ' + args) if args else ''}`"


def parse(text: str, command: str = "/ct") -> Parsed:
    words = (text or "").split()
    if not words:
        return Parsed("help")
    sub, args = words[0].lower(), words[1:]
    if sub not in SUBCOMMANDS:
        raise UnknownSubcommand(words[0], suggest(sub))
    p = Parsed(sub, args)
    if sub in ("help", "status", "data") and args:
        raise UsageError(f"`{command} {sub}` takes no arguments (got “{' '.join(args)}”).", _usage(command, sub))
    if sub in ("runs", "audit", "history"):
        if len(args) > 1:
            raise UsageError(f"`{command} {sub}` takes at most one number.", _usage(command, sub))
        if args:
            if not is_ascii_number(args[0]) or not 1 <= int(args[0]) <= MAX_RUNS:
                what = {"runs": "runs", "history": "versions"}.get(sub, "entries")
                raise UsageError(f"“{args[0]}” is not a number of {what} between 1 and {MAX_RUNS}.",
                                 _usage(command, sub))
            p.n = int(args[0])
    elif sub in ("deploy", "cancel"):
        if len(args) != 1:
            raise UsageError(f"`{command} {sub}` needs exactly one run id"
                             f"{' (got ' + str(len(args)) + ')' if args else ''}.",
                             _usage(command, sub) + f" — `{command} runs` lists run ids.")
        p.run_id = args[0].strip("`")
    elif sub == "rollback":
        if len(args) > 1:
            raise UsageError(f"`{command} rollback` takes at most one version.", _usage(command, sub))
        if args:
            raw = args[0].lower().removeprefix("v")
            if not is_ascii_number(raw) or int(raw) < 1:
                raise UsageError(f"“{args[0]}” is not a model version (like `3` or `v3`).", _usage(command, sub))
            p.version = int(raw)
    elif sub == "schedule":
        if len(args) > 1 or (args and args[0].lower() not in ("pause", "resume")):
            raise UsageError(f"`{command} schedule` accepts only `pause` or `resume` (got “{' '.join(args)}”).",
                             _usage(command, sub))
        p.action = args[0].lower() if args else ""
    elif sub == "sweep":
        bad = [a for a in args if a.count("=") != 1 or not a.split("=")[0] or not a.split("=")[1]]
        if bad or not args:
            raise UsageError(f"Malformed sweep parameter(s): {', '.join(f'“{b}”' for b in bad)}. " if bad else
                             f"`{command} sweep` needs at least one `key=v1,v2`.",
                             f"Example: `{command} sweep lr=0.002,0.005 margin=0.3,0.4` trains 4 combinations.")
        if sweep_size(args) < 2:
            raise UsageError("A sweep needs a key with two or more values, like `lr=0.002,0.005`.",
                             f"`{command} train` starts a single run.")
    elif sub == "train":
        bad = [a for a in args if a.count("=") != 1 or not a.split("=")[0] or not a.split("=")[1]]
        if bad:
            raise UsageError(f"Malformed parameter(s): {', '.join(f'“{b}”' for b in bad)}. "
                             "Write each as `key=value` with no spaces around `=`.",
                             f"Example: `{command} train epochs=3 lr=0.01` — `{command} help` lists the keys.")
    return p


def _values(value: str) -> list[str]:
    """``a,b,c``, or ``a|b|c`` for values that hold commas themselves (layers)."""
    return [v for v in value.split("|" if "|" in value else ",") if v != ""] or [value]


def sweep_size(args: list[str]) -> int:
    """How many combinations ``key=v1,v2 …`` makes, without making them."""
    n = 1
    for a in args:
        n *= len(_values(a.split("=", 1)[1]))
    return n


def sweep_trials(args: list[str]) -> list[list[str]]:
    """``["lr=1,2", "seed=0,1"]`` -> the key=value tokens of each combination, in order
    (the last key varies fastest). Call sweep_size first: this makes them all."""
    trials: list[list[str]] = [[]]
    for a in args:
        key, value = a.split("=", 1)
        trials = [t + [f"{key}={v}"] for t in trials for v in _values(value)]
    return trials


def is_ascii_number(text: str) -> bool:
    """Digits 0-9 only: str.isdigit() also accepts '²' and '٣', which int() then rejects
    or reads as another number."""
    return text.isascii() and text.isdigit() and len(text) <= 9
