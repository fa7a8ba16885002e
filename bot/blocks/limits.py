"""Slack's message limits, a checker and a fitter that truncates safely.

slack_sdk's model classes check some limits on to_dict(), but not the 50-block cap,
fields over 2000 characters or the overall payload size, and not raw dicts at all.
Builders clip as they go; ``fit`` is the last line of defence before a message is sent.
"""
from __future__ import annotations

import copy
import json

MAX_BLOCKS = 50
MAX_VIEW_BLOCKS = 100          # a modal or the Home tab
MAX_VIEW_PAYLOAD = 24000       # characters of JSON blocks in a view; Slack's cap is 250 kB
MAX_SECTION_TEXT = 3000
MAX_FIELDS = 10
MAX_FIELD_TEXT = 2000
MAX_HEADER = 150
MAX_CONTEXT_ELEMENTS = 10
MAX_ACTIONS = 25
MAX_BUTTON_TEXT = 75
MAX_FALLBACK_TEXT = 3000       # notification text; Slack truncates long ones anyway
MAX_PAYLOAD = 12000            # characters of JSON blocks; well inside Slack's real cap
ELLIPSIS = "…"


def clip(text: str, n: int) -> str:
    """At most n characters, marking the cut. Closes an open ``` fence so a clipped code
    block doesn't swallow the rest of the message."""
    text = "" if text is None else str(text)
    if len(text) <= n:
        return text
    cut = text[: max(0, n - 5)]
    if cut.count("```") % 2 == 1:
        return cut + ELLIPSIS + "\n```"
    return text[: n - 1] + ELLIPSIS


def _text_len(obj) -> int:
    return len(obj.get("text", "")) if isinstance(obj, dict) else 0


def check_limits(blocks: list[dict], text: str | None = None, max_payload: int = MAX_PAYLOAD,
                 max_blocks: int = MAX_BLOCKS) -> list[str]:
    """Every limit this message breaks, as readable strings; [] means it can be sent."""
    problems = []
    if len(blocks) > max_blocks:
        problems.append(f"{len(blocks)} blocks > {max_blocks}")
    for i, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "section":
            if _text_len(b.get("text")) > MAX_SECTION_TEXT:
                problems.append(f"block {i}: section text {_text_len(b['text'])} > {MAX_SECTION_TEXT}")
            fields = b.get("fields") or []
            if len(fields) > MAX_FIELDS:
                problems.append(f"block {i}: {len(fields)} fields > {MAX_FIELDS}")
            for j, f in enumerate(fields):
                if _text_len(f) > MAX_FIELD_TEXT:
                    problems.append(f"block {i} field {j}: {_text_len(f)} > {MAX_FIELD_TEXT}")
            if not b.get("text") and not fields:
                problems.append(f"block {i}: section without text or fields")
        elif kind == "header":
            if _text_len(b.get("text")) > MAX_HEADER:
                problems.append(f"block {i}: header {_text_len(b['text'])} > {MAX_HEADER}")
        elif kind == "context":
            els = b.get("elements") or []
            if not els or len(els) > MAX_CONTEXT_ELEMENTS:
                problems.append(f"block {i}: context with {len(els)} elements")
            for j, e in enumerate(els):
                if _text_len(e) > MAX_SECTION_TEXT:
                    problems.append(f"block {i} element {j}: {_text_len(e)} > {MAX_SECTION_TEXT}")
        elif kind == "actions":
            els = b.get("elements") or []
            if not els or len(els) > MAX_ACTIONS:
                problems.append(f"block {i}: actions with {len(els)} elements")
            for j, e in enumerate(els):
                if _text_len(e.get("text")) > MAX_BUTTON_TEXT:
                    problems.append(f"block {i} button {j}: text > {MAX_BUTTON_TEXT}")
    size = len(json.dumps(blocks, ensure_ascii=False))
    if size > max_payload:
        problems.append(f"payload {size} chars > {max_payload}")
    if text is not None and not text.strip():
        problems.append("empty fallback text")
    return problems


def _clip_obj(obj: dict, n: int) -> None:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        obj["text"] = clip(obj["text"], n)


def fit(blocks: list[dict], max_payload: int = MAX_PAYLOAD, max_blocks: int = MAX_BLOCKS) -> list[dict]:
    """``blocks`` if they pass check_limits, else a copy that does: clips texts, drops
    surplus fields, and when there are too many blocks or characters, keeps the head and
    the final actions (buttons must survive) with a note saying what was cut."""
    if not check_limits(blocks, max_payload=max_payload, max_blocks=max_blocks):
        return blocks                   # the common case: nothing to change, nothing to copy
    out = copy.deepcopy(blocks)
    for b in out:
        kind = b.get("type")
        if kind == "section":
            _clip_obj(b.get("text"), MAX_SECTION_TEXT)
            if b.get("fields"):
                b["fields"] = b["fields"][:MAX_FIELDS]
                for f in b["fields"]:
                    _clip_obj(f, MAX_FIELD_TEXT)
        elif kind == "header":
            _clip_obj(b.get("text"), MAX_HEADER)
        elif kind == "context":
            b["elements"] = (b.get("elements") or [])[:MAX_CONTEXT_ELEMENTS]
            for e in b["elements"]:
                _clip_obj(e, MAX_SECTION_TEXT)
        elif kind == "actions":
            b["elements"] = (b.get("elements") or [])[:MAX_ACTIONS]

    tail = [b for b in out[-1:] if b.get("type") == "actions"]
    head = out[: len(out) - len(tail)]

    def size(b) -> int:
        return len(json.dumps(b, ensure_ascii=False)) + 2     # plus the separator

    note_budget = 1 + len(tail)            # the note block, then the kept actions
    dropped = max(0, len(head) + note_budget - max_blocks)
    head = head[: len(head) - dropped]
    sizes = [size(b) for b in head]
    budget = max_payload - 200 - sum(size(b) for b in tail)
    while head and sum(sizes) > budget:
        # Too many characters: halve the biggest block's longest text before dropping blocks.
        i = max(range(len(head)), key=sizes.__getitem__)
        if _shrink(head[i]):
            sizes[i] = size(head[i])
            continue
        head.pop()
        sizes.pop()
        dropped += 1
    if dropped:
        head.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"_{dropped} more block(s) left out to fit Slack's limits_"}]})
    return head + tail


def _shrink(block: dict) -> bool:
    """Halve the longest text of a section or context; False when nothing is long."""
    objs = [block.get("text")] + list(block.get("fields") or []) + list(block.get("elements") or [])
    objs = [o for o in objs if isinstance(o, dict) and isinstance(o.get("text"), str)]
    if not objs:
        return False
    longest = max(objs, key=_text_len)
    n = _text_len(longest)
    if n <= 300:
        return False
    _clip_obj(longest, n // 2)
    return True


def fit_view(view: dict) -> dict:
    """``fit`` for a modal or Home tab: 100 blocks, a larger payload."""
    return {**view, "blocks": fit(view.get("blocks") or [], MAX_VIEW_PAYLOAD, MAX_VIEW_BLOCKS)}


def fit_message(msg: dict) -> dict:
    """Apply ``fit`` to a {text, blocks, ...} message and clip the fallback text."""
    out = dict(msg)
    if "blocks" in out:
        out["blocks"] = fit(out["blocks"])
    out["text"] = clip((out.get("text") or "").strip() or "ctbot", MAX_FALLBACK_TEXT)   # never blank: Slack rejects it
    return out
