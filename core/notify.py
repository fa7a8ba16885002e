"""The one wrapper that keeps Slack trouble from breaking a run or a tick."""
from __future__ import annotations

import logging

log = logging.getLogger("ctbot.notify")


class SafeNotifier:
    """Any Notifier (core/types.py), or None; a failing call is logged and returns None.

    The service and the scheduler only ever hold this, so a 500 from Slack or a lost
    connection costs a message, never a run's state change."""

    def __init__(self, notifier=None):
        self.inner = notifier.inner if isinstance(notifier, SafeNotifier) else notifier

    def __bool__(self) -> bool:
        return self.inner is not None

    def __getattr__(self, method: str):
        target = getattr(self.inner, method, None) if self.inner is not None else None

        def call(*args, **kwargs):
            if target is None:
                return None
            try:
                return target(*args, **kwargs)
            except Exception:
                log.exception("notifier.%s failed", method)
                return None
        return call
