"""Who may act: the access lists of the config file (``access:``), checked for every
command and every button before anything changes.

A refusal names the action and who may do it (users as mentions, user groups as group
mentions), changes nothing, and is audited. With no list configured for deploy, rollback
or approve, nobody may: ctbot moves a production model, so it is secure by default.
"""
from __future__ import annotations

import threading
import time

from core.errors import ServiceError

ACTIONS = ("train", "deploy", "rollback", "cancel", "schedule", "approve")
VERBS = {"train": "start training runs", "deploy": "deploy a model", "rollback": "roll production back",
         "cancel": "cancel runs", "schedule": "pause or resume the weekly retrain",
         "approve": "approve deploys or read the audit"}


class Forbidden(ServiceError):
    """The actor may not do this here; the message says who may."""


class GroupLookupFailed(Forbidden):
    """A user group on the list could not be resolved (Slack answered an error, or not at
    all): ctbot fails closed, and says that the check, not the user, is what failed."""

    def __init__(self, group: str, detail: str):
        self.group, self.detail = group, detail
        super().__init__(f"ctbot couldn't check the {mention(group)} group with Slack ({detail}); "
                         "nothing was changed; try again in a moment.")


class Actor(str):
    """A Slack user id that also knows where the request came from. Being a str, it goes
    wherever a ``by`` went before (mentions, audit)."""

    channel: str
    team: str

    def __new__(cls, user: str, channel: str = "", team: str = ""):
        obj = super().__new__(cls, user or "")
        obj.channel, obj.team = channel or "", team or ""
        return obj

    def __reduce__(self):   # job workers receive it pickled
        return (Actor, (str(self), self.channel, self.team))


def mention(entry: str) -> str:
    if entry == "*":
        return "everyone"
    return f"<!subteam^{entry}>" if entry.startswith("S") else f"<@{entry}>"


class AccessPolicy:
    """``members_of(group_id) -> set of user ids`` resolves user groups (Slack's
    usergroups.users.list); answers are cached for ``cache_seconds``."""

    def __init__(self, access, members_of=None, *, cache_seconds: float = 60.0, clock=time.monotonic):
        self.access = access
        self.members_of = members_of
        self.cache_seconds, self.clock = cache_seconds, clock
        self._cache: dict[str, tuple[float, frozenset]] = {}
        self._lock = threading.Lock()

    def place_refusal(self, actor: Actor) -> str | None:
        """Why requests from this workspace or channel are refused, or None."""
        a = self.access
        if a.team_id and actor.team and actor.team != a.team_id:
            return "ctbot does not take requests from this workspace."
        if a.team_id and not actor.team:
            return "ctbot could not tell which workspace this request came from; nothing was changed."
        if a.channels and actor.channel not in a.channels:
            where = ", ".join(f"<#{c}>" for c in a.channels)
            return f"ctbot is not available in this channel; use {where}."
        return None

    def allowed(self, action: str, actor: Actor, *, owner: str = "") -> bool:
        """Raises GroupLookupFailed when only an unresolvable group could have allowed it."""
        if action == "cancel" and owner and str(actor) == owner:
            return True   # a run's requester may always cancel their own run
        entries = getattr(self.access, action)
        if "*" in entries or str(actor) in entries:
            return True
        failed = None
        for group in (g for g in entries if g.startswith("S")):
            try:
                if str(actor) in self._members(group):
                    return True
            except GroupLookupFailed as e:
                failed = failed or e    # another group may still allow it
        if failed:
            raise failed
        return False

    def refusal(self, action: str, actor: Actor, *, owner: str = "") -> str | None:
        """None when ``actor`` may do ``action`` here; else the message to show them."""
        place = self.place_refusal(actor)
        if place:
            return place
        if self.allowed(action, actor, owner=owner):
            return None
        entries = getattr(self.access, action)
        if not entries:
            return (f"Nobody may {VERBS[action]} yet: ctbot refuses it until the config file lists who "
                    f"may (`access: {{{action}: [U…, S…]}}`, or `CT_ACCESS__{action.upper()}=U…,S…`). "
                    "Nothing was changed.")
        who = ", ".join(mention(e) for e in entries)
        extra = " (and a run's requester, for their own run)" if action == "cancel" else ""
        return f"You may not {VERBS[action]}: only {who}{extra} may. Nothing was changed."

    def _members(self, group: str) -> frozenset:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(group)
            if hit and now - hit[0] < self.cache_seconds:
                return hit[1]
        try:
            members = frozenset(self.members_of(group)) if self.members_of else frozenset()
        except Exception as e:   # not cached: the next request asks Slack again
            raise GroupLookupFailed(group, str(e) or type(e).__name__) from e
        with self._lock:
            self._cache[group] = (now, members)
        return members
