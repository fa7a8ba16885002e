"""Step status JSONs in the store: the one place that writes runs/<run_id>/steps/<step>.json.

Every pipeline component wraps its work in ``track(...)``, so the bot can follow a run
the same way whichever runner runs it. Imported inside component bodies (KFP ships only
the function's source), so it must stay importable without torch or kfp.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from steps.layout import step_key

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 2000


def error_message(exc: BaseException) -> str:
    """User-facing text for a step failure. Domain errors (validation, bad params) carry
    their own wording; anything else keeps its type so the cause is recognisable."""
    text = str(exc).strip()
    if isinstance(exc, ValueError) or type(exc).__name__ == "ValidationError":
        msg = text or type(exc).__name__
    else:
        msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return msg[:MAX_ERROR_CHARS]


class StepStatus:
    """Writes one step's status. ``mirror`` names a second step that receives the
    running/failed writes too (a sweep trial mirrors its progress into ``train``)."""

    def __init__(self, store, run_id: str, step: str, *, mirror: str | None = None,
                 clock=time.time):
        self.store, self.run_id, self.step, self.mirror = store, run_id, step, mirror
        self.clock = clock
        self.started_at = clock()
        self.summary: dict = {}

    def record(self, state: str, *, error: str | None = None, finished: bool = False,
               step: str | None = None) -> dict:
        now = self.clock()
        doc = {
            "step": step or self.step,
            "state": state,
            "started_at": self.started_at,
            "finished_at": now if finished else None,
            "seconds": round(now - self.started_at, 3) if finished else None,
            "summary": self.summary,
            "error": error,
        }
        self.store.put_json(step_key(self.run_id, step or self.step), doc)
        return doc

    def running(self, **progress) -> None:
        """Start (or update) the step; progress keys are merged into the summary."""
        self.summary.update(progress)
        self.record("running")
        if self.mirror:
            self.record("running", step=self.mirror)

    def progress(self, **progress) -> None:
        """Best-effort progress update: a flaky store must not kill a training run."""
        try:
            self.running(**progress)
        except Exception as e:  # noqa: BLE001 - progress is advisory
            log.warning("could not write progress for %s: %s", self.step, e)

    def done(self, summary: dict | None = None) -> dict:
        if summary is not None:
            self.summary = summary
        return self.record("done", finished=True)

    def failed(self, error: str) -> dict:
        doc = self.record("failed", error=error, finished=True)
        if self.mirror:
            self.record("failed", error=error, finished=True, step=self.mirror)
        return doc


def mark(store, run_id: str, step: str, state: str, *, summary: dict | None = None,
         error: str | None = None) -> dict:
    """Write a status for a step that did not run itself (skipped, canceled)."""
    doc = {"step": step, "state": state, "started_at": None, "finished_at": None,
           "seconds": None, "summary": summary or {}, "error": error}
    store.put_json(step_key(run_id, step), doc)
    return doc


@contextmanager
def track(store_root: str, run_id: str, step: str, *, mirror: str | None = None
          ) -> Iterator[StepStatus]:
    """running at entry; done with ``st.summary`` at exit; failed with the error (then
    re-raised) when the body raises."""
    from steps.storage import open_store

    st = StepStatus(open_store(store_root), run_id, step, mirror=mirror)
    st.running()
    try:
        yield st
    except BaseException as e:
        try:
            st.failed(error_message(e))
        except Exception as write_error:  # keep the original error as the one raised
            log.error("could not record failure of %s: %s", step, write_error)
        raise
    st.done()
