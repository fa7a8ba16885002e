"""Runners start a pipeline run, tell how it is doing, and cancel it.

    runner = get_runner(settings)
    external_id, external_url = runner.submit(run_id, data_uris, params, eval_uri)
    runner.poll(run_id, external_id)   # "running" | "succeeded" | "failed" | "canceled"
    runner.cancel(run_id, external_id)

LocalRunner starts ``python -m core.cli pipeline run --runner local`` as a detached
process (kfp.local inside it), so the bot stays small and a run outlives a bot restart.
KfpRunner sends the compiled pipeline to a Kubeflow Pipelines cluster. Either way the
results land in the store (pipelines.results). The bot imports this module: no torch,
and kfp only inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol

from pipelines.report import CANCELED, FAILED, finalize_run
from pipelines.results import read_report, read_steps

RUN_STATES = ("running", "succeeded", "failed", "canceled")
PIPELINE_DESCRIPTION = "ctbot: MNIST ArcFace + faiss continuous training (uploaded by ctbot)"


class Runner(Protocol):
    def submit(self, run_id: str, data_uris: list[str], params: dict, eval_uri: str, *,
               sweep: list | None = None, requested_by: str = "") -> tuple[str, str]: ...

    def poll(self, run_id: str, external_id: str) -> str: ...

    def cancel(self, run_id: str, external_id: str) -> None: ...


def get_runner(settings) -> "LocalRunner | KfpRunner":
    if settings.runner == "local":
        return LocalRunner(settings)
    if settings.runner == "kfp":
        return KfpRunner(settings)
    raise ValueError(f"unknown runner {settings.runner!r}: use 'local' or 'kfp'")


def store_root(settings) -> str:
    """The store as the pipeline's tasks see it: local paths made absolute, since task
    processes may not share the caller's working directory."""
    root = settings.store
    if root.startswith("s3://"):
        return root
    return str(Path(root.removeprefix("file://")).expanduser().resolve())


def default_eval_uri(settings) -> str:
    """CT_EVAL_URI as given when it is a full URI or path, else a key in the store."""
    given = settings.eval_key_or_uri
    if "://" in given or given.startswith("/"):
        return given
    return store_root(settings).rstrip("/") + "/" + given


def default_data_uris(settings) -> list[str]:
    return [store_root(settings).rstrip("/") + "/" + settings.data_prefix]


def _open_store(settings):
    from steps.storage import open_store
    return open_store(store_root(settings))


def _status_of(report: dict) -> str:
    status = report.get("status")
    return status if status in ("succeeded", "canceled") else "failed"


def write_canceled_report(store, run_id: str, *, model: str, by: str = "") -> dict:
    """Close a canceled run's books, unless it already finished on its own."""
    existing = read_report(store, run_id)
    if existing is not None:
        return existing
    why = f"canceled by {by}" if by else "canceled"
    return finalize_run(store, run_id, model=model, pipeline_state=CANCELED, pipeline_error=why)


# --------------------------------------------------------------------------- local


class LocalRunner:
    """One detached ``ctbot pipeline run --runner local`` process per run; the pid is the
    external id. Logs: <run_workdir>/<run_id>/run.log."""

    def __init__(self, settings, python: str | None = None):
        self.settings = settings
        self.python = python or sys.executable
        self._procs: dict[int, subprocess.Popen] = {}  # our children, to reap them

    def workdir(self, run_id: str) -> Path:
        return Path(self.settings.run_workdir).expanduser().resolve() / run_id

    def command(self, run_id: str, data_uris: list[str], params: dict, eval_uri: str, *,
                sweep: list | None = None, requested_by: str = "") -> list[str]:
        s = self.settings
        cmd = [self.python, "-m", "core.cli", "pipeline", "run", "--runner", "local",
               "--run-id", run_id, "--store", store_root(s), "--model", s.model_name,
               "--workdir", str(Path(s.run_workdir).expanduser().resolve()),
               "--floor", repr(float(s.deploy_floor)), "--tolerance", repr(float(s.deploy_tolerance)),
               "--keep-versions", str(int(s.keep_versions)), "--verbose"]
        if requested_by:
            cmd += ["--requested-by", requested_by]
        # Resolved here, from these settings, not from whatever the child's env says.
        cmd += ["--eval-data", eval_uri or default_eval_uri(s)]
        cmd += ["--data", *(data_uris or default_data_uris(s))]
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
        store = _open_store(self.settings)
        report = read_report(store, run_id)
        if report is not None:
            return _status_of(report)
        if external_id and self.alive(run_id, int(external_id)):
            return "running"
        report = read_report(store, run_id)  # it may have finished between the two looks
        if report is None:
            log = self.workdir(run_id) / "run.log"
            report = finalize_run(store, run_id, model=self.settings.model_name,
                                  pipeline_state=FAILED,
                                  pipeline_error=f"run process exited without a report; see {log}")
        return _status_of(report)

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
        write_canceled_report(_open_store(self.settings), run_id,
                              model=self.settings.model_name, by=by)


