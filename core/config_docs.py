"""docs/configuration.md, generated from the settings model (``ctbot config docs``).

Keys, types, limits, defaults and environment names come from the pydantic model; the
meaning of each key is the comment beside it in ctbot.example.yaml (which a test keeps
listing every key at its default). A test compares docs/configuration.md with this
output, so neither can drift from the model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from core.config import ENV_PREFIX, NESTED_DELIMITER, PLAIN_ENV, Settings

EXAMPLE = Path(__file__).resolve().parents[1] / "ctbot.example.yaml"
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[a-z_][a-z0-9_]*):(?P<rest>.*)$")

HEADER = """# Configuration

Every setting, generated from the settings model (`core/config.py`) by
`ctbot config docs > docs/configuration.md`; a test fails when this page and the model
differ. [`ctbot.example.yaml`](../ctbot.example.yaml) lists the same keys at their
defaults, ready to copy.

Precedence: defaults < the file (`ctbot --config FILE` or `CT_CONFIG`) < the environment
< command-line flags. A key `k` is `CT_K` in the environment; key `k` of section `sec` is
`CT_SEC__K`. Lists are JSON or comma lists; a whole section is JSON. Unknown keys and
unknown `CT_*` variables are errors that name the nearest valid one. `ctbot config check
FILE` reports every problem at once; `ctbot config show` prints the effective values and
where each came from, secrets masked.
"""


def example_comments(path: Path = EXAMPLE) -> dict[str, str]:
    """Dotted key -> the comment on its line in the example file."""
    out: dict[str, str] = {}
    sections: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent, key, rest = len(m["indent"]), m["key"], m["rest"]
        sections = [(i, k) for i, k in sections if i < indent]
        dotted = ".".join([k for _, k in sections] + [key])
        value, _, comment = rest.partition(" #")
        out[dotted] = comment.strip()
        if not value.strip():
            sections.append((indent, key))
    return out


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is not None and getattr(origin, "__name__", "") == "Literal" or str(origin) == "typing.Literal":
        return " \\| ".join(json.dumps(a) for a in get_args(annotation))
    if origin in (list, set, tuple):
        return f"list of {_type_name(get_args(annotation)[0])}" if get_args(annotation) else "list"
    name = getattr(annotation, "__name__", str(annotation))
    return {"SecretStr": "secret", "str": "text", "int": "integer", "float": "number", "bool": "true/false"}.get(
        name, name)


def _limits(field) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "pattern": "matches"}
    out = []
    for meta in field.metadata:
        for attr, word in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} `{value}`")
    return ", ".join(out)


def _default(value: Any) -> str:
    if hasattr(value, "get_secret_value"):
        return '`""` (secret)'
    return f"`{json.dumps(value, default=str, ensure_ascii=False)}`"


def _rows(model: type[BaseModel], instance: BaseModel, prefix: str, env_prefix: str, comments: dict):
    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        dotted, env = f"{prefix}{name}", f"{env_prefix}{name.upper()}"
        if isinstance(value, BaseModel):
            yield from _rows(type(value), value, f"{dotted}.", env + NESTED_DELIMITER, comments)
            continue
        envs = [f"`{env}`"] + [f"`{plain}`" for plain, f in PLAIN_ENV.items() if f == dotted]
        meaning = comments.get(dotted, "").replace("|", "\\|")
        limits = _limits(field)
        yield (f"| `{dotted}` | {_type_name(field.annotation)}{'; ' + limits if limits else ''} | "
               f"{_default(value)} | {', '.join(envs)} | {meaning} |")


def reference() -> str:
    """The whole page, as `ctbot config docs` prints it."""
    comments = example_comments()
    defaults = Settings()
    lines = [HEADER, "| key | type and limits | default | environment | meaning |", "|---|---|---|---|---|"]
    lines += list(_rows(Settings, defaults, "", ENV_PREFIX, comments))
    return "\n".join(lines) + "\n"
