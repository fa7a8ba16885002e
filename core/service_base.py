"""What the training service's parts share: how long its Redis records live, and how
an exception reads in a message."""

LOCK_TTL = 6 * 3600          # the run watch refreshes it; the TTL only frees a lock nobody watches
DEDUPE_TTL = 7 * 24 * 3600   # how long a repeated request/alert/fire maps to the same run
FINISH_TTL = 30 * 24 * 3600
COMMAND_TTL = 24 * 3600       # an accepted command's record (a response_url lasts 30 min)
COMMAND_START_GRACE = 15      # an accepted command not started within this is resumed
EFFECT_PENDING_TTL = 600      # a button claimed by a click that never finished frees up again
SNAPSHOT_MAX_URIS = 2000     # beyond this a snapshot is folded into folders (see _snapshot)
QUEUED_TIMEOUT = 600         # a run never submitted after this long is marked failed
SERVING_SETTLE_SECONDS = 8   # how long an announcement waits for the model server to reload


def message(e: Exception) -> str:
    """An exception as a sentence: a KeyError's own text, not its repr."""
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)