# --------------------------------------------------------------------------- kfp

KFP_STATES = {
    "SUCCEEDED": "succeeded", "FAILED": "failed", "CANCELED": "canceled",
    "CANCELING": "running",  # the exit handler may still be writing the report
    "SKIPPED": "succeeded",
    "PENDING": "running", "RUNNING": "running", "PAUSED": "running",
    "RUNTIME_STATE_UNSPECIFIED": "running",
}


class KfpRunner:
    """Kubeflow Pipelines: each submit uploads the pipeline as a new version of
    ``ctbot-mnist-arcface`` (or ``-sweep``) and starts a run in the configured experiment.
    The store must be s3:// so the cluster's pods can reach it; their S3 endpoint and
    credentials come from the resources config (``default.env`` / ``default.secret_env``),
    read from ``settings.extra['resources']`` or $CT_RESOURCES."""

    def __init__(self, settings, client=None):
        if not settings.kfp_host:
            raise ValueError("the kfp runner needs CT_KFP_HOST (the Kubeflow Pipelines API URL)")
        self.settings = settings
        self.host = settings.kfp_host.rstrip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import kfp
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self._client = kfp.Client(host=self.host)
        return self._client

    def resources_path(self) -> str | None:
        return self.settings.extra.get("resources") or os.environ.get("CT_RESOURCES") or None

    def request(self, run_id, data_uris, params, eval_uri, *, sweep=None, requested_by="") -> dict:
        """Everything submit sends, built without a server."""
        from pipelines.pipeline import PIPELINE_NAME, SWEEP_PIPELINE_NAME, pipeline_arguments

        s = self.settings
        root = store_root(s)
        if not root.startswith("s3://"):
            raise ValueError(f"the kfp runner needs an s3:// store that the cluster can reach, "
                             f"not {root!r}: set CT_STORE=s3://bucket/prefix")
        args = pipeline_arguments(run_id=run_id, store=root, model_name=s.model_name,
                                  data_uris=data_uris or default_data_uris(s),
                                  eval_uri=eval_uri or default_eval_uri(s),
                                  params=params, floor=s.deploy_floor, tolerance=s.deploy_tolerance,
                                  keep_versions=s.keep_versions, requested_by=requested_by,
                                  sweep=sweep)
        return {
            "pipeline_name": SWEEP_PIPELINE_NAME if "sweep" in args else PIPELINE_NAME,
            "version_name": run_id,
            "experiment": s.kfp_experiment,
            "job_name": run_id,
            "arguments": args,
            "sweep": "sweep" in args,
            "resources": self.resources_path(),
        }

    def run_url(self, kfp_run_id: str) -> str:
        return f"{self.host}/#/runs/details/{kfp_run_id}"

    def submit(self, run_id, data_uris, params, eval_uri, *, sweep=None, requested_by=""):
        from pipelines.compile import compile_pipeline

        req = self.request(run_id, data_uris, params, eval_uri, sweep=sweep, requested_by=requested_by)
        client = self.client
        with tempfile.TemporaryDirectory(prefix="ctbot-kfp-") as d:
            package = str(compile_pipeline(Path(d) / "pipeline.yaml", resources=req["resources"],
                                           sweep=req["sweep"]))
            pipeline_id = client.get_pipeline_id(req["pipeline_name"])
            if pipeline_id is None:
                pipeline_id = client.upload_pipeline(package, pipeline_name=req["pipeline_name"],
                                                     description=PIPELINE_DESCRIPTION).pipeline_id
            # One version per run (named after it): the KFP UI shows exactly what ran.
            version_id = client.upload_pipeline_version(
                package, pipeline_version_name=req["version_name"],
                pipeline_id=pipeline_id).pipeline_version_id
        experiment = client.create_experiment(name=req["experiment"])
        run = client.run_pipeline(experiment_id=experiment.experiment_id, job_name=req["job_name"],
                                  params=req["arguments"], pipeline_id=pipeline_id,
                                  version_id=version_id, enable_caching=False)
        return run.run_id, self.run_url(run.run_id)

    def poll(self, run_id, external_id):
        run = self.client.get_run(external_id)
        state = KFP_STATES.get(str(run.state or "RUNTIME_STATE_UNSPECIFIED"), "running")
        if state == "running":
            return state
        store = _open_store(self.settings)
        report = read_report(store, run_id)
        if report is None:  # the exit task did not get to run (terminated, pod lost)
            error = getattr(run, "error", None)
            report = finalize_run(store, run_id, model=self.settings.model_name,
                                  pipeline_state=CANCELED if state == "canceled" else FAILED,
                                  pipeline_error=str(getattr(error, "message", "") or "")
                                  or f"KFP run {external_id} ended {run.state}")
        return "canceled" if state == "canceled" else _status_of(report)

    def cancel(self, run_id, external_id, by: str = ""):
        self.client.terminate_run(external_id)
        write_canceled_report(_open_store(self.settings), run_id,
                              model=self.settings.model_name, by=by)


