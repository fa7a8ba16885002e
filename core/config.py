"""Settings: one validated configuration from defaults, a YAML file and the environment.

    settings = load_settings("ctbot.yaml")        # defaults < file < environment < keywords
    settings = Settings(store="/tmp/s", deploy_floor=0.5)   # exactly these over the defaults

A field ``x`` is ``x:`` in the file and ``CT_X`` in the environment; key ``k`` of a nested
section ``sec`` is ``sec: {k: ...}`` and ``CT_SEC__K``. Adding a section is one
``Section`` subclass plus one field of that type on Settings; loading, unknown-key checks
and ``ctbot config show`` walk the fields and need no change. Unknown keys and unknown
``CT_*`` variables are errors. The Slack secrets are SecretStr, masked in repr: hand them
to a client with ``reveal``. See ctbot.example.yaml and docs/configuration.md for every key.

Reading the file and the environment is pydantic-settings' (its YAML and env sources, in
core/config_sources.py); what the library lacks — unknown names answered with the nearest
one, comma lists, Slack's plain variable names, the origin of each value — is added there,
and that module's docstring says why each addition is needed.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Loading lives in core/config_sources.py (pydantic-settings' sources plus what they lack);
# these names are re-exported because callers and tests import them from here.
from core.config_sources import (  # noqa: F401
    ENV_PREFIX,
    NESTED_DELIMITER,
    OTHER_CT_ENV,
    PLAIN_ENV,
    SECRET_FIELDS,
    ConfigError,
    describe,
    leaves,
    read_sources,
)

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Section(BaseModel):
    """Base of a nested section (``access:``, ``deploy:``, ...): unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")


_ID = re.compile(r"^(\*|[UWS][A-Z0-9]{2,})$")


class AccessSection(Section):
    """Who may do what: Slack user ids (U…/W…), user-group ids (S…) or "*" (everyone in
    the allowed channels). deploy, rollback and approve have no default: until they are
    configured those actions are refused (secure by default)."""
    train: list[str] = ["*"]
    deploy: list[str] = []
    rollback: list[str] = []
    cancel: list[str] = ["*"]            # a run's requester may always cancel their own run
    schedule: list[str] = ["*"]
    approve: list[str] = []
    channels: list[str] = []             # channel ids where commands and buttons are accepted; [] = any
    team_id: str = ""                    # requests from another workspace are refused; "" = any

    @field_validator("train", "deploy", "rollback", "cancel", "schedule", "approve")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not _ID.match(x.strip())]
        if bad:
            raise ValueError(f"not Slack user or group ids: {', '.join(bad)} (use U…/W… for users, "
                             "S… for user groups, \"*\" for everyone)")
        return [x.strip() for x in v]


class DeploySection(Section):
    require_approval: bool = False       # a run that evaluates to deploy waits for an approver
    allow_self_approval: bool = False    # may the run's requester approve it
    approval_timeout_hours: float = Field(72.0, gt=0)


class ScheduleSection(Section):
    catch_up: bool = True               # weekly fires missed while no scheduler ran are run once (coalesced), however late
    # A weekly or new-data fire whose run could not start for a transient reason (the store,
    # Redis, the runner) is tried again after retry_first_seconds, doubling up to
    # retry_max_seconds, for retry_window_minutes from its first try; then it is announced
    # with a Retry button (docs/operations.md, "Fires").
    retry_window_minutes: float = Field(360.0, ge=0)
    retry_first_seconds: float = Field(30.0, gt=0)
    retry_max_seconds: float = Field(900.0, gt=0)
    mode: Literal["full", "warm", "refresh"] = "full"   # the weekly run's mode (guard rails: core/ct_policy.py)


class RefreshSection(Section):
    max_in_a_row: int = Field(5, ge=1)  # refreshes in a row before the next automatic run is warm


