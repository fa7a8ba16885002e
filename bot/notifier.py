"""SlackNotifier: the Notifier protocol (core/types.py) on Slack's Web API.

One message per run: posted when it starts, updated in place while it runs (throttled,
chat.update is rate limited), replaced by the final report when it ends; the details
and the confusion matrix go into that message's thread. HTTP 429 is retried after
Retry-After by slack_sdk's RateLimitErrorRetryHandler.
"""
from __future__ import annotations

import logging
import threading
import time

from slack_sdk import WebClient

from bot import blocks
from bot.slack_client import with_rate_limit_retries
from core.config import Settings
from core.types import NewData, RunRecord

log = logging.getLogger(__name__)


class SlackNotifier:
    def __init__(self, client: WebClient, channel: str, settings: Settings | None = None, *,
                 min_update_seconds: float = 3.0, clock=time.monotonic, wall_clock=time.time):
        self.client = with_rate_limit_retries(client)
        self.channel = channel
        self.settings = settings or Settings()
        self.min_update_seconds = min_update_seconds
        self.clock, self.wall_clock = clock, wall_clock
        self._lock = threading.Lock()
        self._last_update: dict[str, float] = {}          # run_id -> clock() of the last chat.update
        self._where: dict[str, tuple[str, str]] = {}      # run_id -> (channel id, ts) of its message

    # ---- the run's message ----------------------------------------------------------
    def run_started(self, run: RunRecord) -> tuple[str, str]:
        out = blocks.fit_message(blocks.run_progress(run, {}, self.wall_clock()))
        resp = self.client.chat_postMessage(channel=self.channel, **out)
        where = (resp["channel"], resp["ts"])
        with self._lock:
            self._where[run.run_id] = where
            self._last_update[run.run_id] = self.clock()
        return where

    def run_progress(self, run: RunRecord, steps: dict) -> None:
        """Update in place, at most once per ``min_update_seconds`` while the run is
        active; a run that has ended (e.g. canceled) is always shown."""
        now = self.clock()
        with self._lock:
            last = self._last_update.get(run.run_id)
            if run.active and last is not None and now - last < self.min_update_seconds:
                return
            self._last_update[run.run_id] = now
        self._show(run, blocks.run_progress(run, steps or {}, self.wall_clock()))

    def run_finished(self, run: RunRecord, report: dict, confusion_png: bytes | None) -> None:
        channel, ts = self._show(run, blocks.final_report(run, report))
        with self._lock:
            self._last_update.pop(run.run_id, None)
        details = blocks.fit_message(blocks.thread_details(run, report))
        self.client.chat_postMessage(channel=channel, thread_ts=ts, **details)
        if confusion_png:
            # files_upload_v2: files.getUploadURLExternal, POST to that URL, files.completeUploadExternal.
            self.client.files_upload_v2(channel=channel, thread_ts=ts, content=confusion_png,
                                        filename=f"confusion-{run.run_id}.png",
                                        title=f"Confusion matrix, run {run.run_id}",
                                        alt_txt="confusion matrix of kNN top-1 on the eval set")

    def _show(self, run: RunRecord, message: dict) -> tuple[str, str]:
        """Update the run's message, or post one if it has none (or it was deleted)."""
        message = blocks.fit_message(message)
        where = self._message_of(run)
        if where:
            try:
                self.client.chat_update(channel=where[0], ts=where[1], **message)
                return where
            except Exception as e:
                if "message_not_found" not in str(e):
                    raise
                log.warning("message of run %s is gone; posting a new one", run.run_id)
        resp = self.client.chat_postMessage(channel=self.channel, **message)
        where = (resp["channel"], resp["ts"])
        with self._lock:
            self._where[run.run_id] = where
        return where

    def _message_of(self, run: RunRecord) -> tuple[str, str] | None:
        if run.slack_channel and run.slack_ts:
            return run.slack_channel, run.slack_ts
        with self._lock:
            return self._where.get(run.run_id)

    # ---- other posts ----------------------------------------------------------------
    def new_data(self, found: NewData, alert_id: str) -> None:
        alert = blocks.new_data_alert(found, alert_id, auto_retrain=self.settings.auto_retrain)
        self.client.chat_postMessage(channel=self.channel, **blocks.fit_message(alert))

    def say(self, text: str) -> None:
        self.client.chat_postMessage(channel=self.channel, text=text)
