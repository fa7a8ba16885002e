"""Small pieces the builders share: escaping, formatting, and Block Kit shorthands.

Everything here is pure: no I/O, no clock unless one is passed in.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime

from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from bot.blocks.limits import MAX_FIELD_TEXT, MAX_HEADER, MAX_SECTION_TEXT, clip

STATE_ICON = {"done": "✅", "succeeded": "✅", "running": "⏳", "queued": "🕓", "failed": "❌",
              "canceled": "🚫", "skipped": "⏭️", "pending": "▫️"}


_SLACK_TOKEN = re.compile(r"<(?:[@#][UWC][A-Z0-9]+(?:\|[^<>]*)?|![a-z]+(?:\^[^<>]*)?(?:\|[^<>]*)?|https?://[^<>\s]+)>")
_ENTITY = re.compile(r"&(?:amp|lt|gt);")


def esc(text) -> str:
    """Escape text for mrkdwn: Slack treats <, > and & as control characters. Mentions,
    channel links and URLs in Slack's own <...> syntax are kept, and text that is already
    escaped (Slack sends some input that way) is not escaped twice."""
    text = str(text)
    out, pos = [], 0
    for m in _SLACK_TOKEN.finditer(text):
        out.append(_esc_plain(text[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_esc_plain(text[pos:]))
    return "".join(out)


def _esc_plain(text: str) -> str:
    parts = _ENTITY.split(text)
    entities = _ENTITY.findall(text)
    escaped = [p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for p in parts]
    return "".join(e + (entities[i] if i < len(entities) else "") for i, e in enumerate(escaped))


def user(uid: str) -> str:
    """A mention for Slack user ids, plain words for anything else ("scheduler")."""
    if uid and uid[0] in "UW" and uid[1:].isalnum() and uid.upper() == uid:
        return f"<@{uid}>"
    return esc(uid or "someone")


def duration(seconds) -> str:
    if seconds is None:
        return "–"
    s = int(round(float(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def pct(x, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * float(x):.{digits}f}%"


def pp(delta) -> str:
    """A difference of two fractions in percentage points, signed."""
    return "–" if delta is None else f"{100 * float(delta):+.2f} pp"


def when(ts) -> str:
    """UTC time from an epoch float, ISO string or datetime."""
    if ts is None or ts == "":
        return "–"
    if isinstance(ts, (int, float)):
        dt = datetime.fromtimestamp(float(ts), tz=UTC)
    elif isinstance(ts, datetime):
        dt = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    else:
        try:
            dt = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
        except ValueError:
            return esc(ts)
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# Block shorthands: always return dicts, so callers can concatenate and fit them.

def header(text: str) -> dict:
    return HeaderBlock(text=PlainTextObject(text=clip(text, MAX_HEADER), emoji=True)).to_dict()


def section(text: str, accessory=None) -> dict:
    return SectionBlock(text=MarkdownTextObject(text=clip(text, MAX_SECTION_TEXT)),
                        accessory=accessory).to_dict()


def fields(pairs: list[tuple[str, str]]) -> list[dict]:
    """Sections of "*label*\\nvalue" fields, ten per block."""
    items = [MarkdownTextObject(text=clip(f"*{k}*\n{v}", MAX_FIELD_TEXT)) for k, v in pairs]
    return [SectionBlock(fields=items[i:i + 10]).to_dict() for i in range(0, len(items), 10)]


def context(*texts: str) -> dict:
    els = [MarkdownTextObject(text=clip(t, MAX_SECTION_TEXT)) for t in texts if t][:10]
    return ContextBlock(elements=els or [MarkdownTextObject(text=" ")]).to_dict()


def divider() -> dict:
    return DividerBlock().to_dict()


def confirm(title: str, text: str, ok: str, danger: bool = True) -> ConfirmObject:
    return ConfirmObject(title=clip(title, 100), text=MarkdownTextObject(text=clip(text, 300)),
                         confirm=clip(ok, 30), deny="Cancel", style="danger" if danger else "primary")


def button(text: str, action_id: str, value: str = "", *, style: str | None = None,
           confirm_with: ConfirmObject | None = None, url: str | None = None) -> ButtonElement:
    return ButtonElement(text=PlainTextObject(text=clip(text, 75), emoji=True), action_id=action_id,
                         value=value or None, style=style, confirm=confirm_with, url=url)


def actions(*buttons: ButtonElement, block_id: str | None = None) -> dict:
    return ActionsBlock(elements=list(buttons)[:25], block_id=block_id).to_dict()


def msg(text: str, blocks: list[dict]) -> dict:
    """The shape every builder returns; ``**`` it into chat_postMessage/respond."""
    return {"text": text, "blocks": blocks}


def code_table(rows: list[list[str]], header_row: list[str] | None = None) -> str:
    """A monospace table in a ``` block (Slack mrkdwn has no tables)."""
    all_rows = ([header_row] if header_row else []) + rows
    if not all_rows:
        return "```(none)```"
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(all_rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in all_rows]
    if header_row:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "```" + "\n".join(lines) + "```"


def bullets(items: list[str], limit: int = MAX_SECTION_TEXT - 200, max_items: int = 1000) -> str:
    """At most ``max_items`` "• item" lines that fit in ``limit`` characters, then
    "…and N more" for the rest."""
    lines, used = [], 0
    for item in items[:max_items]:
        line = f"• {item}"
        if used + len(line) + 1 > limit - 20:
            break
        lines.append(line)
        used += len(line) + 1
    if len(lines) < len(items):
        lines.append(f"…and {len(items) - len(lines)} more")
    return "\n".join(lines)
