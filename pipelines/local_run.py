"""The local run's body: the whole pipeline in this process with kfp.local. It runs in
the child that LocalRunner starts (``ctbot pipeline run --runner local``)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from pipelines.report import FAILED, finalize_run
from steps.layout import data_uris_or_default, resolve_eval_uri, store_root
from steps.results import read_report, read_steps


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


def run_local(settings, store, run_id: str, data_uris: list[str], params: dict, eval_uri: str = "", *,
              sweep: list | None = None, requested_by: str = "",
              on_step: Callable[[str, dict], None] | None = None, verbose: bool = False,
              keep_workdir: bool = False, parallelism: int = 2, warm_tasks: bool = True) -> dict:
    """Run the whole pipeline in this process with kfp.local and return report.json.

    Scratch space is <run_workdir>/<run_id>/: root/ (task outputs, removed after a
    successful run unless keep_workdir), tmp/ (TMPDIR for kfp.local, which leaks a temp
    dir per task; always removed) and kfp.log (kfp's own output unless verbose).
    ``warm_tasks``: tasks fork from a host that has their imports done
    (pipelines.task_host); False starts each as a fresh process, as a cluster does."""
    from kfp import local

    from pipelines.pipeline import build_pipeline, pipeline_arguments

    root = store_root(settings.store)
    args = pipeline_arguments(run_id=run_id, store=root, model_name=settings.model_name,
                              data_uris=data_uris_or_default(settings.store, settings.data_prefix, data_uris),
                              eval_uri=resolve_eval_uri(settings.store, eval_uri or settings.eval_uri),
                              params=params, floor=settings.deploy_floor,
                              tolerance=settings.deploy_tolerance, keep_versions=settings.keep_versions,
                              requested_by=requested_by, sweep=sweep,
                              require_approval=settings.deploy.require_approval)
    workdir = Path(settings.run_workdir).expanduser().resolve() / run_id
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    crash: BaseException | None = None
    watcher = ProgressWatcher(store, run_id, on_step) if on_step else contextlib.nullcontext()
    with _kfp_local_env(tmp), _warm_tasks(tmp, workdir / "kfp.log", warm_tasks):
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

    report = read_report(store, run_id)
    if report is None:
        why = f"{type(crash).__name__}: {crash}" if crash else "pipeline ended without a report"
        report = finalize_run(store, run_id, model=settings.model_name, params=params,
                              pipeline_state=FAILED, pipeline_error=f"{why}; see {workdir / 'kfp.log'}")
    if report.get("status") == "succeeded" and not keep_workdir:
        shutil.rmtree(workdir / "root", ignore_errors=True)
    return report


@contextlib.contextmanager
def _kfp_local_env(tmp: Path):
    """TMPDIR at ``tmp`` while kfp.local runs (it leaks a temp dir per task), removed after;
    and builtins.print put back: kfp.local swaps it for an indenting one around each task,
    and parallel sweep trials can leave it swapped."""
    import builtins
    original_print = builtins.print
    old_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        yield
    finally:
        builtins.print = original_print
        if old_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmpdir
        tempfile.tempdir = None
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _warm_tasks(tmp: Path, log_path: Path, enabled: bool):
    """kfp.local's tasks through a task host (pipelines.task_host): kfp.local runs each
    task with sys.executable, so that names the host's launcher while the run lasts."""
    if not enabled:
        yield None
        return
    from pipelines.task_host import ENV, task_host

    with task_host(tmp, log_path) as host:
        python, old = sys.executable, os.environ.get(ENV)
        sys.executable, os.environ[ENV] = str(host.launcher), host.address
        try:
            yield host
        finally:
            sys.executable = python
            if old is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = old


@contextlib.contextmanager
def _kfp_output(log_path: Path, verbose: bool):
    """kfp.local prints every task's output to stdout; keep it in a file unless asked."""
    if verbose:
        yield
        return
    with open(log_path, "a") as f, contextlib.redirect_stdout(f):
        yield
