"""SlackDelivery: sends what the outbox (core/outbox.py) says ctbot owes Slack.

One message per run, ever: the first post is claimed in Redis and carries the run id
as message metadata, so a post whose reply was lost (a crash, a timeout) is found in
the channel's history instead of being posted twice. That metadata is the run's
``ctbot_run`` event (bot/blocks/events.py), set again on every update so other apps can
follow runs. The message is then updated in
place with the run's current state (progress is throttled across replicas; a throttled
update is deferred, then sent with the latest state), and replaced by the final report;
the details and the confusion matrix go into its thread once each.

Delivery is in the order things were owed, by one replica at a time (a drain lock).
HTTP 429 is waited out per Retry-After (the client does it a few times); a 5xx, a 429
that persists or a network error means Slack is unavailable: the outbox pauses every
delivery with a capped backoff, and the next try starts again from the oldest owed
message. Slack refusing one message (ok: false) backs off that message alone. The
outbox gives up only after ``outbox.give_up_hours`` (core/outbox.py).
"""
from __future__ import annotations

import logging
import time
import uuid

from slack_sdk.errors import SlackApiError

from bot import blocks
from bot.blocks.events import RUN_EVENT, run_metadata
from core import ct_policy
from core.outbox import Outbox
from core.serving_client import serving_status
from core.types import NewData, RunRecord
from steps.crashpoints import crash_point
from steps.results import TRIAL_PREFIX, read_confusion_png, read_report, read_steps, read_trials

log = logging.getLogger(__name__)

METADATA_EVENT = RUN_EVENT
POST_CLAIM_SECONDS = 60      # longer than one chat.postMessage with its retries
DELIVERY_LOCK_SECONDS = 30      # a replica that died mid-delivery holds it up at most this long
HISTORY_LOOKBACK = 200       # messages searched for a run's lost first post
SERVING_WAIT_SECONDS = 8     # a deployed report waits this long for the model server to reload


