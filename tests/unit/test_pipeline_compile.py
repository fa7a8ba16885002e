"""The compiled pipeline (KFP IR YAML) and the submit side of the runners, no server needed.

The saved YAML in tests/fixtures is compared without the embedded component source and
the SDK version, so it pins the graph, interfaces, images and resources. Regenerate it
after an intended change with:  CT_UPDATE_FIXTURES=1 .venv/bin/pytest tests/unit/test_pipeline_compile.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from core.config import Settings
from pipelines.compile import compile_pipeline
from pipelines.pipeline import default_image
from steps.layout import STEPS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(path) -> dict:
    """The pipeline spec: the first document (a second one holds kfp-kubernetes settings)."""
    return next(yaml.safe_load_all(Path(path).read_text()))


def dags(doc: dict) -> dict:
    """component name -> its DAG tasks, root included as 'root'."""
    out = {"root": doc["root"]["dag"]["tasks"]}
    for name, comp in doc["components"].items():
        if "dag" in comp:
            out[name] = comp["dag"]["tasks"]
    return out


def where(doc: dict, task: str) -> str:
    found = [name for name, tasks in dags(doc).items() if task in tasks]
    assert len(found) == 1, (task, found)
    return found[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    return load(compile_pipeline(tmp_path_factory.mktemp("c") / "p.yaml"))


@pytest.fixture(scope="module")
def compiled_sweep(tmp_path_factory) -> dict:
    return load(compile_pipeline(tmp_path_factory.mktemp("c") / "s.yaml", sweep=True, parallelism=3))


def test_seven_steps_in_order(compiled):
    tasks = {t for ts in dags(compiled).values() for t in ts}
    assert set(STEPS) <= tasks
    body = dags(compiled)["comp-exit-handler-1"]
    deps = {t: set(body[t].get("dependentTasks", [])) for t in body}
    assert deps["ingest"] == set()
    assert deps["validate"] == {"ingest"}
    branches = next(t for t in body if t.startswith("condition-branches-"))
    assert deps[branches] == {"validate"}         # trains (or reuses) on the validated copy
    assert deps["embed"] == {branches, "validate"}
    assert deps["index"] == {"embed"}
    assert deps["evaluate"] == {"index", "embed", branches, "validate"}


def test_mode_refresh_skips_training_by_a_condition(compiled):
    """One definition for every mode: train runs unless mode == 'refresh', which reuses
    production's weights; embed and evaluate take whichever model was staged (dsl.OneOf)."""
    train_group, reuse_group = where(compiled, "train"), where(compiled, "reuse-production")
    assert where(compiled, "stage-model") == train_group
    branches = dags(compiled)["comp-condition-branches-2"]
    conditions = {t["componentRef"]["name"]: t["triggerPolicy"]["condition"] for t in branches.values()}
    refresh = "inputs.parameter_values['pipelinechannel--mode'] == 'refresh'"
    assert conditions == {reuse_group: refresh, train_group: f"!({refresh})"}
    selectors = compiled["components"]["comp-condition-branches-2"]["dag"]["outputs"]["parameters"]
    (oneof,) = selectors.values()
    assert {s["outputParameterKey"] for s in oneof["valueFromOneof"]["parameterSelectors"]} == {
        "pipelinechannel--reuse-production-Output", "pipelinechannel--stage-model-Output"}
    body = dags(compiled)["comp-exit-handler-1"]
    for step in ("embed", "evaluate"):
        assert body[step]["inputs"]["parameters"]["model_uri"]["taskOutputParameter"][
            "producerTask"] == "condition-branches-2"


def test_deploy_only_under_the_decision(compiled):
    group = where(compiled, "deploy")
    assert group.startswith("comp-condition-")
    body = dags(compiled)["comp-exit-handler-1"]
    cond_task = group.removeprefix("comp-")
    assert "deploy" not in body and cond_task in body
    condition = body[cond_task]["triggerPolicy"]["condition"]
    assert condition == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == 'deploy'"
    assert body[cond_task]["dependentTasks"] == ["evaluate"]


