"""A local stand-in for the Kubeflow Pipelines v2beta1 REST API, for tests and the demo.

It speaks what ``kfp.Client`` (and so pipelines.kfp_runner.KfpRunner) calls, over real
HTTP on 127.0.0.1:

* ``GET  /apis/v2beta1/healthz``
* ``POST /apis/v2beta1/pipelines/upload`` and ``/pipelines/upload_version`` (multipart,
  field ``uploadfile``: the IR YAML), ``GET /apis/v2beta1/pipelines`` (the display-name
  filter ``get_pipeline_id`` sends), ``/pipelines/{id}``, ``/pipelines/names/{name}``
* ``POST/GET /apis/v2beta1/experiments``, ``GET /apis/v2beta1/experiments/{id}``
* ``POST /apis/v2beta1/runs``, ``GET /apis/v2beta1/runs/{id}``, ``POST /runs/{id}:terminate``

Like a multi-user Kubeflow it refuses requests without the bearer token (when one is
configured) and experiments without a namespace (``multi_user=True``). It records every
request, and can answer the next few with a 5xx or stall them, to test retries and
timeouts. Runs stay RUNNING until ``finish()``, or, with ``execute=True``, it runs the
uploaded package itself with kfp.local in a child process (``python -m
devkit.kfp_standin execute``) and reports SUCCEEDED or FAILED as that child ends;
terminate kills the child and reports CANCELED.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

API = "/apis/v2beta1"
FINAL = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict          # lower-case names
    body: bytes
    status: int = 0        # what the stand-in answered

    @property
    def json(self):
        return json.loads(self.body) if self.body else None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _Fault:
    method: str
    pattern: str
    times: int
    status: int = 0        # answer this status...
    stall: float = 0.0     # ...or sleep this long first


@dataclass
class _Run:
    doc: dict
    proc: subprocess.Popen | None = None
    log: Path | None = None
    terminated: bool = False
    done: threading.Event = field(default_factory=threading.Event)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KfpStandin:
    def __init__(self, *, token: str | None = None, multi_user: bool = False, execute: bool = False,
                 workdir: str | Path | None = None, env: dict | None = None, version: str = "2.14.3"):
        self.token, self.multi_user, self.execute, self.version = token, multi_user, execute, version
        self.workdir = Path(workdir) if workdir else None
        if execute and self.workdir is None:
            raise ValueError("execute=True needs a workdir for the runs' packages and outputs")
        self.env = env or {}
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}      # id -> doc, plus "package" (bytes) and "spec" (the IR)
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, _Run] = {}
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> KfpStandin:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                         name="kfp-standin", daemon=True).start()
        return self

    def stop(self) -> None:
        for run in list(self.runs.values()):
            if run.proc and run.proc.poll() is None:
                run.terminated = True
                _kill(run.proc)
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- test controls -------------------------------------------------------------------

    def fail(self, method: str, pattern: str, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` requests matching (method, path regex) with ``status``."""
        self._faults.append(_Fault(method.upper(), pattern, times, status=status))

    def stall(self, method: str, pattern: str, seconds: float, times: int = 1) -> None:
        """Sleep ``seconds`` before answering the next ``times`` matching requests."""
        self._faults.append(_Fault(method.upper(), pattern, times, stall=seconds))

    def finish(self, run_id: str, state: str = "SUCCEEDED", error: str = "") -> None:
        with self._lock:
            self._set_state(self.runs[run_id], state, error)

    def wait_final(self, run_id: str, timeout: float = 120) -> str:
        if not self.runs[run_id].done.wait(timeout):
            raise TimeoutError(f"run {run_id} still {self.runs[run_id].doc['state']} after {timeout} s")
        return self.runs[run_id].doc["state"]

    def calls(self, method: str | None = None, pattern: str = "") -> list[Request]:
        return [r for r in list(self.requests)
                if (method is None or r.method == method.upper()) and re.search(pattern, r.path)]

    def run_log(self, run_id: str) -> str:
        log = self.runs[run_id].log
        return log.read_text(errors="replace") if log and log.exists() else ""

    # ---- the API ---------------------------------------------------------------------------

    def handle(self, req: Request) -> tuple[int, dict]:
        for fault in self._faults:
            if fault.times > 0 and fault.method == req.method and re.search(fault.pattern, req.path):
                fault.times -= 1
                if fault.stall:
                    time.sleep(fault.stall)
                if fault.status:
                    return fault.status, _error(fault.status, "injected by the stand-in")
                break
        if self.token is not None and req.authorization != f"Bearer {self.token}":
            return 401, _error(401, "Unauthenticated: a valid bearer token is required")
        path = req.path.removeprefix(API)
        routes = [
            ("GET", r"/healthz", self._healthz),
            ("POST", r"/pipelines/upload", self._upload),
            ("POST", r"/pipelines/upload_version", self._upload_version),
            ("GET", r"/pipelines", self._list_pipelines),
            ("GET", r"/pipelines/names/(?P<name>[^/]+)", self._pipeline_by_name),
            ("GET", r"/pipelines/(?P<id>[^/]+)", self._get_pipeline),
            ("POST", r"/experiments", self._create_experiment),
            ("GET", r"/experiments", self._list_experiments),
            ("GET", r"/experiments/(?P<id>[^/:]+)", self._get_experiment),
            ("POST", r"/runs", self._create_run),
            ("GET", r"/runs/(?P<id>[^/:]+)", self._get_run),
            ("POST", r"/runs/(?P<id>[^/:]+):terminate", self._terminate),
        ]
        for method, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if m and method == req.method:
                with self._lock:
                    return fn(req, **m.groupdict())
        return 404, _error(404, f"no route for {req.method} {req.path}")

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    def _healthz(self, req):
        return 200, {"commit_sha": "kfp-standin", "tag_name": self.version, "multi_user": self.multi_user}

    def _package(self, req) -> tuple[bytes, dict] | None:
        ctype = req.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return None
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + req.body)
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") == "uploadfile":
                data = part.get_payload(decode=True)
                import yaml
                docs = [d for d in yaml.safe_load_all(data) if d]
                return data, docs[0]
        return None

    def _upload(self, req):
        pkg = self._package(req)
        if pkg is None:
            return 400, _error(400, "multipart field uploadfile is required")
        name = req.query.get("name") or req.query.get("display_name") or pkg[1]["pipelineInfo"]["name"]
        namespace = req.query.get("namespace", "")
        if any(p["display_name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            return 409, _error(409, f"Already exist error: pipeline {name!r} in namespace {namespace!r}")
        pid = self._id("pipeline")
        self.pipelines[pid] = {"pipeline_id": pid, "display_name": name, "name": name,
                               "description": req.query.get("description", ""), "namespace": namespace,
                               "created_at": _now()}
        self._add_version(pid, name, pkg)
        return 200, self.pipelines[pid]

    def _upload_version(self, req):
        pkg = self._package(req)
        pid = req.query.get("pipelineid", "")
        if pkg is None or pid not in self.pipelines:
            return 400 if pkg is None else 404, _error(400 if pkg is None else 404,
                                                       "uploadfile and an existing pipelineid are required")
        name = req.query.get("name") or req.query.get("display_name") or ""
        if any(v["pipeline_id"] == pid and v["display_name"] == name for v in self.versions.values()):
            return 409, _error(409, f"Already exist error: version {name!r}")
        return 200, _public(self._add_version(pid, name, pkg))

    def _add_version(self, pid, name, pkg) -> dict:
        vid = self._id("version")
        self.versions[vid] = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name,
                              "name": name, "created_at": _now(), "package": pkg[0], "spec": pkg[1]}
        return self.versions[vid]

    def _list_pipelines(self, req):
        found = [p for p in self.pipelines.values()
                 if p["namespace"] == req.query.get("namespace", "") and _matches(p, req.query.get("filter"))]
        return 200, ({"pipelines": found, "total_size": len(found)} if found else {})

    def _pipeline_by_name(self, req, name):
        name = urllib.parse.unquote(name)
        for p in self.pipelines.values():
            if p["display_name"] == name and p["namespace"] == req.query.get("namespace", ""):
                return 200, p
        return 404, _error(404, f"pipeline {name!r} not found")

    def _get_pipeline(self, req, id):
        return (200, self.pipelines[id]) if id in self.pipelines else (404, _error(404, f"pipeline {id} not found"))

    def _create_experiment(self, req):
        body = req.json or {}
        namespace = body.get("namespace") or ""
        if self.multi_user and not namespace:
            return 400, _error(400, "Invalid input error: in multi-user mode an experiment needs a namespace")
        eid = self._id("experiment")
        self.experiments[eid] = {"experiment_id": eid, "display_name": body.get("display_name", ""),
                                 "description": body.get("description") or "", "namespace": namespace,
                                 "created_at": _now(), "storage_state": "AVAILABLE"}
        return 200, self.experiments[eid]

    def _list_experiments(self, req):
        namespace = req.query.get("namespace", "")
        if self.multi_user and not namespace:
            return 400, _error(400, "Invalid input error: in multi-user mode list experiments by namespace")
        found = [e for e in self.experiments.values()
                 if e["namespace"] == namespace and _matches(e, req.query.get("filter"))]
        return 200, ({"experiments": found, "total_size": len(found)} if found else {})

    def _get_experiment(self, req, id):
        return ((200, self.experiments[id]) if id in self.experiments
                else (404, _error(404, f"experiment {id} not found")))

    def _create_run(self, req):
        body = req.json or {}
        ref = body.get("pipeline_version_reference") or {}
        version = self.versions.get(ref.get("pipeline_version_id", ""))
        if body.get("experiment_id") not in self.experiments or version is None:
            return 400, _error(400, "an existing experiment_id and pipeline_version_reference are required")
        rid = self._id("run")
        doc = {"run_id": rid, "display_name": body.get("display_name", ""),
               "experiment_id": body["experiment_id"], "pipeline_version_reference": ref,
               "runtime_config": body.get("runtime_config") or {}, "service_account": body.get("service_account", ""),
               "state": "PENDING", "created_at": _now(),
               "state_history": [{"update_time": _now(), "state": "PENDING"}]}
        run = self.runs[rid] = _Run(doc)
        if self.execute:
            self._launch(run, version)
        self._set_state(run, "RUNNING")
        return 200, doc

    def _get_run(self, req, id):
        return (200, self.runs[id].doc) if id in self.runs else (404, _error(404, f"run {id} not found"))

    def _terminate(self, req, id):
        run = self.runs.get(id)
        if run is None:
            return 404, _error(404, f"run {id} not found")
        if run.doc["state"] in FINAL:
            return 400, _error(400, f"run {id} already {run.doc['state']}")
        run.terminated = True
        if run.proc and run.proc.poll() is None:
            self._set_state(run, "CANCELING")
            _kill(run.proc)          # the watcher thread sets CANCELED
        else:
            self._set_state(run, "CANCELED")
        return 200, {}

    # ---- running the package -------------------------------------------------------------

    def _launch(self, run: _Run, version: dict) -> None:
        rid = run.doc["run_id"]
        d = self.workdir / rid
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        (d / "pipeline.yaml").write_bytes(version["package"])
        (d / "arguments.json").write_text(json.dumps(run.doc["runtime_config"].get("parameters") or {}))
        run.log = d / "run.log"
        env = {**os.environ, **self.env, "TMPDIR": str(d / "tmp")}
        with open(run.log, "wb") as log:
            run.proc = subprocess.Popen(
                [sys.executable, "-m", "devkit.kfp_standin", "execute", "--package", str(d / "pipeline.yaml"),
                 "--arguments", str(d / "arguments.json"), "--root", str(d / "root")],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        threading.Thread(target=self._follow, args=(run,), name=f"kfp-standin-{rid}", daemon=True).start()

    def _follow(self, run: _Run) -> None:
        rc = run.proc.wait()
        with self._lock:
            if run.terminated:
                self._set_state(run, "CANCELED")
            elif rc == 0:
                self._set_state(run, "SUCCEEDED")
            else:
                tail = self.run_log(run.doc["run_id"]).strip().splitlines()[-3:]
                self._set_state(run, "FAILED", " | ".join(tail) or f"exit code {rc}")

    def _set_state(self, run: _Run, state: str, error: str = "") -> None:
        run.doc["state"] = state
        run.doc["state_history"].append({"update_time": _now(), "state": state})
        if state in FINAL:
            run.doc["finished_at"] = _now()
            if error:
                run.doc["error"] = {"code": 2, "message": error}
            run.done.set()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _public(version: dict) -> dict:
    return {k: v for k, v in version.items() if k not in ("package", "spec")}


def _error(status: int, message: str) -> dict:
    # grpc-gateway's error body, as the real API server sends it
    return {"error": message, "code": status, "message": message, "details": []}


def _matches(doc: dict, raw_filter: str | None) -> bool:
    if not raw_filter:
        return True
    for pred in json.loads(raw_filter).get("predicates", []):
        if pred.get("operation") not in ("EQUALS", 1):
            raise ValueError(f"the stand-in supports only EQUALS filters, not {pred}")
        want = pred.get("stringValue", pred.get("string_value"))
        if doc.get(pred.get("key")) != want:
            return False
    return True


def _handler(standin: KfpStandin):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _serve(self):
            parsed = urllib.parse.urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            req = Request(self.command, parsed.path, dict(urllib.parse.parse_qsl(parsed.query)),
                          {k.lower(): v for k, v in self.headers.items()}, body)
            standin.requests.append(req)
            try:
                status, doc = standin.handle(req)
            except Exception as e:   # a bug in the stand-in must show as a 500, not a hang
                status, doc = 500, _error(500, f"{type(e).__name__}: {e}")
            req.status = status
            data = json.dumps(doc).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass     # the client gave up (its timeout)

        do_GET = do_POST = do_DELETE = _serve

    return Handler


# ---- the child that executes a package ------------------------------------------------


def execute(package: str, arguments: dict, root: str) -> None:
    """Run a compiled pipeline package with kfp.local in this process; raises if it fails."""
    import warnings

    from kfp import components, local

    pipeline = components.load_component_from_file(package)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    with warnings.catch_warnings():
        # the package names the cluster's image; here the tasks run in this venv
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        pipeline(**arguments)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devkit.kfp_standin")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("execute", help="run a pipeline package with kfp.local (the stand-in's child)")
    ex.add_argument("--package", required=True)
    ex.add_argument("--arguments", required=True, help="a JSON file of pipeline arguments")
    ex.add_argument("--root", required=True, help="pipeline_root for the task outputs")
    srv = sub.add_parser("serve", help="serve the stand-in until interrupted")
    srv.add_argument("--token")
    srv.add_argument("--multi-user", action="store_true")
    srv.add_argument("--execute-in", metavar="DIR", help="execute submitted runs, outputs under DIR")
    args = ap.parse_args(argv)
    if args.cmd == "execute":
        execute(args.package, json.loads(Path(args.arguments).read_text()), args.root)
        return 0
    standin = KfpStandin(token=args.token, multi_user=args.multi_user, execute=bool(args.execute_in),
                         workdir=args.execute_in).start()
    print(f"KFP stand-in at {standin.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
