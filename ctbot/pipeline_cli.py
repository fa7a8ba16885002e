"""``ctbot pipeline``: compile the pipeline, or run it (locally with kfp.local, or on KFP).

    ctbot pipeline compile -o ctbot.yaml [--resources resources.yaml] [--sweep]
    ctbot pipeline run [--runner local|kfp] [--run-id ID] [--store ROOT] [--data URI ...]
                       [--eval-data URI] [--set key=value ...] [--sweep JSON|@file] [--model NAME]

Defaults come from the settings (--config file, then environment): store ./.ctbot/store, data
<store>/data/, eval set <store>/eval/eval.npz. Exit code 0 when the run succeeded (the
model was deployed or held), 1 when a step failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from steps.layout import data_uris_or_default, new_run_id, report_key

HELP = "compile the training pipeline, or run it locally or on Kubeflow"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    sub = ap.add_subparsers(dest="pipeline_command", metavar="{compile,run}", required=True)

    from pipelines import compile as compile_mod
    c = sub.add_parser("compile", help="write the pipeline's KFP IR YAML")
    compile_mod.add_arguments(c)
    c.set_defaults(_handler=compile_mod.run)

    r = sub.add_parser("run", help="run the pipeline once", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--runner", choices=("local", "kfp"), help="default: $CT_RUNNER or local")
    r.add_argument("--host", help="KFP API URL for --runner kfp (default: $CT_KFP_HOST)")
    r.add_argument("--run-id", help="default: r-<UTC date>-<time>-<random>")
    r.add_argument("--store", help="s3://bucket/prefix or a directory (default: $CT_STORE)")
    r.add_argument("--data", nargs="+", metavar="URI", help="data objects or prefixes (default: <store>/data/)")
    r.add_argument("--eval-data", metavar="URI", help="eval set (default: <store>/eval/eval.npz)")
    r.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="training parameter overrides, e.g. --set epochs=2 lr=0.003")
    r.add_argument("--sweep", metavar="JSON|@FILE",
                   help='sweep configs, e.g. \'[{"lr": 0.002}, {"lr": 0.004}]\'; the best by val_top1 goes on')
    r.add_argument("--parallelism", type=int, default=2, help="sweep trials at once")
    r.add_argument("--model", help="model name in the registry (default: $CT_MODEL_NAME)")
    r.add_argument("--requested-by", default="", help="who asked for the run (recorded on deploy)")
    r.add_argument("--floor", type=float, help="minimum top-1 to deploy (default: $CT_DEPLOY_FLOOR)")
    r.add_argument("--tolerance", type=float, help="allowed regression vs production")
    r.add_argument("--keep-versions", type=int, help="published versions kept in the registry")
    r.add_argument("--require-approval", action="store_true",
                   help="a deploy decision waits for an approver instead of publishing")
    r.add_argument("--workdir", help="local scratch dir (default: $CT_RUN_WORKDIR)")
    r.add_argument("--keep-workdir", action="store_true", help="keep task outputs after a successful run")
    r.add_argument("--verbose", action="store_true", help="show kfp's task output instead of logging it")
    r.add_argument("--nice", type=int, default=0, metavar="N",
                   help="run at this OS niceness or lower priority (the bot's local runs use 10)")
    r.add_argument("--resources", help="kfp: per-step resources file (default: $CT_RESOURCES)")
    r.add_argument("--wait", action="store_true", help="kfp: wait for the run to finish")
    r.set_defaults(_handler=run_command)


def run(args: argparse.Namespace) -> int:
    return args._handler(args)


# ------------------------------------------------------------------------- arguments


class UsageError(Exception):
    pass


def parse_overrides(tokens: list[str]) -> dict:
    """--set tokens, through the one key=value parser."""
    from steps.params import TrainParams
    try:
        return TrainParams.parse_tokens(tokens)
    except ValueError as e:
        raise UsageError(f"bad --set: {e}") from None


def parse_sweep(text: str | None, base: dict) -> list[dict]:
    from pipelines.pipeline import normalize_sweep
    from steps.params import TrainParams

    if not text:
        return []
    try:
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        trials = normalize_sweep(json.loads(text))
    except (OSError, ValueError) as e:
        raise UsageError(f"bad --sweep: {e}") from None
    for t in trials:
        try:
            TrainParams.from_dict({**base, **t["params"]})
        except ValueError as e:
            raise UsageError(f"bad --sweep trial {t['trial']}: {e}") from None
    return trials


def settings_from(args):
    from core.config import load_settings

    overrides = {k: v for k, v in {
        "runner": args.runner, "kfp_host": args.host, "store": args.store,
        "model_name": args.model, "deploy_floor": args.floor, "deploy_tolerance": args.tolerance,
        "keep_versions": args.keep_versions, "run_workdir": args.workdir, "resources": args.resources,
    }.items() if v is not None}
    settings = load_settings(getattr(args, "config", None), **overrides)
    if getattr(args, "require_approval", False):
        settings.deploy.require_approval = True
    return settings


# ------------------------------------------------------------------------- output


def describe_step(step: str, doc: dict) -> str:
    state, summary = doc.get("state"), doc.get("summary") or {}
    head = f"  {step:<9} {state:<8}"
    if state == "running":
        if "epoch" in summary and "epochs" in summary:
            trial = f"trial {summary['trial']} " if "trial" in summary else ""
            extra = "".join(f" {k} {summary[k]:.4g}" for k in ("loss", "train_acc")
                            if isinstance(summary.get(k), (int, float)))
            return f"{head} {trial}epoch {summary['epoch']}/{summary['epochs']}{extra}"
        return head.rstrip()
    if state == "failed":
        return f"{head} {doc.get('error')}"
    if state == "skipped":
        return f"{head} {summary.get('reason', '')}".rstrip()
    seconds = doc.get("seconds")
    detail = {
        "train": lambda s: f"val_top1 {s['val_top1']:.4f}" if isinstance(s.get("val_top1"), (int, float)) else "",
        "evaluate": lambda s: (f"top1 {s['top1']:.4f} -> {s.get('decision')}"
                               if isinstance(s.get("top1"), (int, float)) else ""),
        "deploy": lambda s: f"published v{s.get('version')}",
        "validate": lambda s: f"{len(s.get('warnings') or [])} warning(s)",
        "ingest": lambda s: f"{s.get('n')} images, eval set {s.get('eval_n')}",
        "embed": lambda s: f"{(s.get('gallery') or {}).get('n')} gallery, {(s.get('eval') or {}).get('n')} eval",
        "index": lambda s: f"{s.get('kind', '')} {s.get('n', '')}".strip(),
    }.get(step, lambda s: "")(summary)
    took = f"{seconds:6.1f}s" if isinstance(seconds, (int, float)) else ""
    return f"{head} {took} {detail}".rstrip()


def print_report(report: dict, where: str, out=sys.stdout) -> None:
    status = report.get("status")
    if status == "succeeded":
        m = report.get("metrics") or {}
        prod = report.get("production")
        vs = f", production v{prod['version']} {prod['top1']:.4f}" if prod else ", no production model yet"
        print(f"result: succeeded: top-1 {m.get('top1', float('nan')):.4f}{vs}", file=out)
        decision, reason = report.get("decision"), report.get("reason") or ""
        print(f"decision: {reason if reason.startswith(str(decision)) else f'{decision}: {reason}'}",
              file=out)
        if report.get("model_version") is not None:
            print(f"model version: v{report['model_version']} (now production)", file=out)
    else:
        print(f"result: {status} at step {report.get('failed_step')}: {report.get('error')}", file=out)
    if report.get("total_seconds") is not None:
        print(f"total: {report['total_seconds']:.1f}s", file=out)
    print(f"report: {where}", file=out)


# ------------------------------------------------------------------------- run


def run_command(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        params = parse_overrides(args.overrides)
        sweep = parse_sweep(args.sweep, params)
    except (UsageError, ValueError) as e:
        print(f"ctbot pipeline run: error: {e}", file=sys.stderr)
        return 2
    run_id = args.run_id or new_run_id()

    if settings.runner == "kfp":
        return _run_kfp(settings, run_id, args, params, sweep)
    return _run_local(settings, run_id, args, params, sweep)


def _run_local(settings, run_id, args, params, sweep) -> int:
    from ctbot.wiring import build_store
    from pipelines.local_run import run_local

    if args.nice > os.getpriority(os.PRIO_PROCESS, 0):   # kfp.local's task processes inherit it
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    # The bot's job worker ignores SIGCHLD (ctbot.wiring), and a started process keeps that:
    # then no child of this run could be waited for, and subprocess takes a failed task's
    # unknown status for 0. This run waits for its tasks, so it wants the default.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    out = sys.stdout  # kfp's output gets redirected; progress lines must not follow it
    store = build_store(settings)
    data = data_uris_or_default(settings.store, settings.data_prefix, args.data)
    print(f"run {run_id}: local, store {store.root}, data {' '.join(data)}", file=out, flush=True)

    def on_step(step, doc):
        # out.write, not print: kfp.local replaces builtins.print while tasks run
        out.write(describe_step(step, doc) + "\n")
        out.flush()

    started = time.time()
    report = run_local(settings, store, run_id, data, params, args.eval_data or "", sweep=sweep,
                       requested_by=args.requested_by, on_step=on_step, verbose=args.verbose,
                       keep_workdir=args.keep_workdir, parallelism=args.parallelism)
    print_report(report, store.uri(report_key(run_id)), out)
    print(f"wall time: {time.time() - started:.1f}s", file=out, flush=True)
    return 0 if report.get("status") == "succeeded" else 1


def _run_kfp(settings, run_id, args, params, sweep) -> int:
    from ctbot.wiring import build_runner, build_store
    from steps.results import read_report

    store = build_store(settings)
    runner = build_runner(settings, store)
    external_id, url = runner.submit(run_id, args.data or [], params, args.eval_data or "",
                                     sweep=sweep, requested_by=args.requested_by)
    print(f"run {run_id}: submitted to {settings.kfp_host} as {external_id}\n  {url}", flush=True)
    if not args.wait:
        return 0
    while (state := runner.poll(run_id, external_id)) == "running":
        time.sleep(10)
    report = read_report(store, run_id) or {"status": state}
    print_report(report, store.uri(report_key(run_id)))
    return 0 if state == "succeeded" else 1
