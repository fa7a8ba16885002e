"""Errors the training service raises. str(e) is shown to people in Slack as is,
so every message says what went wrong and what to do, and never holds a traceback."""
from __future__ import annotations


class ServiceError(Exception):
    """Base class: a request the service refused or could not carry out."""


class ParamError(ServiceError):
    """Bad training parameters; the message lists the valid keys and ranges."""


class Unavailable(ServiceError):
    """A dependency (the runner, the store) failed the request; the same request may
    work when tried again."""


class UnknownRun(ServiceError):
    """No run with that id."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        super().__init__(f"No run with id `{run_id}`. `/ct runs` lists recent runs.")


class Conflict(ServiceError):
    """The request clashes with the current state (an active run, a finished run...)."""

    def __init__(self, message: str, run=None):
        self.run = run  # the RunRecord in the way, when there is one
        super().__init__(message)
