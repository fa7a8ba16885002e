"""LocalRunner: one detached ``ctbot pipeline run --runner local`` process per run."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.report import FAILED, finalize_run
from pipelines.runners import status_of, write_canceled_report
from steps.layout import data_uris_or_default, resolve_eval_uri, store_root
from steps.results import read_report

# A local run is batch work: it yields the CPU to the bot's acks (nice 0) and replies
# (ctbot.wiring.JOB_NICE). The run's own process lowers itself (``--nice``): no
# preexec_fn, which is unsafe in a process with threads.
RUN_NICE = 10


class LocalRunner:
    """One detached ``ctbot pipeline run --runner local`` process per run; the pid is the
    external id. Logs: <run_workdir>/<run_id>/run.log."""

    def __init__(self, settings, store, python: str | None = None):
        self.settings = settings
        self.store = store
        self.python = python or sys.executable
        self._procs: dict[int, subprocess.Popen] = {}  # our children, to reap them

    def workdir(self, run_id: str) -> Path:
        return Path(self.settings.run_workdir).expanduser().resolve() / run_id

    def command(self, run_id: str, data_uris: list[str], params: dict, eval_uri: str, *,
                sweep: list | None = None, requested_by: str = "") -> list[str]:
        s = self.settings
        cmd = [self.python, "-m", "ctbot.cli", "pipeline", "run", "--runner", "local",
               "--run-id", run_id, "--store", store_root(s.store), "--model", s.model_name,
               "--workdir", str(Path(s.run_workdir).expanduser().resolve()),
               "--floor", repr(float(s.deploy_floor)), "--tolerance", repr(float(s.deploy_tolerance)),
               "--keep-versions", str(int(s.keep_versions)), "--nice", str(RUN_NICE), "--verbose"]
        if requested_by:
            cmd += ["--requested-by", requested_by]
        if s.deploy.require_approval:   # the child reads no config file: say it on its command line
            cmd += ["--require-approval"]
        # Resolved here, from these settings, not from whatever the child's env says.
        cmd += ["--eval-data", resolve_eval_uri(s.store, eval_uri or s.eval_uri)]
        cmd += ["--data", *(data_uris_or_default(s.store, s.data_prefix, data_uris))]
        for key, value in (params or {}).items():
            if value is not None:
                cmd += ["--set", f"{key}={value}"]
        if sweep:
            cmd += ["--sweep", json.dumps(sweep)]
        return cmd

    def submit(self, run_id, data_uris, params, eval_uri, *, sweep=None, requested_by=""):
        workdir = self.workdir(run_id)
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(run_id, data_uris, params, eval_uri, sweep=sweep, requested_by=requested_by)
        with open(workdir / "run.log", "ab") as log:
            # Own session: the run survives the bot, and cancel can kill the whole group.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[proc.pid] = proc
        return str(proc.pid), ""

    def alive(self, run_id: str, pid: int | str) -> bool:
        """Is the run's process still running (a zombie or a reused pid is not)?"""
        pid = int(pid)
        proc = self._procs.get(pid)
        if proc is not None:
            if proc.poll() is None:
                return True
            del self._procs[pid]  # reaped; forget it
            return False
        # Not our child (the bot restarted): check the pid still is this run's process.
        proc_dir = Path(f"/proc/{pid}")
        if proc_dir.exists():
            try:
                state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                return False
            return state not in ("Z", "X") and run_id in cmdline
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def poll(self, run_id, external_id):
        store = self.store
        report = read_report(store, run_id)
        if report is not None:
            return status_of(report)
        if external_id and self.alive(run_id, int(external_id)):
            return "running"
        report = read_report(store, run_id)  # it may have finished between the two looks
        if report is None:
            log = self.workdir(run_id) / "run.log"
            report = finalize_run(store, run_id, model=self.settings.model_name,
                                  pipeline_state=FAILED,
                                  pipeline_error=f"run process exited without a report; see {log}")
        return status_of(report)

    def cancel(self, run_id, external_id, by: str = ""):
        pid = int(external_id) if external_id else 0
        if pid and self.alive(run_id, pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.time() + 10
            while time.time() < deadline and self.alive(run_id, pid):
                time.sleep(0.1)
            if self.alive(run_id, pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        proc = self._procs.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        write_canceled_report(self.store, run_id,
                              model=self.settings.model_name, by=by)