class SlackDelivery:
    def __init__(self, client, channel: str, state, store, outbox: Outbox, *,
                 min_update_seconds: float = 3.0, auto_retrain: bool = False, wall_clock=time.time,
                 serving_url: str = ""):
        self.client, self.channel = client, channel
        self.state, self.store, self.outbox = state, store, outbox
        self.min_update_seconds = min_update_seconds
        self.auto_retrain = auto_retrain
        self.wall_clock = wall_clock
        self.serving_url = serving_url   # the model server whose version a deployed report shows

    # ---- the periodic drain -------------------------------------------------------------

    def drain(self) -> int:
        """Deliver everything due, oldest owed first; returns how many runs and messages
        were handled. One drain at a time across replicas, so the order holds; while
        Slack is unavailable only the give-up clock moves."""
        self.outbox.give_up_overdue()
        if self.outbox.paused():
            return 0
        lock, token = "outbox:drain", uuid.uuid4().hex
        if not self.state.acquire_lock(lock, token, DELIVERY_LOCK_SECONDS):
            return 0   # another drain is at it: it looks again for what became due, and so does the next tick
        n = 0
        try:
            for _ in range(20):   # what became due while draining, within bounds
                due = self.outbox.due()
                for kind, ident in due:
                    if self.outbox.paused():
                        return n   # Slack went away: the rest waits its turn, in order
                    self._deliver_run(ident) if kind == "run" else self._deliver_message(ident)
                    self.state.refresh_lock(lock, token, DELIVERY_LOCK_SECONDS)
                    n += 1
                if not due:
                    break
        finally:
            self.state.release_lock(lock, token)
        return n

    # ---- runs -----------------------------------------------------------------------------

    def _deliver_run(self, run_id: str) -> None:
        try:
            answered = self._show_run(run_id)
        except Exception as e:
            if not self._slack_unavailable(e, f"run {run_id}"):
                self.outbox.retry_run(run_id, _describe(e))
            return
        if answered:   # a deferral says nothing about Slack: the backoff stands
            self.outbox.slack_answered()

    def _slack_unavailable(self, e: Exception, what: str) -> bool:
        """Pause every delivery when ``e`` says Slack is unavailable; False when Slack
        answered and refused just this message."""
        if isinstance(e, SlackApiError):
            status = getattr(e.response, "status_code", 200)
            if status == 429 or status >= 500:
                self.outbox.slack_unavailable(_describe(e), retry_after=_retry_after(e))
                return True
            log.warning("Slack refused %s: %s", what, _describe(e))
            return False
        if isinstance(e, OSError):   # connection refused or reset, timeouts, DNS (urllib's URLError)
            self.outbox.slack_unavailable(f"{type(e).__name__}: {e}")
            return True
        log.warning("delivering %s failed: %s", what, e, exc_info=True)
        return False

    def _show_run(self, run_id: str) -> bool:
        """Bring the run's message up to date; False when it did not get as far as Slack."""
        entry = self.outbox.run_entry(run_id)
        gen = int(entry.get("gen") or 0)
        run = self.state.get_run(run_id)
        if run is None or int(entry.get("delivered") or 0) >= gen:   # nothing new to show
            self.outbox.run_delivered(run_id, gen)
            return False
        if entry.get("final") and run.active:
            # The service is marking it finished right now (or crashed doing so and will
            # redo it): wait for the final record rather than show progress again.
            self.outbox.defer_run(run_id, 1.0)
            return False
        throttle = self.state.k("slack", "throttle", run_id)
        if run.active and run.slack_ts and self.min_update_seconds > 0:
            # Shared by every replica: chat.update is rate limited per message.
            if not self.state.r.set(throttle, "1", nx=True, px=int(self.min_update_seconds * 1000)):
                wait = max(self.state.r.pttl(throttle), 50) / 1000
                self.outbox.defer_run(run_id, wait)
                return False
        steps = read_steps(self.store, run_id)
        if run.active:   # a sweep's trials, each with its own progress line
            steps.update({f"{TRIAL_PREFIX}{i}": doc for i, doc in read_trials(self.store, run_id).items()})
        final = run.state in ("succeeded", "failed")
        report = self._report(run) if final else None
        view = blocks.final_report(run, report) if final else blocks.run_progress(run, steps, self.wall_clock())
        where = self._ensure_message(run, view)
        if where is None:
            self.outbox.defer_run(run_id, 2.0)  # someone else's first post is in flight
            return False
        if where != "posted":
            self._update(run, where, view)
        if final:
            crash_point("final_slack_call")
            self._thread_parts(run, report, steps)
        self.outbox.run_delivered(run_id, gen)
        return True

    def _report(self, run: RunRecord) -> dict:
        report = read_report(self.store, run.run_id)
        if report is None:  # the runner failed before the pipeline wrote one
            report = {"run_id": run.run_id, "model": run.model, "status": run.state,
                      "params": run.params, "error": run.error, "decision": "",
                      "failed_step": run.failed_step or None}
        elif self.serving_url and report.get("decision") == "deploy" and isinstance(report.get("model_version"), int):
            report = {**report, "serving": serving_status(self.serving_url, run.model, wait=SERVING_WAIT_SECONDS,
                                                          expect=report["model_version"])}
        return {**report, **self._timing(run)}

    def _timing(self, run: RunRecord) -> dict:
        """This run's duration and the last full run's, for "time saved" (best effort)."""
        try:
            full = ct_policy.last_full(self.state.list_runs(50), before=run.run_id)
        except Exception as e:  # noqa: BLE001 - advisory
            log.warning("no last full run to compare %s with: %s", run.run_id, e)
            full = None
        took = (run.finished_at - run.started_at) if run.finished_at and run.started_at else None
        return {"run_seconds": took,
                "last_full": full and {"run_id": full.run_id, "seconds": ct_policy.run_seconds(full)}}

    def _ensure_message(self, run: RunRecord, view: dict):
        """(channel, ts) of the run's message; "posted" when this call posted it with
        ``view``; None when another process is posting it right now."""
        if run.slack_channel and run.slack_ts:
            return run.slack_channel, run.slack_ts
        claim = self.state.k("slack", "post", run.run_id)
        if not self.state.r.set(claim, "1", nx=True, ex=POST_CLAIM_SECONDS):
            return None
        try:
            key = f"run-{run.run_id}"
            where, posted = self._post_once(key, self.channel, None, blocks.fit_message(view),
                                            metadata=run_metadata(run, key))
            self._record_where(run, where)
            if self.min_update_seconds > 0:   # the post counts as the latest update
                self.state.r.set(self.state.k("slack", "throttle", run.run_id), "1",
                                 px=int(self.min_update_seconds * 1000))
            if not posted:   # an earlier try did post it: bring it up to date
                self._update(run, where, view)
            return "posted" if posted else where
        finally:
            self.state.r.delete(claim)

    def _post_once(self, key: str, channel: str, thread_ts: str | None, message: dict,
                   metadata: dict | None = None):
        """chat.postMessage at most once per ``key``: ((channel, ts), posted_now). A try
        whose reply was lost is found again by the key in the message's metadata
        (``metadata``'s payload must then hold the key)."""
        tried = self.state.k("slack", "tried", key)
        if self.state.r.exists(tried):
            found = self._find(key, channel, thread_ts)
            if found:
                return found, False
        self.state.r.set(tried, "1", ex=30 * 24 * 3600)
        extra = {"thread_ts": thread_ts} if thread_ts else {}
        resp = self.client.chat_postMessage(channel=channel, **message, **extra, metadata=metadata or
                                            {"event_type": METADATA_EVENT, "event_payload": {"key": key}})
        if channel == self.channel:
            self.state.r.set(self.state.k("slack", "channel_id", channel), resp["channel"])
        return (resp["channel"], resp["ts"]), True

    def _channel_id(self, channel: str) -> str | None:
        """Slack's id for a channel configured by name (history needs the id)."""
        if channel[:1] in "CDG" and channel.isalnum():
            return channel
        cache = self.state.k("slack", "channel_id", channel)
        cached = self.state.r.get(cache)
        if cached:
            return cached
        name, cursor = channel.lstrip("#"), None
        while True:
            resp = self.client.conversations_list(types="public_channel,private_channel", limit=1000,
                                                  exclude_archived=True, cursor=cursor)
            for c in resp.get("channels") or []:
                if c.get("name") == name:
                    self.state.r.set(cache, c["id"])
                    return c["id"]
            cursor = (resp.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None

    def _find(self, key: str, channel: str, thread_ts: str | None) -> tuple[str, str] | None:
        channel_id = self._channel_id(channel)
        if not channel_id:
            return None
        if thread_ts:
            resp = self.client.conversations_replies(channel=channel_id, ts=thread_ts, limit=HISTORY_LOOKBACK,
                                                     include_all_metadata=True)
        else:
            resp = self.client.conversations_history(channel=channel_id, limit=HISTORY_LOOKBACK,
                                                     include_all_metadata=True)
        for m in resp.get("messages") or []:
            md = m.get("metadata") or {}
            if md.get("event_type") == METADATA_EVENT and (md.get("event_payload") or {}).get("key") == key:
                return channel_id, m["ts"]
        return None

    def _record_where(self, run: RunRecord, where: tuple[str, str]) -> None:
        run.slack_channel, run.slack_ts = where
        self.state.update_run(run.run_id, slack_channel=where[0], slack_ts=where[1])

    def _update(self, run: RunRecord, where: tuple[str, str], view: dict) -> None:
        try:
            self.client.chat_update(channel=where[0], ts=where[1], **blocks.fit_message(view),
                                    metadata=run_metadata(run, f"run-{run.run_id}"))
        except SlackApiError as e:
            if (e.response or {}).get("error") != "message_not_found":
                raise
            log.warning("message of run %s is gone; posting a new one", run.run_id)
            run.slack_channel = run.slack_ts = ""
            self.state.update_run(run.run_id, slack_channel="", slack_ts="")
            self.state.r.delete(self.state.k("slack", "posted_try", run.run_id))
            self._ensure_message(run, view)

    def _thread_parts(self, run: RunRecord, report: dict, steps: dict) -> None:
        """The details and the confusion matrix, in the run message's thread, once each."""
        if not self.outbox.part_done(run.run_id, "details"):
            details = blocks.fit_message(blocks.thread_details(run, report))
            self._post_once(f"details-{run.run_id}", run.slack_channel, run.slack_ts, details)
            crash_point("after_details_post")
            self.outbox.mark_part(run.run_id, "details")
        trials = (report or {}).get("trials")
        if isinstance(trials, list) and trials and not self.outbox.part_done(run.run_id, "sweep_chart"):
            self._sweep_chart(run, trials)
            self.outbox.mark_part(run.run_id, "sweep_chart")
        if not self.outbox.part_done(run.run_id, "confusion"):
            png = read_confusion_png(self.store, run.run_id)
            title = f"Confusion matrix, run {run.run_id}"
            if png and not self._upload_found(run, title):
                # files_upload_v2: files.getUploadURLExternal, POST to that URL, files.completeUploadExternal.
                self.client.files_upload_v2(channel=run.slack_channel, thread_ts=run.slack_ts, content=png,
                                            filename=f"confusion-{run.run_id}.png",
                                            title=title,
                                            alt_txt="confusion matrix of kNN top-1 on the eval set")
            self.outbox.mark_part(run.run_id, "confusion")

    def _sweep_chart(self, run: RunRecord, trials: list) -> None:
        """Validation top-1 by trial, as an image in the thread (once, like the matrix)."""
        from bot.blocks.run import winning_trial
        from bot.charts import bar_chart_png
        title = f"Validation top-1 by trial, run {run.run_id}"
        if self._upload_found(run, title, "sweep-chart"):
            return
        order = sorted((t for t in trials if isinstance(t, dict)), key=lambda t: t.get("trial", 0))
        values = [t.get("val_top1") if isinstance(t.get("val_top1"), (int, float)) else None for t in order]
        best = winning_trial(order)
        winner = next((i for i, t in enumerate(order) if t.get("trial") == best), None)
        shown = ", ".join(f"trial {t.get('trial')}: {'–' if v is None else f'{100 * v:.2f}%'}"
                          for t, v in zip(order, values, strict=True))
        self.client.files_upload_v2(channel=run.slack_channel, thread_ts=run.slack_ts,
                                    content=bar_chart_png(values, winner), filename=f"sweep-{run.run_id}.png",
                                    title=title, alt_txt=f"validation top-1 by trial (the best in green): {shown}"[:1000])

    def _upload_found(self, run: RunRecord, title: str, what: str = "confusion") -> bool:
        """Was the upload done by a try whose reply was lost? (files carry no metadata;
        the title names the run.)"""
        tried = self.state.k("slack", "tried", f"{what}-{run.run_id}")
        if not self.state.r.set(tried, "1", nx=True, ex=30 * 24 * 3600):
            resp = self.client.conversations_replies(channel=run.slack_channel, ts=run.slack_ts,
                                                     limit=HISTORY_LOOKBACK)
            return any(f.get("title") == title for m in resp.get("messages") or [] for f in m.get("files") or [])
        return False

    # ---- other messages -------------------------------------------------------------------

    def _deliver_message(self, msg_id: str) -> None:
        msg = self.outbox.message(msg_id)
        if msg is None:
            return
        try:
            self._send(msg_id, msg["kind"], msg["payload"])
        except Exception as e:
            if not self._slack_unavailable(e, f"message {msg_id}"):
                self.outbox.retry_message(msg_id, _describe(e))
            return
        self.outbox.message_done(msg_id)
        self.outbox.slack_answered()

    def _send(self, msg_id: str, kind: str, payload: dict) -> None:
        if kind == "new_data":
            found = NewData(**payload["found"])
            message = blocks.new_data_alert(found, payload["alert_id"], auto_retrain=self.auto_retrain,
                                            expected=self._expected_seconds())
        elif kind == "say":
            message = {"text": payload["text"]}
        elif kind == "fire_failed":
            message = blocks.fire_failed(payload["fire_id"], payload["text"])
        else:
            raise ValueError(f"unknown outbox message kind {kind!r}")
        self._post_once(msg_id, self.channel, None, blocks.fit_message(message))


    def _expected_seconds(self) -> dict:
        """Each mode's expected duration from its last runs (best effort: the alert goes out
        without times rather than not at all)."""
        try:
            runs = self.state.list_runs(50)
        except Exception as e:  # noqa: BLE001 - advisory
            log.warning("no expected run times for the alert: %s", e)
            return {}
        return {m: ct_policy.expected_seconds(runs, m) for m in ct_policy.MODES}


def _retry_after(e: SlackApiError) -> float | None:
    headers = getattr(e.response, "headers", None) or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _describe(e: Exception) -> str:
    if not isinstance(e, SlackApiError):
        return f"{type(e).__name__}: {e}"
    status = getattr(e.response, "status_code", "?")
    error = (e.response or {}).get("error") if hasattr(e.response, "get") else ""
    return f"Slack HTTP {status} {error or ''}".strip()
