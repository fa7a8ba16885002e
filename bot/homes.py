"""Publishing the App Home tab: for whoever opens it, after each of their clicks, and for
everyone who has it open whenever something it shows changes.

A change (run progress, a report, promote, rollback, an approval, the schedule) goes
through the notifier, which ``HomeRefreshingNotifier`` wraps: it only marks the Home
tabs stale in Redis. ``HomeTab.flush`` (a scheduler job every ``home_refresh_seconds``)
republishes them, at most once per interval and at most ~80 views.publish calls a
minute, under Slack's limit for the method (Tier 4, 100+ a minute), however busy the
runs are. The viewers are those who opened the Home in the last 30 days (Redis keeps
when), at most MAX_VIEWERS of the most recent.
"""
from __future__ import annotations

import json
import logging
import time

from bot.blocks.home import home_view
from core.access import ACTIONS, Actor

log = logging.getLogger(__name__)

VIEWER_DAYS = 30
MAX_VIEWERS = 50
CALLS_PER_MINUTE = 80          # views.publish is Tier 4 (100+/min): stay under it
NOTICE_SECONDS = 15 * 60       # a click's outcome stays on the clicker's Home this long


class HomeTab:
    def __init__(self, service, client, settings, clock=time.time):
        self.service, self.client, self.settings, self.clock = service, client, settings, clock
        self.state = service.state

    def _k(self, *parts: str) -> str:
        return self.state.k("home", *parts)

    # ---- who sees what -------------------------------------------------------------------
    def allowed(self, viewer: Actor) -> set[str]:
        """The actions ``viewer`` may take from the Home tab: the channel's rules, from no
        channel (a Home click carries none)."""
        return {a for a in ACTIONS if self.service.access.refusal(a, viewer) is None}

    def view_for(self, viewer: Actor) -> dict:
        s = self.service
        return home_view(s.status(), s.list_runs(10), s.model_history(10), s.pending_approvals(5),
                         self.allowed(viewer), viewer=str(viewer), notice=self._notice(str(viewer)))

    def publish(self, user: str, team: str = "") -> None:
        """Render and publish ``user``'s Home tab now, and remember them as a viewer."""
        self.state.r.zadd(self._k("viewers"), {user: self.clock()})
        if team:
            self.state.r.hset(self._k("teams"), user, team)
        team = team or self.state.r.hget(self._k("teams"), user) or ""
        self.client.views_publish(user_id=user, view=self.view_for(Actor(user, "", team)))

    # ---- the outcome of a click, shown on the clicker's Home -------------------------------
    def notice(self, user: str, text: str, ok: bool) -> None:
        self.state.r.set(self._k("notice", user), json.dumps({"text": text, "ok": ok}), ex=NOTICE_SECONDS)
        try:
            self.publish(user)
        except Exception:  # the notice stays for the next publish
            log.warning("could not publish the Home tab of %s", user, exc_info=True)

    def _notice(self, user: str) -> dict | None:
        raw = self.state.r.get(self._k("notice", user))
        return json.loads(raw) if raw else None

    # ---- everyone's Home, when something changed -------------------------------------------
    def viewers(self) -> list[str]:
        r, key = self.state.r, self._k("viewers")
        r.zremrangebyscore(key, "-inf", self.clock() - VIEWER_DAYS * 86400)
        return list(r.zrevrange(key, 0, MAX_VIEWERS - 1))

    def flush(self) -> int:
        """Republish every viewer's Home if something changed and the interval allows;
        returns how many were published. Safe to run on every replica at once."""
        viewers = self.viewers()
        interval = max(self.settings.home_refresh_seconds, len(viewers) * 60 / CALLS_PER_MINUTE)
        if not self.state.r.exists(self._k("stale")):
            return 0
        if not self.state.r.set(self._k("flushing"), "1", nx=True, px=int(interval * 1000)):
            return 0       # published less than an interval ago (here or on another replica)
        self.state.r.delete(self._k("stale"))   # changes from now on make it stale again
        n = 0
        for user in viewers:
            try:
                self.publish(user)
                n += 1
            except Exception as e:   # one user's failure doesn't keep the others stale
                log.warning("could not publish the Home tab of %s: %s", user, e)
        return n


class HomeRefreshingNotifier:
    """Wraps the notifier the service and scheduler hold: every call is passed on, then
    the Home tabs are marked stale (one Redis write); HomeTab.flush republishes them."""

    def __init__(self, inner, state):
        self.inner, self._state = inner, state

    def _stale(self) -> None:
        try:
            self._state.r.set(self._state.k("home", "stale"), "1")
        except Exception:  # a missed refresh is not worth failing the notification
            log.warning("could not mark the Home tabs stale", exc_info=True)

    def __getattr__(self, name: str):
        target = getattr(self.inner, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            try:
                return target(*args, **kwargs)
            finally:
                self._stale()
        return call