# --------------------------------------------------------------------------- in process


class ProgressWatcher:
    """Calls ``on_step(step, status)`` whenever a step's status JSON changes."""

    def __init__(self, store, run_id: str, on_step: Callable[[str, dict], None], every: float = 1.0):
        self.store, self.run_id, self.on_step, self.every = store, run_id, on_step, every
        self.seen: dict[str, tuple] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{run_id}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.check()  # the last changes, after the pipeline returned

    def _loop(self):
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # a flaky read must not stop the run
                self.check()

    def check(self):
        for step, doc in read_steps(self.store, self.run_id).items():
            sig = (doc.get("state"), json.dumps(doc.get("summary"), sort_keys=True, default=str))
            if self.seen.get(step) != sig:
                self.seen[step] = sig
                self.on_step(step, doc)


def run_local(settings, run_id: str, data_uris: list[str], params: dict, eval_uri: str = "", *,
              sweep: list | None = None, requested_by: str = "",
              on_step: Callable[[str, dict], None] | None = None, verbose: bool = False,
              keep_workdir: bool = False, parallelism: int = 2) -> dict:
    """Run the whole pipeline in this process with kfp.local and return report.json.

    Scratch space is <run_workdir>/<run_id>/: root/ (task outputs, removed after a
    successful run unless keep_workdir), tmp/ (TMPDIR for kfp.local, which leaks a temp
    dir per task; always removed) and kfp.log (kfp's own output unless verbose)."""
    from kfp import local

    from pipelines.pipeline import build_pipeline, pipeline_arguments

    root = store_root(settings)
    store = _open_store(settings)
    args = pipeline_arguments(run_id=run_id, store=root, model_name=settings.model_name,
                              data_uris=data_uris or default_data_uris(settings),
                              eval_uri=eval_uri or default_eval_uri(settings),
                              params=params, floor=settings.deploy_floor,
                              tolerance=settings.deploy_tolerance, keep_versions=settings.keep_versions,
                              requested_by=requested_by, sweep=sweep)
    workdir = Path(settings.run_workdir).expanduser().resolve() / run_id
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # kfp.local swaps builtins.print for an indenting one around each task, and parallel
    # sweep trials can leave it swapped: put it back afterwards.
    import builtins
    original_print = builtins.print
    old_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # re-read TMPDIR
    crash: BaseException | None = None
    watcher = ProgressWatcher(store, run_id, on_step) if on_step else contextlib.nullcontext()
    try:
        pipeline = build_pipeline(None, sweep="sweep" in args, parallelism=parallelism)
        local.init(runner=local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(workdir / "root"), raise_on_error=False)
        with watcher, _kfp_output(workdir / "kfp.log", verbose), warnings.catch_warnings():
            # The image name is for clusters; locally the tasks run in this venv on purpose.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            try:
                pipeline(**args)
            except Exception as e:  # noqa: BLE001 - recorded in the report below
                crash = e
    finally:
        builtins.print = original_print
        if old_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmpdir
        tempfile.tempdir = None
        shutil.rmtree(tmp, ignore_errors=True)

    report = read_report(store, run_id)
    if report is None:
        why = f"{type(crash).__name__}: {crash}" if crash else "pipeline ended without a report"
        report = finalize_run(store, run_id, model=settings.model_name, params=params,
                              pipeline_state=FAILED, pipeline_error=f"{why}; see {workdir / 'kfp.log'}")
    if report.get("status") == "succeeded" and not keep_workdir:
        shutil.rmtree(workdir / "root", ignore_errors=True)
    return report


@contextlib.contextmanager
def _kfp_output(log_path: Path, verbose: bool):
    """kfp.local prints every task's output to stdout; keep it in a file unless asked."""
    if verbose:
        yield
        return
    with open(log_path, "a") as f, contextlib.redirect_stdout(f):
        yield
