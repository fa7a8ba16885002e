"""KfpRunner: the compiled pipeline on a Kubeflow Pipelines cluster."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from pipelines.report import CANCELED, FAILED, finalize_run
from pipelines.runners import PIPELINE_DESCRIPTION, status_of, write_canceled_report
from steps.layout import data_uris_or_default, resolve_eval_uri, store_root
from steps.results import read_report

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
    read from ``settings.resources`` ($CT_RESOURCES)."""

    def __init__(self, settings, store, client=None):
        if not settings.kfp_host:
            raise ValueError("the kfp runner needs CT_KFP_HOST (the Kubeflow Pipelines API URL)")
        self.settings = settings
        self.store = store
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
        return self.settings.resources or None

    def request(self, run_id, data_uris, params, eval_uri, *, sweep=None, requested_by="") -> dict:
        """Everything submit sends, built without a server."""
        from pipelines.pipeline import PIPELINE_NAME, SWEEP_PIPELINE_NAME, pipeline_arguments

        s = self.settings
        root = store_root(s.store)
        if not root.startswith("s3://"):
            raise ValueError(f"the kfp runner needs an s3:// store that the cluster can reach, "
                             f"not {root!r}: set CT_STORE=s3://bucket/prefix")
        args = pipeline_arguments(run_id=run_id, store=root, model_name=s.model_name,
                                  data_uris=data_uris_or_default(s.store, s.data_prefix, data_uris),
                                  eval_uri=resolve_eval_uri(s.store, eval_uri or s.eval_uri),
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
        store = self.store
        report = read_report(store, run_id)
        if report is None:  # the exit task did not get to run (terminated, pod lost)
            error = getattr(run, "error", None)
            report = finalize_run(store, run_id, model=self.settings.model_name,
                                  pipeline_state=CANCELED if state == "canceled" else FAILED,
                                  pipeline_error=str(getattr(error, "message", "") or "")
                                  or f"KFP run {external_id} ended {run.state}")
        return "canceled" if state == "canceled" else status_of(report)

    def cancel(self, run_id, external_id, by: str = ""):
        self.client.terminate_run(external_id)
        write_canceled_report(self.store, run_id,
                              model=self.settings.model_name, by=by)


