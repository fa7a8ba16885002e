"""How the long-running commands (serve, scheduler, serve-model) live and end."""
from __future__ import annotations

import signal
import threading


def until_signalled() -> None:
    """Block until SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
