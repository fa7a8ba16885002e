"""The KFP v2 pipeline: ingest -> validate -> train -> embed -> index -> evaluate -> deploy.

Components are thin: each calls one function in steps/ and records its status in the
store (pipelines.status). KFP ships only a component function's source, so every import
a component needs is inside its body, and everything a component uses must be installed
in the image (the ctbot image has the project installed).

The run mode (``mode``: full, warm or refresh, steps.reuse) is one condition in the same
definition: refresh skips training and reuses production's weights and gallery.

Two pipeline functions share the components:
  ct_pipeline        one training config
  ct_sweep_pipeline  a ParallelFor over ``sweep`` configs, select_best picks the model
Both are built by ``build_pipeline``; resources (pipelines.resources) are applied there,
so the compiled YAML carries them while local runs stay free of Kubernetes settings.
"""
# No `from __future__ import annotations`: kfp reads the real annotation objects.
import json
import os
from importlib.metadata import PackageNotFoundError, version

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output, PipelineTaskFinalStatus

from pipelines import resources as res


def default_image() -> str:
    """The trainer image (torch, faiss, the steps) of this very release: the bot's own image
    has no torch, and ``:latest`` would let a cluster run steps of another version."""
    try:
        tag = version("ctbot")
    except PackageNotFoundError:   # a source tree never installed: no release to name
        tag = "dev"
    return f"ghcr.io/ctbot/ctbot-trainer:{tag}"


IMAGE = os.environ.get("CT_IMAGE") or default_image()
PIPELINE_NAME = "ctbot-mnist-arcface"
SWEEP_PIPELINE_NAME = "ctbot-mnist-arcface-sweep"


def component(fn):
    # No pip at run time: the image (or the local venv) already has kfp and ctbot.
    return dsl.component(fn, base_image=IMAGE, install_kfp_package=False)


@component
def ingest(run_id: str, store: str, data_uris: list, eval_uri: str, data: Output[Dataset]):
    import json
    import os

    import botocore.session  # noqa: F401 - imported up front like the rest: the task's start-up, not ingest's compute

    from pipelines.status import track
    from steps import layout
    from steps.ingest import ingest as run_ingest
    from steps.ingest import summary as card_summary
    from steps.storage import open_store

    with track(store, run_id, "ingest") as st:
        target = open_store(store)
        uris = json.loads(data_uris) if isinstance(data_uris, str) else list(data_uris)
        os.makedirs(data.path, exist_ok=True)
        result = run_ingest(uris, data.path, eval_uri=layout.resolve_eval_uri(store, eval_uri),
                            cache=target)  # decoded shards of objects seen before
        card_path = os.path.join(data.path, layout.DATA_CARD_JSON)
        if os.path.exists(card_path):
            with open(card_path) as f:
                target.put_json(layout.data_card_key(run_id), json.load(f))
        st.summary = card_summary(result)
        data.metadata.update({k: v for k, v in st.summary.items() if isinstance(v, (int, float, str))})


@component
def validate(run_id: str, store: str, data: Input[Dataset], validated: Output[Dataset]):
    """Checks a copy: validation may drop leaked rows, and an input artifact is read-only
    on a cluster, so the checked data set is this step's own output."""
    import shutil

    from pipelines.status import track
    from steps.validate import validate as run_validate

    with track(store, run_id, "validate") as st:
        shutil.copytree(data.path, validated.path)
        st.summary = run_validate(validated.path)


@component
def train(run_id: str, store: str, model_name: str, params: dict, data: Input[Dataset],
          model: Output[Model]) -> float:
    import os

    from pipelines.status import track
    from steps.params import TrainParams
    from steps.reuse import train_in_mode

    with track(store, run_id, "train") as st:
        p = TrainParams.from_dict(params)
        st.progress(params=p.to_dict())
        os.makedirs(model.path, exist_ok=True)
        result = train_in_mode(store, model_name, data.path, model.path, p,
                               on_epoch=lambda info: st.progress(**info))
        st.summary = {**result, "params": p.to_dict()}
    val = result.get("val_top1")  # None when val_fraction=0
    model.metadata.update({"val_top1": val, "epochs": result["epochs"]})
    return -1.0 if val is None else float(val)