class CtSection(Section):
    """Continuous training (docs/continuous-training.md): what new data starts."""
    # alert: post the alert with Refresh gallery / Retrain / Dismiss; otherwise start a run
    # of that mode (guard rails apply). Unset, auto_retrain: true means full.
    on_new_data: Literal["alert", "refresh", "warm", "full"] = "alert"
    refresh: RefreshSection = Field(default_factory=RefreshSection)


class SweepSection(Section):
    """`/ct sweep key=v1,v2 …`: one run that trains every combination and keeps the best."""
    max_trials: int = Field(8, ge=1, le=64)   # combinations allowed in one sweep, checked before it starts


class ServingSection(Section):
    """The model server (`ctbot serve-model`) and where the bot reads what it serves."""
    url: str = ""                        # the bot reads the served version here; "" = not shown
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)        # 0: any free port
    poll_seconds: float = Field(2.0, gt=0)         # how often the production alias is read
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_batch: int = Field(256, ge=1)
    threads: int = Field(1, ge=0)                  # torch/faiss threads per request; 0: all CPUs
    # "ivf": an inverted-file index built at load (about 0.1 ms an image against 3.7 ms for
    # "exact", the package's flat index, over 60k); agreement with exact: bench_serving.py.
    search: Literal["exact", "ivf"] = "ivf"
    # Processes and limits (docs/serving.md says which limit is enforced where).
    workers: int = Field(0, ge=0)                  # worker processes, each holding the model; 0: one per CPU
    infer_threads: int = Field(2, ge=1)            # a worker's pool: one runs its model call (one at a time), the rest parse
    # Micro-batching: requests arriving while a worker's model call runs are merged into
    # its next call (docs/serving.md). An idle worker waits batch_wait_ms for company
    # first (0: never, so a lone request waits for nothing).
    batch_wait_ms: float = Field(0.0, ge=0, le=1000)
    max_batch_images: int = Field(64, ge=1)        # most images in one merged call (one request may hold more)
    probe_port: int = Field(8081, ge=-1, le=65535)   # health probes and /metrics only; 0: any free port; -1: none
    max_header_bytes: int = Field(16384, ge=1024)  # request line and headers; over: 431
    max_headers: int = Field(100, ge=8)            # header fields; over: 431
    max_connections: int = Field(1000, ge=1)       # open connections per worker; over: closed at once
    keepalive_seconds: float = Field(5.0, gt=0)    # an idle keep-alive connection is closed after this
    request_seconds: float = Field(30.0, gt=0)     # a whole request must arrive within this; over: 408
    graceful_seconds: float = Field(25.0, ge=0)    # on SIGTERM, how long requests in flight may take


class OutboxSection(Section):
    """Messages owed to Slack (core/outbox.py): retried with a backoff capped at
    max_backoff_seconds for give_up_hours, then logged and kept for /ct status."""
    give_up_hours: float = Field(24.0, gt=0)
    max_backoff_seconds: float = Field(300.0, gt=0, le=300)   # at most 5 minutes between tries
    time_scale: float = Field(1.0, ge=1)   # divides those durations: drills and tests compress an outage


class AuditSection(Section):
    """The audit trail's archive in the store (core/audit.py)."""
    archive_seconds: float = Field(60.0, gt=0)   # how often new entries are copied from Redis to the store