def test_exit_handler_runs_finalize_with_the_final_status(compiled):
    root = dags(compiled)["root"]
    assert set(root) == {"exit-handler-1", "finalize"}
    fin = root["finalize"]
    assert fin["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert fin["dependentTasks"] == ["exit-handler-1"]
    assert fin["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert where(compiled, "ingest") == "comp-exit-handler-1"


def test_interface_and_outputs(compiled):
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in params.items()} == {
        "run_id": "STRING", "store": "STRING", "model_name": "STRING", "data_uris": "LIST",
        "eval_uri": "STRING", "params": "STRUCT", "mode": "STRING", "floor": "NUMBER_DOUBLE",
        "tolerance": "NUMBER_DOUBLE", "keep_versions": "NUMBER_INTEGER", "requested_by": "STRING", "require_approval": "BOOLEAN"}
    assert not params["run_id"].get("isOptional") and not params["store"].get("isOptional")
    ev = compiled["components"]["comp-evaluate"]["outputDefinitions"]
    assert ev["artifacts"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert ev["artifacts"]["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert ev["parameters"] == {"Output": {"parameterType": "STRING"}}  # the decision
    assert compiled["components"]["comp-train"]["outputDefinitions"]["artifacts"]["model"][
        "artifactType"]["schemaTitle"] == "system.Model"


def test_no_pip_and_no_cache(compiled):
    for name, ex in compiled["deploymentSpec"]["executors"].items():
        command = " ".join(ex["container"]["command"])
        assert "pip install" not in command, name
        assert ex["container"]["image"] == (os.environ.get("CT_IMAGE") or default_image())
    for tasks in dags(compiled).values():
        for name, t in tasks.items():
            assert not t.get("cachingOptions", {}).get("enableCache"), name


def test_default_resources_give_train_the_most(compiled):
    res = {name.removeprefix("exec-"): ex["container"].get("resources", {})
           for name, ex in compiled["deploymentSpec"]["executors"].items()}
    assert res["train"]["resourceCpuRequest"] == "4" and res["train"]["resourceMemoryLimit"] == "8Gi"
    assert res["validate"]["resourceCpuRequest"] == "500m"
    assert all(r["resourceMemoryLimit"] for r in res.values())


def test_resources_from_a_config_file(tmp_path):
    cfg = tmp_path / "resources.yaml"
    cfg.write_text(yaml.safe_dump({
        "default": {"env": {"S3_ENDPOINT_URL": "http://minio.kubeflow:9000"},
                    "secret_env": {"s3-creds": {"accesskey": "AWS_ACCESS_KEY_ID"}}},
        "train": {"cpu": "8", "memory": "16Gi", "gpu": 2, "gpu_type": "nvidia.com/gpu",
                  "node_selector": {"pool": "gpu"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  "pvc": {"name": "ctbot-cache", "mount_path": "/cache"}},
        "image": "registry.local/ctbot:v9",
    }))
    # kfp-kubernetes settings go in a second YAML document of the same file
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", resources=cfg).read_text()))
    assert len(docs) == 2
    doc = docs[0]
    train = doc["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.local/ctbot:v9"
    acc = train["resources"]["accelerator"]
    assert (acc["resourceCount"], acc["resourceType"]) == ("2", "nvidia.com/gpu")
    assert train["resources"]["resourceCpuRequest"] == "8"
    assert train["resources"]["resourceMemoryLimit"] == "16Gi"
    # defaults survive for steps the file does not mention
    assert doc["deploymentSpec"]["executors"]["exec-embed"]["container"]["resources"]["resourceCpuRequest"] == "2"
    assert {"name": "S3_ENDPOINT_URL", "value": "http://minio.kubeflow:9000"} in train["env"]
    doc_platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    k8s = doc_platform["exec-train"]
    assert k8s["nodeSelector"] == {"labels": {"pool": "gpu"}}
    assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert k8s["pvcMount"][0]["mountPath"] == "/cache"
    assert k8s["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "ctbot-cache"
    assert doc_platform["exec-ingest"]["secretAsEnv"][0]["keyToEnv"] == [
        {"secretKey": "accesskey", "envVar": "AWS_ACCESS_KEY_ID"}]
    assert "nodeSelector" not in doc_platform["exec-ingest"]


def test_bad_resources_config_names_the_problem(tmp_path):
    from pipelines.resources import ResourceConfigError, load_resources

    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"trian": {"gpu": 1}}))
    with pytest.raises(ResourceConfigError, match="trian"):
        load_resources(bad)
    bad.write_text(json.dumps({"train": {"gpus": 1}}))
    with pytest.raises(ResourceConfigError, match="gpus"):
        load_resources(bad)


def test_sweep_pipeline_fans_out_over_the_parameter(compiled_sweep):
    body = dags(compiled_sweep)[where(compiled_sweep, "select-best")]   # the train branch
    loop = next(t for t in body if t.startswith("for-loop-"))
    assert body[loop]["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--sweep"}
    assert body[loop]["iteratorPolicy"] == {"parallelismLimit": 3}
    assert "train-trial" in dags(compiled_sweep)[f"comp-{loop}"]
    assert loop in body["select-best"]["dependentTasks"]
    assert "select-best" in body["stage-model"]["dependentTasks"]
    sel = compiled_sweep["components"]["comp-select-best"]["inputDefinitions"]
    assert sel["artifacts"]["models"]["isArtifactList"] is True
    assert where(compiled_sweep, "deploy").startswith("comp-condition-")
    assert compiled_sweep["root"]["inputDefinitions"]["parameters"]["sweep"]["parameterType"] == "LIST"


def _normalised(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    doc.pop("sdkVersion", None)
    for ex in doc["deploymentSpec"]["executors"].values():
        ex["container"].pop("command", None)  # the embedded component source
        ex["container"].pop("image", None)    # $CT_IMAGE
    return doc


def test_default_image_is_the_trainer_of_this_release():
    from ctbot import __version__
    assert default_image() == f"ghcr.io/ctbot/ctbot-trainer:{__version__}"


def test_matches_saved_yaml(compiled, tmp_path):
    saved = FIXTURES / "ct_pipeline.yaml"
    if os.environ.get("CT_UPDATE_FIXTURES"):
        FIXTURES.mkdir(exist_ok=True)
        compile_pipeline(saved)
    assert _normalised(compiled) == _normalised(load(saved))


# ------------------------------------------------------------------ submit side


def test_kfp_runner_builds_the_request_without_a_server():
    from pipelines.kfp_runner import KfpRunner

    s = Settings(runner="kfp", kfp_host="http://kfp.example:8888/", store="s3://bkt/ct",
                 kfp_experiment="ctbot-test", deploy_floor=0.9, keep_versions=3)
    runner = KfpRunner(s, store=None)
    req = runner.request("r-1", [], {"epochs": 2}, "", requested_by="U1")
    assert req["pipeline_name"] == "ctbot-mnist-arcface" and req["sweep"] is False
    assert req["experiment"] == "ctbot-test" and req["job_name"] == "r-1" and req["version_name"] == "r-1"
    assert req["arguments"] == {
        "run_id": "r-1", "store": "s3://bkt/ct", "model_name": "mnist-arcface",
        "data_uris": ["s3://bkt/ct/data/"], "eval_uri": "s3://bkt/ct/eval/eval.npz",
        "params": {"epochs": 2}, "mode": "full", "floor": 0.9, "tolerance": 0.002, "keep_versions": 3,
        "requested_by": "U1", "require_approval": False}
    assert runner.run_url("abc") == "http://kfp.example:8888/#/runs/details/abc"

    swept = runner.request("r-2", ["s3://bkt/x.npz"], {}, "s3://bkt/e.npz",
                           sweep=[{"lr": 0.002}, {"lr": 0.004, "epochs": 3}])
    assert swept["pipeline_name"] == "ctbot-mnist-arcface-sweep"
    assert swept["arguments"]["sweep"] == [{"trial": 0, "params": {"lr": 0.002}},
                                           {"trial": 1, "params": {"lr": 0.004, "epochs": 3}}]
    # the sweep pipeline accepts exactly these arguments
    from pipelines.pipeline import ct_sweep_pipeline
    assert set(swept["arguments"]) == set(ct_sweep_pipeline.component_spec.inputs)


def test_kfp_runner_refuses_what_a_cluster_cannot_reach():
    from pipelines.kfp_runner import KfpRunner

    with pytest.raises(ValueError, match="CT_KFP_HOST"):
        KfpRunner(Settings(runner="kfp"), store=None)
    with pytest.raises(ValueError, match="s3://"):
        KfpRunner(Settings(runner="kfp", kfp_host="http://k", store="/tmp/x"), store=None).request("r", [], {}, "")


def test_local_runner_command_is_a_valid_cli_call(tmp_path):
    from ctbot.cli import build_parser
    from ctbot.wiring import build_runner, build_store
    from pipelines.local_runner import LocalRunner

    s = Settings(store=str(tmp_path / "store"), run_workdir=str(tmp_path / "runs"), deploy_floor=0.8)
    runner = build_runner(s, build_store(s))
    assert isinstance(runner, LocalRunner)
    cmd = runner.command("r-9", ["s3://b/data/"], {"epochs": 2, "lr": 0.01}, "s3://b/eval.npz",
                         sweep=[{"trial": 0, "params": {"lr": 0.1}}], requested_by="U7")
    assert cmd[1:3] == ["-m", "ctbot.cli"]
    args = build_parser("pipeline").parse_args(cmd[3:])
    assert (args.runner, args.run_id, args.model) == ("local", "r-9", "mnist-arcface")
    assert args.store == str((tmp_path / "store").resolve())
    assert args.data == ["s3://b/data/"] and args.eval_data == "s3://b/eval.npz"
    assert args.overrides == ["epochs=2", "lr=0.01"] and args.floor == 0.8
    assert json.loads(args.sweep) == [{"trial": 0, "params": {"lr": 0.1}}]
    assert args.requested_by == "U7" and args.verbose


def test_set_and_sweep_are_checked_against_train_params():
    from ctbot.pipeline_cli import UsageError, parse_overrides, parse_sweep

    assert parse_overrides(["epochs=2", "lr=0.003", "device=CPU"]) == {
        "epochs": 2, "lr": 0.003, "device": "cpu"}
    with pytest.raises(UsageError, match="must be an int, got `2.0`"):   # a decimal point is for floats
        parse_overrides(["epochs=2.0"])
    with pytest.raises(UsageError, match="valid: epochs, batch_size"):
        parse_overrides(["epoch=2"])
    with pytest.raises(UsageError, match="valid keys: preset, epochs"):
        parse_overrides(["epochs"])
    with pytest.raises(UsageError, match="out of range"):
        parse_overrides(["epochs=0"])
    assert parse_sweep('[{"lr": 0.1}, {"epochs": 3}]', {"epochs": 1}) == [
        {"trial": 0, "params": {"lr": 0.1}}, {"trial": 1, "params": {"epochs": 3}}]
    with pytest.raises(UsageError, match="trial 1"):
        parse_sweep('[{"lr": 0.1}, {"nope": 3}]', {})
    with pytest.raises(UsageError, match="sweep"):
        parse_sweep('{"lr": 0.1}', {})


def test_cli_rejects_bad_params_with_exit_code_2(capsys):
    from ctbot.cli import main

    assert main(["pipeline", "run", "--set", "epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown training parameter(s): epochz" in err and "batch_size" in err


# ------------------------------------------------------------------ report outcome


def test_report_outcome_blames_the_right_step(tmp_path):
    from pipelines.report import finalize_run
    from pipelines.status import StepStatus, mark
    from steps.storage import open_store

    store = open_store(str(tmp_path))
    StepStatus(store, "r", "ingest").done({"n": 10})
    StepStatus(store, "r", "validate").failed("2 corrupt objects: s3://b/data/x.npz")
    rep = finalize_run(store, "r", model="m", pipeline_state="FAILED")
    assert (rep["status"], rep["failed_step"]) == ("failed", "validate")
    assert rep["error"] == "validate: 2 corrupt objects: s3://b/data/x.npz"
    assert rep["model_version"] is None and set(rep["timings"]) == {"ingest", "validate"}
    for step in ("train", "embed", "index", "evaluate", "deploy"):
        assert store.get_json(f"runs/r/steps/{step}.json")["state"] == "skipped"
    assert store.get_json("runs/r/report.json") == rep

    # a process killed mid-step leaves it 'running': the step is blamed and closed
    StepStatus(store, "k", "ingest").done({})
    StepStatus(store, "k", "validate").running()
    rep = finalize_run(store, "k", model="m", pipeline_state="FAILED", pipeline_error="killed")
    assert (rep["failed_step"], rep["error"]) == ("validate", "validate: killed")
    assert store.get_json("runs/k/steps/validate.json")["state"] == "failed"

    # a held run: everything up to evaluate done, deploy marked skipped with the reason
    for step in STEPS[:-2]:
        StepStatus(store, "h", step).done({})
    ev = StepStatus(store, "h", "evaluate")
    ev.done({"top1": 0.9, "decision": "hold", "reason": "top-1 90.00% < floor 97.00%", "production": None})
    rep = finalize_run(store, "h", model="m")
    assert rep["status"] == "succeeded" and rep["failed_step"] is None
    assert (rep["decision"], rep["metrics"]["top1"]) == ("hold", 0.9)
    deploy = store.get_json("runs/h/steps/deploy.json")
    assert deploy["state"] == "skipped" and "floor" in deploy["summary"]["reason"]
    mark(store, "c", "ingest", "running")
    rep = finalize_run(store, "c", model="m", pipeline_state="CANCELED", pipeline_error="canceled by U1")
    assert (rep["status"], rep["error"]) == ("canceled", "canceled by U1")
