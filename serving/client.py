"""What a model server serves, for reports (e.g. the Slack "serving vN" line)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request


def served_version(url: str, model: str, timeout: float = 2.0) -> int | None:
    """The version the server at ``url`` serves now; None when it serves none or cannot
    be reached (a report should say "not serving", not fail)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v2/models/{model}", timeout=timeout) as r:
            meta = json.loads(r.read())
        versions = meta.get("versions") or []
        return int(versions[-1]) if versions else None
    except (urllib.error.URLError, OSError, ValueError, TypeError):
        return None