class HttpSection(Section):
    """The bot's HTTP front door (`ctbot serve`, uvicorn; docs/http.md says which limit is
    enforced where). Beyond a limit a request gets its 4xx and the connection is closed,
    without reading the rest."""
    probe_port: int = Field(3001, ge=0, le=65535)   # /livez, /readyz, /metrics alone; 0: any free port
    max_header_bytes: int = Field(16 << 10, ge=1024)   # request line + headers; beyond: 431
    max_headers: int = Field(100, ge=8)                # header lines; beyond: 431
    max_body_bytes: int = Field(1 << 20, ge=1024)      # Slack's payloads are a few KB; beyond: 413
    max_connections: int = Field(1000, ge=16)          # open connections on the Slack port; beyond: 503
    request_seconds: float = Field(10.0, gt=0)         # to receive a whole request (head and body); beyond: 408
    keepalive_seconds: float = Field(5.0, gt=0)        # an idle keep-alive connection is closed after this
    ack_threads: int = Field(4, ge=1)                  # threads running Bolt's dispatch (the acks)
    shutdown_seconds: float = Field(20.0, ge=0)        # SIGTERM: in-flight requests get this long to finish


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER,
                                      extra="forbid", validate_default=True, protected_namespaces=())

    # Slack
    slack_bot_token: SecretStr = SecretStr("")
    slack_signing_secret: SecretStr = SecretStr("")
    slack_app_token: SecretStr = SecretStr("")    # set => Socket Mode
    slack_api_url: str = ""             # e.g. a local stand-in: http://127.0.0.1:PORT/api/
    slack_channel: str = Field("#ct", min_length=1)
    slash_command: str = Field("/ct", pattern=r"^/\S+$")
    http_host: str = "127.0.0.1"
    http_port: int = Field(3000, ge=0, le=65535)         # 0: any free port
    slack_min_update_seconds: float = Field(3.0, ge=0)   # chat.update is rate limited; progress is throttled
    # State and storage
    redis_url: str = ""
    redis_ack_timeout_seconds: float = Field(0.3, gt=0)   # Redis calls on the ack path (and /readyz) give up after this
    redis_timeout_seconds: float = Field(5.0, gt=0)       # every other Redis call
    store: str = Field("./.ctbot/store", min_length=1)   # s3://bucket/prefix or a local directory
    data_prefix: str = "data/"          # where new labelled data lands, relative to store
    eval_uri: str = ""                  # fixed eval set; default: <store>/eval/eval.npz
    model_name: str = Field("mnist-arcface", min_length=1)
    keep_versions: int = Field(5, ge=1)
    # Runs
    runner: Literal["local", "kfp"] = "local"
    kfp_host: str = ""
    kfp_experiment: str = "ctbot"
    kfp_namespace: str = ""             # multi-user Kubeflow: the profile namespace runs go into
    kfp_ui_url: str = ""                # links posted to Slack; default kfp_host
    kfp_token: SecretStr = SecretStr("")   # a bearer token; unset: the projected service-account token
    kfp_token_path: str = ""            # that token's file; default $KF_PIPELINES_SA_TOKEN_PATH or kfp's path
    kfp_timeout_seconds: float = Field(30.0, gt=0)   # per API request, so a stuck API can't hang a tick
    kfp_retries: int = Field(4, ge=0)   # on connection errors and 5xx, with backoff
    image: str = ""                     # the pipeline components' (trainer) image; "" = the pipeline's default
    resources: str = ""                 # kfp: per-step resources file (see pipelines/resources.py)
    run_workdir: str = "./.ctbot/runs"  # local runner's scratch (pipeline_root, logs)
    deploy_floor: float = Field(0.97, ge=0, le=1)        # absolute minimum kNN top-1 to deploy
    deploy_tolerance: float = Field(0.002, ge=0, le=1)   # allowed regression against production
    # Schedule
    timezone: str = "UTC"
    retrain_day: str = "tue"            # cron day names; never numbers (APScheduler's Monday is 0)
    retrain_time: str = "09:00"
    data_watch_minutes: float = Field(10.0, gt=0)
    data_sweep_minutes: float = Field(60.0, gt=0)        # full listing that catches rewrites (scheduler/watcher.py)
    run_watch_seconds: float = Field(5.0, gt=0)
    new_data_threshold: int = Field(1, ge=1)             # new objects needed before alerting
    auto_retrain: bool = False
    misfire_grace_seconds: int = Field(6 * 3600, ge=1)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    ct: CtSection = Field(default_factory=CtSection)
    access: AccessSection = Field(default_factory=AccessSection)
    deploy: DeploySection = Field(default_factory=DeploySection)
    serving: ServingSection = Field(default_factory=ServingSection)
    http: HttpSection = Field(default_factory=HttpSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    outbox_drain_seconds: float = Field(2.0, gt=0)       # how often owed Slack messages are retried
    home_refresh_seconds: float = Field(10.0, gt=0)      # least time between republishing everyone's Home tab
    outbox: OutboxSection = Field(default_factory=OutboxSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    command_resume_seconds: float = Field(10.0, gt=0)    # how often commands cut off by a crash are resumed
    command_stale_seconds: float = Field(300.0, gt=0)    # a started command silent this long is resumed
    finish_retry_seconds: float = Field(30.0, gt=0)      # a run's finish cut short by a crash is redone after this
    # Operations
    log_format: Literal["text", "json"] = "text"    # json: one object per line, with the run id

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Settings(...) is exactly its arguments (tests build it so). load() layers the file
        # and the environment itself, to check unknown names and record where values came from.
        return (init_settings,)

    # The schedule is checked here, not by importing scheduler/ (core sits below it).
    @field_validator("retrain_day")
    @classmethod
    def _days(cls, v: str) -> str:
        spec = v.strip().lower()
        tokens = [t.strip() for part in spec.split(",") for t in part.split("-")]
        if not spec or any(t not in DAYS for t in tokens):
            raise ValueError(f"use day names ({', '.join(DAYS)}), e.g. 'tue' or 'mon,thu'; numbers are "
                             "ambiguous (APScheduler's Monday is 0)")
        return spec

    @field_validator("retrain_time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            # YAML 1.1 reads an unquoted 9:30 as the base-60 number 570.
            h, m = divmod(v, 60)
            raise ValueError(f"YAML read an unquoted time as the number {v}: quote it, e.g. \"{h:02d}:{m:02d}\"")
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", v) if isinstance(v, str) else None
        if not m or int(m[1]) > 23 or int(m[2]) > 59:
            raise ValueError("use HH:MM, 24-hour clock, e.g. 09:00")
        return v.strip()

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA zone name such as 'Europe/Paris'") from None
        return v

    @property
    def on_new_data(self) -> str:
        """ct.on_new_data, where an unset one follows the older auto_retrain: true (full)."""
        if "on_new_data" not in self.ct.model_fields_set and self.auto_retrain:
            return "full"
        return self.ct.on_new_data

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, config_file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
             **overrides) -> Settings:
        """Defaults < ``config_file`` (or $CT_CONFIG) < ``env`` (default os.environ) <
        ``overrides``. Raises ConfigError naming every problem, and where each came from."""
        values, origins, problems = read_sources(cls, config_file, env, overrides)
        try:
            settings = cls(**values)
        except ValidationError as e:
            problems += [describe(err, origins) for err in e.errors()]
            settings = None
        if problems:
            raise ConfigError(problems)
        settings._origins = origins
        return settings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """The environment (and $CT_CONFIG when set) over the defaults, then ``overrides``."""
        return cls.load(None, env, **overrides)

    def origin(self, key: str) -> str:
        """Where a (dotted) key's value came from: default, file PATH, env NAME or argument."""
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            if (found := self._origins.get(".".join(parts[:i]))) is not None:
                return found
        return "default"

    def leaves(self) -> Iterator[tuple[str, Any]]:
        """Every leaf setting as (dotted key, value), nested sections flattened."""
        yield from leaves(self)


def load_settings(config_file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  **overrides) -> Settings:
    return Settings.load(config_file, env, **overrides)


def reveal(secret) -> str:
    """A secret's value, for the one place that hands it to a client."""
    return secret.get_secret_value() if hasattr(secret, "get_secret_value") else (secret or "")


def masked(key: str, value: Any) -> Any:
    """A value fit to print: secrets become *** (or empty when unset)."""
    if isinstance(value, SecretStr) or key.rsplit(".", 1)[-1] in SECRET_FIELDS:
        return "***" if reveal(value) else ""
    return value


