"""What a model server serves, for reports (e.g. the Slack "serving vN" line). The
reading lives in core.serving_client, stdlib only, so the bot can use it without torch."""
from __future__ import annotations

from core.serving_client import served_versions


def served_version(url: str, model: str, timeout: float = 2.0) -> int | None:
    """The version the server at ``url`` serves now; None when it serves none or cannot
    be reached (a report should say "not serving", not fail)."""
    versions, _ = served_versions(url, model, timeout)
    return versions[-1] if versions else None
