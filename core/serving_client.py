"""What the model server serves, read from its v2 metadata (``GET /v2/models/{name}``).

Stdlib only: the bot process reads this and must not import torch or faiss (serving/ does).
Nothing here raises: a server that is down or slow is reported, never fails a message.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

TIMEOUT = 1.0


def served_versions(url: str, model: str, timeout: float = TIMEOUT) -> tuple[list[int], str]:
    """(versions served, "") or ([], why it could not be read)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v2/models/{model}", timeout=timeout) as r:
            meta = json.loads(r.read())
        return [int(v) for v in meta.get("versions") or []], ""
    except urllib.error.HTTPError as e:
        return [], f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        return [], f"unreachable ({reason})"
    except (ValueError, TypeError, AttributeError):
        return [], "not a v2 metadata answer"


def serving_status(url: str, model: str, *, expect: int | None = None, wait: float = 0.0,
                   timeout: float = TIMEOUT) -> dict | None:
    """{"url", "versions", "error"}, or None when no url is configured. With ``expect``
    and ``wait``, asks again for up to ``wait`` seconds until ``expect`` is served (a
    reload takes a poll interval plus a load)."""
    if not url:
        return None
    deadline = time.monotonic() + wait
    while True:
        versions, error = served_versions(url, model, timeout)
        if expect is None or expect in versions or error or time.monotonic() >= deadline:
            return {"url": url, "versions": versions, "error": error}
        time.sleep(0.25)


def serving_text(serving: dict | None, production: int | None) -> str:
    """One line for Slack: what the server answers, and whether it lags production."""
    if not serving:
        return ""
    if serving.get("error"):
        return f"model server {serving.get('url')}: {serving['error']}"
    versions = serving.get("versions") or []
    served = max(versions) if versions else None
    if served is None:
        return ("model server not serving yet" if production is None
                else f"production is v{production}, the model server serves nothing yet")
    if production is not None and production not in versions:
        return f"production is v{production}, serving still answers v{served}"
    return f"model server answers v{served}"
