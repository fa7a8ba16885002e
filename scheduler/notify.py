"""Telling the channel from a tick: a Slack hiccup must never break the tick itself."""
import logging

log = logging.getLogger("ctbot.scheduler")


def say_safely(notifier, text: str) -> None:
    if notifier is None:
        return
    try:
        notifier.say(text)
    except Exception:
        log.exception("notifier.say failed")
