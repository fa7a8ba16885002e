"""KfpRunner: the compiled pipeline on a Kubeflow Pipelines cluster.

Needs a KFP backend 2.14 or later: the exit task reads the run's final status
(``dsl.PipelineTaskFinalStatus``, kubeflow/pipelines#11953, first released in 2.14) and
the sweep fans in artifacts with ``dsl.Collected`` (#11725, 2.5). Older backends refuse
the package ("task final status not supported yet").

Authentication is what kfp's in-cluster clients do: the projected service-account token
of audience ``pipelines.kubeflow.org`` (read again on every request, as the kubelet
rotates it), or a bearer token from ``kfp_token``. kfp.Client skips that token when a
host is given, so the credentials are passed in explicitly.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

from core import metrics
from core.config import reveal
from pipelines.report import CANCELED, FAILED, finalize_run
from pipelines.runners import PIPELINE_DESCRIPTION, status_of, write_canceled_report
from steps import layout
from steps.layout import data_uris_or_default, resolve_eval_uri, store_root
from steps.results import read_report

log = logging.getLogger(__name__)

MIN_BACKEND_VERSION = "2.14.0"
KFP_STATES = {
    "SUCCEEDED": "succeeded", "FAILED": "failed", "CANCELED": "canceled",
    "CANCELING": "running",  # the exit handler may still be writing the report
    "SKIPPED": "succeeded",
    "PENDING": "running", "RUNNING": "running", "PAUSED": "running",
    "RUNTIME_STATE_UNSPECIFIED": "running",
}
# 503 means the request was not handled, so it is safe to send again whatever the
# method; other 5xx only for idempotent methods: a POST that timed out may have
# created a run already.
RETRY_ANY_METHOD = frozenset({503})
RETRY_IDEMPOTENT = frozenset({500, 502, 504})


class KfpBackendTooOld(RuntimeError):
    """The KFP API server is older than MIN_BACKEND_VERSION: every run would be refused."""


def release(tag: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a KFP release tag ("2.14.3", "v2.5.0-rc.1"); None if it is none."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", tag.strip())
    return tuple(int(x) for x in m.groups()) if m else None


def _retry(total: int, backoff: float = 0.5):
    from urllib3.util.retry import Retry

    class ApiRetry(Retry):
        def is_retry(self, method, status_code, has_retry_after=False):
            if status_code in RETRY_ANY_METHOD:
                return True
            return super().is_retry(method, status_code, has_retry_after)

    return ApiRetry(total=total, connect=total, read=total, status=total, other=0, redirect=0,
                    backoff_factor=backoff, backoff_max=10, status_forcelist=RETRY_IDEMPOTENT,
                    raise_on_status=False, respect_retry_after_header=True)


class _Transport:
    """kfp_server_api's urllib3 pool with a retry policy and a timeout on every request
    (it passes ``timeout=None``, which waits for ever on a stuck API)."""

    def __init__(self, pool, retries, timeout):
        self._pool, self._retries, self._timeout = pool, retries, timeout

    def request(self, method, url, **kw):
        if kw.get("timeout") is None:
            kw["timeout"] = self._timeout
        kw.setdefault("retries", self._retries)
        return self._pool.request(method, url, **kw)

    def __getattr__(self, name):
        return getattr(self._pool, name)


@contextlib.contextmanager
def _quiet():
    """kfp.Client prints links ("Run details: ...") to stdout; keep them in the log.
    The redirect is process-wide while it lasts; ctbot's own code never prints."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore", FutureWarning)
        yield
    for line in buf.getvalue().splitlines():
        log.debug("kfp: %s", line)


