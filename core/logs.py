"""Logging for the ctbot processes: text or JSON lines (``log_format``), with the run id.

    configure_logging(settings, "INFO")      # once, at process start (ctbot serve / scheduler)

A JSON line carries ``run_id`` when the record has one (``log.info(..., extra={"run_id": r})``)
or its message names one (r-YYYYMMDD-HHMM-xxxx), so a log search by run id finds the
bot's, the scheduler's and the runner's lines about it. APScheduler's two INFO lines per
job run (every few seconds per replica) are kept to warnings.
"""
from __future__ import annotations

import json
import logging
import re
import time

RUN_ID = re.compile(r"\br-\d{8}-\d{4}-[0-9a-f]{4,}\b")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
QUIET = ("apscheduler.executors.default", "apscheduler.scheduler")


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = ""):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": message}
        if self.process:
            doc["process"] = self.process
        run_id = getattr(record, "run_id", None) or (m.group(0) if (m := RUN_ID.search(message)) else None)
        if run_id:
            doc["run_id"] = run_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(settings, level: str | int = "INFO", process: str = "") -> None:
    """``process`` names a helper process (the job workers: "worker") in each line."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(process) if settings.log_format == "json" else logging.Formatter(
        TEXT_FORMAT.replace("%(name)s", f"%(name)s[{process}]") if process else TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