@component
def train_trial(run_id: str, store: str, model_name: str, params: dict, trial: dict,
                data: Input[Dataset], model: Output[Model]) -> float:
    """One sweep config. Progress goes to steps/train.json too, so the run shows as
    training; select_best writes train's final status."""
    import os

    from pipelines.status import track
    from steps.params import TrainParams
    from steps.reuse import train_in_mode

    index = int(trial["trial"])
    with track(store, run_id, f"train-trial-{index}", mirror="train") as st:
        p = TrainParams.from_dict({**params, **(trial.get("params") or {})})
        st.progress(trial=index, params=p.to_dict())
        os.makedirs(model.path, exist_ok=True)
        result = train_in_mode(store, model_name, data.path, model.path, p,
                               on_epoch=lambda info: st.progress(trial=index, **info))
        st.summary = {**result, "trial": index, "params": p.to_dict()}
    val = result.get("val_top1")  # None when val_fraction=0: the trial cannot win on merit
    model.metadata.update({"val_top1": val, "trial": index})
    return -1.0 if val is None else float(val)


@component
def select_best(run_id: str, store: str, models: Input[list[Model]], scores: list[float],
                best: Output[Model]) -> float:
    """Pick the trial with the highest val_top1 and pass its model on."""
    import shutil

    from pipelines.status import StepStatus
    from steps.results import read_trials
    from steps.storage import open_store

    target = open_store(store)
    i = max(range(len(scores)), key=lambda j: scores[j])
    shutil.copytree(models[i].path, best.path)
    trials = read_trials(target, run_id)
    st = StepStatus(target, run_id, "train")
    starts = [t["started_at"] for t in trials.values() if t.get("started_at")]
    st.started_at = min(starts) if starts else st.started_at
    chosen = trials.get(int(models[i].metadata.get("trial", i)), {}).get("summary", {})
    st.done({**chosen, "best_trial": chosen.get("trial", i), "val_top1": scores[i],
             "trials": [{"trial": k, "val_top1": (t.get("summary") or {}).get("val_top1"),
                         "params": (t.get("summary") or {}).get("params")}
                        for k, t in trials.items()]})
    best.metadata.update(models[i].metadata)
    return float(scores[i])


@component
def reuse_production(run_id: str, store: str, model_name: str) -> str:
    """mode=refresh, instead of training: stage production's weights and gallery as the
    run's model; returns where (the store prefix embed and evaluate read)."""
    from pipelines.status import StepStatus, error_message
    from steps.reuse import stage_production
    from steps.storage import open_store

    target = open_store(store)
    st = StepStatus(target, run_id, "train")
    try:
        staged = stage_production(target, model_name, run_id)
    except Exception as e:
        st.failed(error_message(e))
        raise
    st.summary = {"reason": f"mode=refresh: weights reused from v{staged['version']}",
                  "weights_from": staged["version"], "mode": "refresh"}
    st.record("skipped", finished=True)
    return str(staged["prefix"])


@component
def stage_model(run_id: str, store: str, model: Input[Model]) -> str:
    """full and warm: the trained model into the store, where embed and evaluate read it
    whichever branch of the mode condition ran."""
    from steps.reuse import stage_trained
    from steps.storage import open_store

    return str(stage_trained(open_store(store), run_id, model.path))


@component
def embed(run_id: str, store: str, model_uri: str, data: Input[Dataset],
          embeddings: Output[Dataset]):
    """The gallery and the eval set; for refresh, only the objects production has not
    seen go into the gallery, and production's index is copied beside it to append to."""
    import os
    import tempfile

    from pipelines.status import track
    from steps.embed import embed_for_run
    from steps.storage import open_store

    with track(store, run_id, "embed") as st, tempfile.TemporaryDirectory() as model_dir:
        os.makedirs(embeddings.path, exist_ok=True)
        st.summary = embed_for_run(open_store(store), model_uri, model_dir, data.path,
                                   embeddings.path)


@component
def index(run_id: str, store: str, embeddings: Input[Dataset], index: Output[dsl.Artifact],
          kind: str = "flat"):
    import os

    from pipelines.status import track
    from steps.index import BASE_DIR, build_index

    with track(store, run_id, "index") as st:
        os.makedirs(index.path, exist_ok=True)
        base = os.path.join(embeddings.path, BASE_DIR)
        st.summary = build_index(os.path.join(embeddings.path, "gallery.npz"), index.path, kind=kind,
                                 base_dir=base if os.path.isdir(base) else None)


