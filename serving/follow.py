"""Follow the production alias: poll models/<model>/production.json (one small GET)
and, when it names another version, load that package beside the serving one and swap.

A request reads ``holder.current`` once and keeps that model to the end, so in-flight
requests finish on the old model while new ones get the new: the swap is one attribute
assignment. A package that fails its checksum or its load is refused with one log line;
the old model keeps serving, and the refused version is not retried until the alias
moves again (a published version never changes).
"""
from __future__ import annotations

import logging
import threading
import time

from steps import deploy

log = logging.getLogger("serving.follow")


def settle_heap() -> None:
    """Move what is alive now (the model, torch's modules) out of the collector's sight:
    a full collection otherwise walks it all in the middle of some request. Unfrozen
    first, so the model just swapped out can still be collected."""
    import gc
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelHolder:
    def __init__(self):
        self.current = None          # serving.model.LoadedModel or None
        self.alias_version: int | None = None
        self.refused: dict[int, str] = {}   # version -> why
        self.last_error: str | None = None


class AliasFollower:
    def __init__(self, store, model: str, holder: ModelHolder, *, poll_seconds: float = 2.0,
                 loader=None, workdir: str | None = None, retry_seconds: float = 60.0):
        from serving.model import load_version
        self.store, self.model, self.holder = store, model, holder
        self.poll_seconds = poll_seconds
        self.loader = loader or (lambda v: load_version(store, model, v, workdir))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple | None = None   # (version, updated_at) last acted on
        self._seen_at = 0.0
        # A refusal may be a store hiccup during download: try again now and then.
        self.retry_seconds = retry_seconds

    def check(self) -> bool:
        """Read the alias once and act on a change; True when a new model was swapped in."""
        try:
            alias = deploy.read_alias(self.store, self.model)
        except Exception as e:  # a flaky store must not stop the watch; the old model serves on
            self._note(f"cannot read the {self.model} production alias: {type(e).__name__}: {e}")
            return False
        if not alias or alias.get("version") is None:
            self.holder.alias_version = None
            return False
        version = int(alias["version"])
        self.holder.alias_version = version
        seen = (version, alias.get("updated_at"))
        current = self.holder.current
        if current is not None and current.version == version:
            self._seen = seen
            return False
        if seen == self._seen and time.time() - self._seen_at < self.retry_seconds:
            return False
        self._seen, self._seen_at = seen, time.time()
        from serving.model import PackageRefused
        t0 = time.time()
        try:
            loaded = self.loader(version)
        except PackageRefused as e:
            why = str(e)
            if self.holder.refused.get(version) != why:  # one line per distinct failure
                keeping = f"keeping v{current.version}" if current else "nothing to serve"
                log.error("%s v%d refused (%s); %s", self.model, version, why, keeping)
            self.holder.refused[version] = why
            self.holder.last_error = f"v{version} refused: {why}"
            return False
        old = current.version if current else None
        self.holder.current = loaded   # the atomic swap
        from serving import metrics
        metrics.SERVED_VERSION.labels(self.model).set(version)
        settle_heap()
        self.holder.last_error = None
        how = getattr(loaded, "how", None) or {}   # test loaders may not say
        how = "".join([f"; search {how['search']}" if "search" in how else "",
                       f" ({how['nprobe']} of {how['nlist']} lists a query)" if "nlist" in how else "",
                       f"; embeds with {how['runtime']}" if "runtime" in how else ""])
        log.info("%s now serving v%d (was %s), loaded in %.2fs%s%s", self.model, version,
                 f"v{old}" if old else "nothing", time.time() - t0, how,
                 "" if loaded.verified else ", no manifest to check")
        return True

    def _note(self, message: str) -> None:
        if message != self.holder.last_error:
            log.warning("%s", message)
        self.holder.last_error = message

    def wake(self) -> None:
        """Check now instead of at the next poll (e.g. on a Redis notice)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if not self._stop.is_set():
                self.check()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)


def subscribe_redis(url: str, channel: str, follower: AliasFollower) -> threading.Thread:
    """Optional push: any message on ``channel`` makes the follower check at once (the
    poll remains the source of truth, so a lost message costs one poll interval)."""
    import redis

    def listen():
        while not follower._stop.is_set():
            try:
                ps = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
                ps.subscribe(channel)
                while not follower._stop.is_set():
                    if ps.get_message(timeout=1.0):
                        follower.wake()
            except Exception as e:  # Redis away: keep polling, retry the subscription
                log.warning("redis notices on %s unavailable (%s); polling only", channel, e)
                follower._stop.wait(10)

    t = threading.Thread(target=listen, name="alias-notices", daemon=True)
    t.start()
    return t
