"""Turn any failure in slow listener work into a specific ephemeral reply, never a traceback."""
from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import blocks
from core.errors import ServiceError

log = logging.getLogger("bot.listeners")
STATE_ERRORS = (RedisConnectionError, RedisTimeoutError)

STATE_DOWN = "ctbot can't reach its state store; nothing was changed."
# After the ack recorded the command: it is not dropped, the resume job carries it out.
STATE_LOST = ("ctbot lost its state store while working on this. The command is recorded and will be "
              "carried out when the store answers again; this message will then be replaced.")


def error_reply(exc: BaseException, what: str) -> dict:
    """The message for a failed request: ServiceError text is meant for people; anything
    else is logged with an id the user can quote, and they see only that id."""
    if isinstance(exc, ServiceError):
        return blocks.error(str(exc))
    if isinstance(exc, STATE_ERRORS):
        log.warning("%s: the state store is unreachable: %s", what, exc)
        return blocks.error(STATE_DOWN, "It recovers by itself when Redis is back; try again in a minute.")
    incident = uuid.uuid4().hex[:8]
    log.error("%s failed [incident %s]", what, incident, exc_info=exc)
    return blocks.error(f"Something went wrong while handling {what}; it was logged as incident {incident}.",
                        "Try again in a moment; if it keeps failing, tell whoever runs ctbot the incident id.")


def state_lost_reply(exc: BaseException, what: str) -> dict:
    log.warning("%s: the state store went away after the command was recorded: %s", what, exc)
    return blocks.error(STATE_LOST, "Nothing to do: it resumes by itself.")


@contextmanager
def replying_on_error(respond, what: str, **respond_kwargs):
    """Run a block; on failure answer through ``respond`` (the response_url) instead."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the user must get an answer whatever failed
        reply = error_reply(exc, what)
        try:
            respond(**reply, **respond_kwargs)
        except Exception:  # response_url expired or Slack down: nothing left to tell the user
            log.warning("could not deliver the error reply for %s", what, exc_info=True)