@component
def evaluate(run_id: str, store: str, model_name: str, floor: float, tolerance: float,
             require_approval: bool, model_uri: str,
             data: Input[Dataset], embeddings: Input[Dataset],
             index: Input[dsl.Artifact], metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics], evaluation: Output[dsl.Artifact]) -> str:
    """Candidate vs floor and vs the production model on the same eval set; returns the
    decision, "deploy" or "hold" ("approve" for a deploy that waits for an approver,
    which the deploy step does not run on). The candidate package is uploaded whatever the
    decision, for 'Promote anyway'. (The decision is the single return value because
    kfp.local cannot resolve a dsl.If on a named output of a multi-output task.)"""
    import os
    import tempfile

    from pipelines.status import track
    from steps import dataset, layout
    from steps.eval_cache import eval_fingerprint
    from steps.evaluate import evaluate_and_upload
    from steps.laps import Laps
    from steps.reuse import fetch_staged, read_lineage
    from steps.storage import open_store

    with track(store, run_id, "evaluate") as st, tempfile.TemporaryDirectory() as model_dir, \
            tempfile.TemporaryDirectory() as scratch:
        lap = Laps()
        fetch_staged(open_store(store), model_uri, model_dir)
        lap("fetch")
        lineage = read_lineage(model_dir)
        reused = ({"version": lineage["weights_from"], "index_dir": model_dir}
                  if lineage.get("mode") == "refresh" else None)
        os.makedirs(evaluation.path, exist_ok=True)
        result = evaluate_and_upload(
            store, model_name, run_id, model_dir=model_dir, index_dir=index.path,
            eval_emb=os.path.join(embeddings.path, "eval.npz"),
            # production's images, only read when its score is neither cached nor reused
            eval_images=lambda: str(dataset.materialize(data.path, "eval", scratch)),
            eval_dir=evaluation.path, data_card=os.path.join(data.path, layout.DATA_CARD_JSON),
            added=os.path.join(embeddings.path, "added.json"), floor=floor, tolerance=tolerance,
            reused=reused, eval_fp=eval_fingerprint(data.path))
        if require_approval and result["decision"] == "deploy":
            result["reason"] = f"{result['reason']}; awaiting approval"
        st.summary = {k: result.get(k) for k in ("top1", "decision", "reason", "production", "production_from",
                                                    "searched")}
        st.summary["timings"] = {**lap.seconds, **result["timings"]}

    production = result.get("production")
    metrics.log_metric("top1", float(result["top1"]))
    metrics.log_metric("floor", float(floor))
    if production:
        metrics.log_metric("production_top1", float(production["top1"]))
        metrics.log_metric("production_version", int(production["version"]))
    for label, acc in sorted((result.get("per_class") or {}).items()):
        if acc is not None:  # None: no eval images of that class
            metrics.log_metric(f"top1_class_{label}", float(acc))
    matrix = [[int(v) for v in row] for row in result["confusion"]]
    confusion.log_confusion_matrix([str(i) for i in range(len(matrix))], matrix)
    return "approve" if require_approval and result["decision"] == "deploy" else str(result["decision"])


@component
def deploy(run_id: str, store: str, model_name: str, keep_versions: int, requested_by: str) -> int:
    """Publishes only if production is still the version evaluate compared against;
    otherwise the run holds (summary "held"), and the report says who moved it. Returns
    the version, 0 when held."""
    from pipelines.status import track
    from steps import deploy as registry
    from steps.crashpoints import pause_point
    from steps.storage import open_store

    with track(store, run_id, "deploy") as st:
        pause_point("before_deploy")
        st.summary = registry.deploy_candidate(open_store(store), model_name, run_id,
                                               by=requested_by or "ctbot", keep=int(keep_versions))
    return int(st.summary.get("version") or 0)