class KfpRunner:
    """Kubeflow Pipelines: each submit uploads the pipeline as a new version of
    ``ctbot-mnist-arcface`` (or ``-sweep``) in the configured namespace and starts a run
    in the configured experiment. The store must be s3:// so the cluster's pods can
    reach it; they read its endpoint and credentials from the ``ctbot-s3`` Secret by
    default (pipelines.resources; ``settings.resources`` can replace it)."""

    def __init__(self, settings, store, client=None):
        if not settings.kfp_host:
            raise ValueError("the kfp runner needs CT_KFP_HOST (the Kubeflow Pipelines API URL)")
        self.settings = settings
        self.store = store
        self.host = settings.kfp_host.rstrip("/")
        self.ui_url = (settings.kfp_ui_url or settings.kfp_host).rstrip("/")
        self.namespace = settings.kfp_namespace or None
        self._client = client

    # ---- the client --------------------------------------------------------------------

    def credentials(self) -> dict:
        """kfp.Client keyword arguments that authenticate it (empty: none found)."""
        token = reveal(self.settings.kfp_token)
        if token:
            return {"existing_token": token}
        from kfp.client import (
            KF_PIPELINES_SA_TOKEN_ENV,
            KF_PIPELINES_SA_TOKEN_PATH,
            ServiceAccountTokenVolumeCredentials,
        )
        path = (self.settings.kfp_token_path or os.environ.get(KF_PIPELINES_SA_TOKEN_ENV)
                or KF_PIPELINES_SA_TOKEN_PATH)
        if os.path.exists(path):
            return {"credentials": ServiceAccountTokenVolumeCredentials(path)}
        log.warning("no KFP credentials: kfp_token is unset and %s does not exist; "
                    "requests go without a token (fine for a port-forward, refused by multi-user Kubeflow)",
                    path)
        return {}

    @property
    def client(self):
        if self._client is None:
            import kfp
            import urllib3

            s = self.settings
            with _quiet():
                client = kfp.Client(host=self.host, namespace=self.namespace or "kubeflow",
                                    ui_host=self.ui_url, **self.credentials())
            # Every generated API shares one ApiClient; kfp offers no hook for its pool.
            rest = client._run_api.api_client.rest_client
            rest.pool_manager = _Transport(
                rest.pool_manager, _retry(s.kfp_retries),
                urllib3.Timeout(connect=min(10.0, s.kfp_timeout_seconds), read=s.kfp_timeout_seconds))
            self._client = client
        return self._client

    def backend_version(self) -> str:
        """The API server's release: the ``tag_name`` of its healthz answer (kfp's model of
        that answer drops the field, so the body is read as sent)."""
        resp = self._call("healthz", self.client._healthz_api.healthz_service_get_healthz, _preload_content=False)
        return str(json.loads(resp.data or b"{}").get("tag_name") or "")

    def check_backend(self) -> str:
        """Raise KfpBackendTooOld when the server's release is below MIN_BACKEND_VERSION;
        a server that names no release (a dev build says "unknown") is let through with a
        warning. Returns the release seen."""
        tag = self.backend_version()
        seen = release(tag)
        if seen is None:
            log.warning("the KFP backend at %s names no release (%r); ctbot needs %s or later",
                        self.host, tag, MIN_BACKEND_VERSION)
        elif seen < release(MIN_BACKEND_VERSION):
            raise KfpBackendTooOld(
                f"the Kubeflow Pipelines backend at {self.host} is {tag}; ctbot needs {MIN_BACKEND_VERSION} or "
                f"later (its exit task reads the run's final status, kubeflow/pipelines#11953): upgrade KFP, "
                f"or set runner: local")
        return tag

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            with _quiet():
                return fn(*args, **kwargs)
        except Exception as e:
            metrics.dependency_error("kfp")
            log.warning("KFP %s failed: %s: %s", what, type(e).__name__, e)
            raise

    # ---- the request -------------------------------------------------------------------

    def resources(self) -> dict:
        """The resources config the package is compiled with: the file (or the defaults,
        which give every step the ctbot-s3 Secret) and the trainer image from config."""
        from pipelines.resources import load_resources

        cfg = load_resources(self.settings.resources or None)
        if self.settings.image:
            cfg["image"] = self.settings.image
        return cfg

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
                                  sweep=sweep, require_approval=s.deploy.require_approval)
        return {
            "pipeline_name": SWEEP_PIPELINE_NAME if "sweep" in args else PIPELINE_NAME,
            "version_name": run_id,
            "experiment": s.kfp_experiment,
            "namespace": self.namespace,
            "job_name": run_id,
            "arguments": args,
            "sweep": "sweep" in args,
            "resources": s.resources or None,
        }

    def run_url(self, kfp_run_id: str) -> str:
        """The run in the KFP UI people can open (kfp_ui_url, not the in-cluster API host)."""
        return f"{self.ui_url}/#/runs/details/{kfp_run_id}"

    # ---- the runner protocol -----------------------------------------------------------

    def submit(self, run_id, data_uris, params, eval_uri, *, sweep=None, requested_by=""):
        from pipelines.compile import compile_pipeline

        req = self.request(run_id, data_uris, params, eval_uri, sweep=sweep, requested_by=requested_by)
        client = self.client
        with tempfile.TemporaryDirectory(prefix="ctbot-kfp-") as d:
            package = str(compile_pipeline(Path(d) / "pipeline.yaml", resources=self.resources(),
                                           sweep=req["sweep"]))
            pipeline_id = self._pipeline_id(req["pipeline_name"])
            if pipeline_id is None:
                pipeline_id = self._call("upload_pipeline", client.upload_pipeline, package,
                                         pipeline_name=req["pipeline_name"], description=PIPELINE_DESCRIPTION,
                                         namespace=self.namespace).pipeline_id
            # One version per run (named after it): the KFP UI shows exactly what ran.
            version_id = self._call("upload_pipeline_version", client.upload_pipeline_version, package,
                                    pipeline_version_name=req["version_name"],
                                    pipeline_id=pipeline_id).pipeline_version_id
        experiment = self._call("create_experiment", client.create_experiment, name=req["experiment"],
                                namespace=self.namespace)
        run = self._call("run_pipeline", client.run_pipeline, experiment_id=experiment.experiment_id,
                         job_name=req["job_name"], params=req["arguments"], pipeline_id=pipeline_id,
                         version_id=version_id, enable_caching=False)
        log.info("run %s: KFP run %s in experiment %s%s", run_id, run.run_id, req["experiment"],
                 f" (namespace {self.namespace})" if self.namespace else "")
        return run.run_id, self.run_url(run.run_id)

    def _pipeline_id(self, name: str) -> str | None:
        """The pipeline named ``name`` in our namespace (kfp.Client.get_pipeline_id looks
        only at shared pipelines)."""
        flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
        found = self._call("list_pipelines", self.client.list_pipelines, filter=flt, page_size=2,
                           namespace=self.namespace).pipelines or []
        if len(found) > 1:
            raise ValueError(f"{len(found)} KFP pipelines are named {name!r}; the name must be unique")
        return found[0].pipeline_id if found else None

    def poll(self, run_id, external_id):
        run = self._call("get_run", self.client.get_run, external_id)
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
        """The canceled report first, then terminate: the exit task of the terminated
        run then finds it and leaves it (pipelines.report.finalize_run). If terminate
        fails the report goes again, so the run finishes and reports on its own."""
        existing = read_report(self.store, run_id)
        if existing is not None:
            return existing   # it finished before the cancel arrived
        report = write_canceled_report(self.store, run_id, model=self.settings.model_name, by=by)
        try:
            self._call("terminate_run", self.client.terminate_run, external_id)
        except Exception:
            self.store.delete(layout.report_key(run_id))
            raise
        return report
