"""Settings from the environment. Secrets are read here and nowhere else, and never printed."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

SECRET_FIELDS = {"slack_bot_token", "slack_signing_secret", "slack_app_token"}


def _bool(v: str) -> bool:
    return v.strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Settings:
    # Slack
    slack_bot_token: str = ""
    slack_signing_secret: str = ""
    slack_app_token: str = ""           # set => Socket Mode
    slack_api_url: str = ""             # e.g. a local stand-in: http://127.0.0.1:PORT/api/
    slack_channel: str = "#ct"
    slash_command: str = "/ct"
    http_host: str = "127.0.0.1"
    http_port: int = 3000
    slack_min_update_seconds: float = 3.0   # chat.update is rate limited; progress is throttled
    # State and storage
    redis_url: str = ""
    store: str = "./.ctbot/store"       # s3://bucket/prefix or a local directory
    data_prefix: str = "data/"          # where new labelled data lands, relative to store
    eval_uri: str = ""                  # fixed eval set; default: <store>/eval/eval.npz
    model_name: str = "mnist-arcface"
    keep_versions: int = 5
    # Runs
    runner: str = "local"               # local | kfp
    kfp_host: str = ""
    kfp_experiment: str = "ctbot"
    run_workdir: str = "./.ctbot/runs"  # local runner's scratch (pipeline_root, logs)
    deploy_floor: float = 0.97          # absolute minimum kNN top-1 to deploy
    deploy_tolerance: float = 0.002     # allowed regression against production
    # Schedule
    timezone: str = "UTC"
    retrain_day: str = "tue"            # cron day names; never numbers (APScheduler's Monday is 0)
    retrain_time: str = "09:00"
    data_watch_minutes: float = 10.0
    data_sweep_minutes: float = 60.0    # full listing that catches rewrites (see scheduler/watcher.py)
    run_watch_seconds: float = 5.0
    new_data_threshold: int = 1         # new objects needed before alerting
    auto_retrain: bool = False
    misfire_grace_seconds: int = 6 * 3600
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"CT_{f.name.upper()}")
            if f.name in SECRET_FIELDS or f.name in {"redis_url", "slack_api_url"}:
                raw = env.get(f.name.upper(), raw)  # SLACK_BOT_TOKEN, REDIS_URL, ...
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            values[f.name] = _bool(raw) if kind is bool else kind(raw)
        values.update(overrides)
        return cls(**values)

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        shown = {f.name: ("***" if f.name in SECRET_FIELDS and getattr(self, f.name) else getattr(self, f.name))
                 for f in fields(self)}
        return f"Settings({shown})"


def reveal(secret) -> str:
    """A secret's value, for the one place that hands it to a client."""
    return secret.get_secret_value() if hasattr(secret, "get_secret_value") else (secret or "")