@component
def finalize(run_id: str, store: str, model_name: str, params: dict,
             status: PipelineTaskFinalStatus):
    """Exit task: runs whether the body succeeded or not, and writes report.json."""
    from pipelines.report import finalize_run
    from steps.storage import open_store

    report = finalize_run(open_store(store), run_id, model=model_name, params=params,
                          pipeline_state=status.state, pipeline_error=status.error_message or "")
    # the task log is where a KFP user looks first
    print(f"report: status={report['status']} decision={report['decision']} "  # noqa: T201
          f"failed_step={report['failed_step']}")


def _configure(task, step: str, resources: dict | None):
    # Every task has side effects in the store (status JSONs, registry): never cache.
    task.set_caching_options(False)
    return res.apply(task, step, resources)


def build_pipeline(resources: dict | None = None, *, sweep: bool = False, parallelism: int = 2):
    """Return the pipeline function. ``resources`` is a pipelines.resources config (None
    = no Kubernetes settings, as for kfp.local); ``parallelism`` bounds sweep trials."""
    return _sweep_pipeline(resources, parallelism) if sweep else _single_pipeline(resources)


def _ct_steps(resources, run_id, store, model_name, data_uris, eval_uri, params, mode, floor, tolerance,
              keep_versions, requested_by, require_approval, train_model):
    """The steps every variant runs, in an exit handler that always finalizes the run;
    ``train_model(data)`` adds the training tasks and returns the model artifact."""
    exit_task = _configure(finalize(run_id=run_id, store=store, model_name=model_name,
                                    params=params), "finalize", resources)
    with dsl.ExitHandler(exit_task, name="ctbot-run"):
        ing = _configure(ingest(run_id=run_id, store=store, data_uris=data_uris,
                                eval_uri=eval_uri), "ingest", resources)
        val = _configure(validate(run_id=run_id, store=store, data=ing.outputs["data"]),
                         "validate", resources)
        data = val.outputs["validated"]
        # One definition for every mode: refresh skips training and reuses production's
        # weights; either branch stages the model in the store and returns where.
        with dsl.If(mode == "refresh", name="mode-refresh"):
            reused = _configure(reuse_production(run_id=run_id, store=store,
                                                 model_name=model_name), "reuse", resources)
        with dsl.Else(name="mode-train"):
            staged = _configure(stage_model(run_id=run_id, store=store, model=train_model(data)),
                                "stage_model", resources)
        model_uri = dsl.OneOf(reused.output, staged.output)
        emb = _configure(embed(run_id=run_id, store=store, model_uri=model_uri, data=data),
                         "embed", resources)
        idx = _configure(index(run_id=run_id, store=store,
                               embeddings=emb.outputs["embeddings"]), "index", resources)
        ev = _configure(evaluate(run_id=run_id, store=store, model_name=model_name,
                                 floor=floor, tolerance=tolerance,
                                 require_approval=require_approval, model_uri=model_uri,
                                 data=data, embeddings=emb.outputs["embeddings"],
                                 index=idx.outputs["index"]), "evaluate", resources)
        with dsl.If(ev.outputs["Output"] == "deploy", name="decision-deploy"):
            _configure(deploy(run_id=run_id, store=store, model_name=model_name,
                              keep_versions=keep_versions, requested_by=requested_by),
                       "deploy", resources)


def _single_pipeline(resources):
    """One training run per pipeline run."""
    @dsl.pipeline(name=PIPELINE_NAME,
                  description="MNIST ArcFace + faiss: ingest, validate, train, embed, "
                              "index, evaluate, deploy when better")
    def ct_pipeline(run_id: str, store: str, model_name: str = "mnist-arcface",
                    data_uris: list = [], eval_uri: str = "", params: dict = {},  # noqa: B006 - kfp compiles literal defaults
                    mode: str = "full", floor: float = 0.97, tolerance: float = 0.002,
                    keep_versions: int = 5, requested_by: str = "",
                    require_approval: bool = False):
        def train_model(data):
            t = _configure(train(run_id=run_id, store=store, model_name=model_name,
                                 params=params, data=data), "train", resources)
            return t.outputs["model"]

        _ct_steps(resources, run_id, store, model_name, data_uris, eval_uri, params, mode, floor, tolerance,
                  keep_versions, requested_by, require_approval, train_model)

    return ct_pipeline


