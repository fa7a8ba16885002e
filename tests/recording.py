"""Test doubles for the service and scheduler tests, and only for them.

RecordingRunner counts launches: the real runners train a model, which the scheduler
and service tests don't need (the end-to-end tests use the real LocalRunner). A test
finishes a run the way a pipeline does, by writing its step files and report.json into
the (real, moto) store with ``finish_run``. RecordingNotifier keeps what would have
been posted to Slack (the real SlackNotifier is tested in the bot's tests).
"""
from __future__ import annotations

import threading

from steps import layout


class RecordingRunner:
    def __init__(self, fail_with: str | None = None):
        self.submits: list[dict] = []
        self.cancels: list[str] = []
        self.status: dict[str, str] = {}   # run_id -> what poll() answers (default running)
        self.fail_with = fail_with
        self._lock = threading.Lock()

    def submit(self, run_id, data_uris, params, eval_uri, *, sweep=None, requested_by=""):
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        with self._lock:
            self.submits.append({"run_id": run_id, "data_uris": list(data_uris), "params": dict(params),
                                 "eval_uri": eval_uri, "sweep": sweep, "requested_by": requested_by})
            return f"ext-{len(self.submits)}", f"http://kfp.example/runs/{run_id}"

    def poll(self, run_id, external_id):
        return self.status.get(run_id, "running")

    def cancel(self, run_id, external_id, by=""):
        self.cancels.append(run_id)
        self.status[run_id] = "canceled"

    def launched(self) -> list[str]:
        return [s["run_id"] for s in self.submits]


class RecordingNotifier:
    def __init__(self):
        self.calls: list[tuple] = []

    def _record(self, *call):
        self.calls.append(call)

    def named(self, name: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == name]

    def run_started(self, run):
        self._record("run_started", run)
        return "C0CT", f"1700000000.{len(self.calls):06d}"

    def run_progress(self, run, steps):
        self._record("run_progress", run, steps)

    def run_finished(self, run, report, confusion_png):
        self._record("run_finished", run, report, confusion_png)

    def new_data(self, found, alert_id):
        self._record("new_data", found, alert_id)

    def say(self, text, key=None):
        self._record("say", text)

    def fire_failed(self, fire_id, text):
        self._record("fire_failed", fire_id, text)


def write_step(store, run_id: str, step: str, state: str, **summary) -> None:
    from pipelines.status import mark
    mark(store, run_id, step, state, summary=summary)


def finish_run(store, runner: RecordingRunner, run_id: str, *, decision="deploy", top1=0.985,
               version: int = 1, failed_step: str | None = None, candidate=True,
               model="mnist-arcface", awaiting_approval: bool = False) -> dict:
    """Leave in the store what a finished pipeline leaves (step files, candidate package,
    confusion PNG), assemble report.json with the pipeline's own finalize_run, and make
    poll() report the outcome."""
    from pipelines.report import FAILED, SUCCEEDED, finalize_run
    from pipelines.status import mark
    for step in layout.STEPS:
        if step == failed_step:
            mark(store, run_id, step, "failed", error="3 corrupt objects")
            break
        if step == "evaluate":
            mark(store, run_id, step, "done", summary={
                "top1": top1, "decision": decision,
                "reason": f"top-1 {top1:.2%} against floor 97.00%"})
        elif step == "deploy":
            if decision == "deploy" and not awaiting_approval:   # else skipped, as the pipeline does
                mark(store, run_id, step, "done", summary={"version": version, "top1": top1})
        else:
            mark(store, run_id, step, "done")
    if candidate and not failed_step:
        store.put_bytes(layout.candidate_prefix(run_id) + "model.pt", b"weights")
        store.put_json(layout.candidate_prefix(run_id) + "metrics.json", {"top1": top1})
        store.put_bytes(layout.confusion_png_key(run_id), b"\x89PNG confusion")
    report = finalize_run(store, run_id, model=model,
                          pipeline_state=FAILED if failed_step else SUCCEEDED,
                          pipeline_error=f"{failed_step} failed" if failed_step else "")
    runner.status[run_id] = report["status"]
    return report


def make_service(settings, state, store, runner=None, notifier=None, **kw):
    from ctbot.wiring import build_deps
    return build_deps(settings, state=state, store=store, runner=runner or RecordingRunner(),
                      notifier=notifier, **kw).service