def _sweep_pipeline(resources, parallelism: int):
    """Trials fanned out with ParallelFor; the best by val_top1 goes on."""
    @dsl.pipeline(name=SWEEP_PIPELINE_NAME,
                  description="MNIST ArcFace + faiss with a hyper-parameter sweep: the best "
                              "trial by val_top1 goes on to embed, index, evaluate, deploy")
    def ct_sweep_pipeline(run_id: str, store: str, sweep: list, model_name: str = "mnist-arcface",
                          data_uris: list = [], eval_uri: str = "", params: dict = {},  # noqa: B006 - kfp compiles literal defaults
                          mode: str = "full", floor: float = 0.97, tolerance: float = 0.002,
                          keep_versions: int = 5, requested_by: str = "",
                          require_approval: bool = False):
        def train_model(data):
            # sweep comes in as a pipeline parameter: kfp.local mishandles a static list
            # under ExitHandler/If.
            with dsl.ParallelFor(sweep, parallelism=parallelism, name="sweep") as trial:
                t = _configure(train_trial(run_id=run_id, store=store, model_name=model_name,
                                           params=params, trial=trial, data=data), "train", resources)
            best = _configure(select_best(run_id=run_id, store=store,
                                          models=dsl.Collected(t.outputs["model"]),
                                          scores=dsl.Collected(t.outputs["Output"])),
                              "select_best", resources)
            return best.outputs["best"]

        _ct_steps(resources, run_id, store, model_name, data_uris, eval_uri, params, mode, floor, tolerance,
                  keep_versions, requested_by, require_approval, train_model)

    return ct_sweep_pipeline


def build_prep_pipeline():
    """Data preparation alone: the ingest and validate tasks every run starts with, chained
    as in a run (bench/bench_ct.py --prep-only measures it); no report, no training."""
    @dsl.pipeline(name="ctbot-data-prep", description="ingest and validate only")
    def data_prep(run_id: str, store: str, data_uris: list, eval_uri: str):
        ing = _configure(ingest(run_id=run_id, store=store, data_uris=data_uris, eval_uri=eval_uri),
                         "ingest", None)
        _configure(validate(run_id=run_id, store=store, data=ing.outputs["data"]), "validate", None)

    return data_prep


def normalize_sweep(sweep) -> list[dict]:
    """Sweep configs as the pipeline takes them: [{"trial": i, "params": {...}}].
    Accepts a JSON string, a list of param dicts, or the normalised form; param keys
    are checked later, by TrainParams, inside the trial (and earlier by the CLI)."""
    if isinstance(sweep, str):
        sweep = json.loads(sweep) if sweep.strip() else []
    if not sweep:
        return []
    if not isinstance(sweep, list) or not all(isinstance(s, dict) for s in sweep):
        raise ValueError("sweep must be a JSON list of parameter objects, e.g. "
                         '[{"lr": 0.002}, {"lr": 0.004, "epochs": 4}]')
    out = []
    for i, item in enumerate(sweep):
        params = item["params"] if set(item) == {"trial", "params"} else item
        out.append({"trial": i, "params": dict(params)})
    return out


def pipeline_arguments(*, run_id: str, store: str, model_name: str, data_uris: list,
                       eval_uri: str, params: dict, floor: float, tolerance: float,
                       keep_versions: int, requested_by: str, sweep=None,
                       require_approval: bool = False) -> dict:
    """The pipeline's arguments, shared by the local and the KFP runner. The run mode is
    a params key for users and a pipeline parameter for the pipeline's condition."""
    mode = str((params or {}).get("mode") or "full")
    trials = normalize_sweep(sweep)
    if mode == "refresh" and trials:
        raise ValueError("mode=refresh trains nothing, so it cannot sweep: use mode=warm or mode=full")
    args = {"run_id": run_id, "store": store, "model_name": model_name,
            "data_uris": list(data_uris), "eval_uri": eval_uri or "", "params": dict(params or {}),
            "mode": mode,
            "floor": float(floor), "tolerance": float(tolerance),
            "keep_versions": int(keep_versions), "requested_by": requested_by or "",
            "require_approval": bool(require_approval)}
    if trials:
        args["sweep"] = trials
    return args


ct_pipeline = build_pipeline(res.DEFAULT_RESOURCES)
ct_sweep_pipeline = build_pipeline(res.DEFAULT_RESOURCES, sweep=True)
