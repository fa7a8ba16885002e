"""Every kustomize overlay renders, passes strict schema validation, and every pod it
creates meets Pod Security "restricted"; the objects around the bot are what a cluster
needs (Namespace, PDB, NetworkPolicies, Ingress with TLS, least RBAC, Redis with a
password), and secrets only ever come from Secret references.

Overlays are found, not listed, so new ones (the model server's) are held to the same
rules as soon as they render.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_VERSION = "1.32.0"       # the schemas of the kubectl this repo is rendered with
OVERLAYS = sorted(d.name for d in (K8S / "overlays").iterdir() if (d / "kustomization.yaml").exists())
NAMESPACES = {"dev": "ctbot-dev", "dev-serving": "ctbot-dev", "prod": "ctbot", "prod-monitoring": "ctbot",
              "prod-serving": "ctbot"}
SERVING = {"dev-serving": ("Deployment", "ctbot-serving"),                   # overlay -> the server
           "prod-serving": ("InferenceService", "mnist-arcface")}
BOT_OVERLAYS = sorted(NAMESPACES)
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
ENV_EXAMPLE = K8S / "components" / "example-secrets" / ".env.example"


@cache
def _render(overlay: str) -> tuple:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def render(overlay: str) -> list[dict]:
    return list(_render(overlay))


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str) -> dict:
    [doc] = find(docs, kind, name)
    return doc


def pod_specs(doc: dict) -> list[dict]:
    """The pod specs a workload creates (KServe's predictor is a pod spec too)."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "Pod":
        return [spec]
    if doc["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if doc["kind"] in WORKLOADS:
        return [spec["template"]["spec"]]
    if doc["kind"] == "InferenceService":
        return [p for p in (spec.get("predictor"), spec.get("transformer")) if p]
    return []


def _builtin(doc: dict) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_passes_strict_validation(overlay):
    docs = render(overlay)
    assert docs
    for doc in docs:
        if _builtin(doc):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        else:   # a CRD's kind: no offline schema, so at least its shape
            assert doc["metadata"]["name"] and doc.get("spec"), doc["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(overlay):
    pods = [(d["metadata"]["name"], p) for d in render(overlay) for p in pod_specs(d)]
    assert pods, "an overlay without pods"
    for name, pod in pods:
        psc = pod.get("securityContext") or {}
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in v for v in pod.get("volumes") or []), name
        tmp_volumes = {v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v}
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            sc = c.get("securityContext") or {}
            where = f"{name}/{c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser")) != 0, where
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            assert seccomp == "RuntimeDefault", where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert not sc.get("privileged"), where
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), where
            assert not (sc.get("capabilities") or {}).get("add"), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
            assert mounts.get("/tmp") in tmp_volumes, f"{where}: /tmp must be an emptyDir"


@pytest.mark.parametrize("overlay", BOT_OVERLAYS)
def test_namespace_enforces_restricted_and_holds_everything(overlay):
    docs = render(overlay)
    ns = NAMESPACES[overlay]
    labels = one(docs, "Namespace", ns)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs:
        if d["kind"] in ("Namespace", "RoleBinding") or not _builtin(d) and d["kind"] != "ServiceMonitor":
            continue
        assert d["metadata"].get("namespace") == ns, (d["kind"], d["metadata"]["name"])


@pytest.mark.parametrize("overlay", BOT_OVERLAYS)
def test_bot_probes_token_and_secret_refs(overlay):
    docs = render(overlay)
    bot = one(docs, "Deployment", "ctbot")
    pod = bot["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["serve"]
    assert {e["secretRef"]["name"] for e in c["envFrom"] if "secretRef" in e} == {"ctbot"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    # probes on their own listener; SIGTERM after a preStop delay, within the grace period
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {c[k]["httpGet"]["port"] for k in ("livenessProbe", "readinessProbe", "startupProbe")} == {"probes"}
    assert ports == {"http": 3000, "probes": 3001}
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] >= 5 + 20 + 10
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ctbot", "key": "REDIS_PASSWORD"}
    assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@ctbot-redis:6379/0"
    # the KFP token: projected, audience-bound, where kfp's credentials look for it
    [projected] = [v for v in pod["volumes"] if "projected" in v]
    [source] = projected["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    mount = next(m for m in c["volumeMounts"] if m["name"] == projected["name"])
    assert env["KF_PIPELINES_SA_TOKEN_PATH"]["value"] == f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"
    assert pod["automountServiceAccountToken"] is False      # no Kubernetes API token
    assert one(docs, "ServiceAccount", "ctbot")["automountServiceAccountToken"] is False
    # the pipeline's resources file, mounted where CT_RESOURCES points
    config = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctbot-config"))
    res_cm = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctbot-pipeline-resources"))
    res_volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == res_cm["metadata"]["name"])
    res_mount = next(m for m in c["volumeMounts"] if m["name"] == res_volume["name"])
    assert config["data"]["CT_RESOURCES"] == f"{res_mount['mountPath']}/pipeline-resources.yaml"
    assert "pipeline-resources.yaml" in res_cm["data"]
    assert config["data"]["CT_KFP_UI_URL"].startswith("https://") and config["data"]["CT_KFP_NAMESPACE"]


def test_pipeline_resources_file_is_valid_and_gives_every_step_the_store():
    from pipelines.resources import STEP_NAMES, for_step, load_resources

    cfg = load_resources(K8S / "base" / "pipeline-resources.yaml")
    for step in STEP_NAMES:
        secret = for_step(cfg, step)["secret_env"]["ctbot-s3"]
        assert set(secret.values()) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"}, step


@pytest.mark.parametrize("overlay", BOT_OVERLAYS)
def test_rbac_is_one_rolebinding_in_the_profile_namespace(overlay):
    docs = render(overlay)
    assert not find(docs, "ClusterRoleBinding") and not find(docs, "ClusterRole") and not find(docs, "Role")
    [rb] = find(docs, "RoleBinding")
    config = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctbot-config"))
    assert rb["metadata"]["namespace"] == config["data"]["CT_KFP_NAMESPACE"]
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                             "name": "kubeflow-pipelines-edit"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "ctbot", "namespace": NAMESPACES[overlay]}]


@pytest.mark.parametrize("overlay", BOT_OVERLAYS)
def test_redis_password_probes_pinned_image_headless_service(overlay):
    docs = render(overlay)
    redis = one(docs, "StatefulSet", "ctbot-redis")
    pod = redis["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+[-\w.]*(@sha256:[0-9a-f]{64})?", c["image"]), c["image"]
    # the password reaches Redis in a file written from the Secret, never on a command line
    argv = c["command"] + c.get("args", [])
    assert not [a for a in argv if "$(" in a or a in ("-a", "--requirepass")], argv
    script = argv[-1]
    assert argv[:2] == ["sh", "-c"] and "requirepass" in script and "exec redis-server /etc/ctbot-redis/redis.conf" in script
    assert re.search(r"printf .*\"\$REDISCLI_AUTH\" >> /etc/ctbot-redis/redis.conf", script)   # a builtin: no argv
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/etc/ctbot-redis"]["name"]]["emptyDir"]["medium"] == "Memory"   # never on disk
    # its settings: persistent, and never evicting a lock or a run to make room
    config = one(docs, "ConfigMap", volumes[mounts["/etc/ctbot-redis-base"]["name"]]["configMap"]["name"])
    settings = dict(line.split(None, 1) for line in config["data"]["redis.conf"].splitlines()
                    if line.strip() and not line.startswith("#"))
    assert settings["appendonly"] == "yes" and settings["maxmemory-policy"] == "noeviction"
    assert settings["maxmemory"].endswith("mb") and int(settings["maxmemory"][:-2]) * 2**20 < 256 * 2**20
    assert "requirepass" not in settings
    assert c["resources"]["limits"]["memory"] == "256Mi"
    # the probe authenticates through REDISCLI_AUTH, not -a on its command line
    env = {e["name"]: e for e in c["env"]}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "ctbot", "key": "REDIS_PASSWORD"}
    probe = c["readinessProbe"]["exec"]["command"]
    assert "redis-cli" in probe[-1] and "-a" not in probe[-1].split() and c["livenessProbe"]
    svc = one(docs, "Service", redis["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", BOT_OVERLAYS)
def test_pdb_network_policies_and_ingress(overlay):
    docs = render(overlay)
    bot_labels = one(docs, "Deployment", "ctbot")["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", "ctbot")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= bot_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    deny = policies["ctbot-default-deny"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress", "Egress"]
    assert not deny.get("ingress") and not deny.get("egress")
    redis = policies["ctbot-redis-from-ctbot"]
    assert redis["podSelector"]["matchLabels"] == {"app": "ctbot-redis"}
    assert [f["podSelector"]["matchLabels"] for r in redis["ingress"] for f in r["from"]] == [{"app": "ctbot"}]
    bot = policies["ctbot-from-ingress"]
    assert [f["namespaceSelector"]["matchLabels"] for r in bot["ingress"] for f in r["from"]] == [
        {"kubernetes.io/metadata.name": "ingress-nginx"}]

    ing = one(docs, "Ingress", "ctbot")
    [tls] = ing["spec"]["tls"]
    [rule] = ing["spec"]["rules"]
    assert tls["secretName"] and rule["host"] in tls["hosts"]
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/slack/events", "Exact")]


def egress_of(docs, labels: dict) -> list[tuple[dict, set]]:
    """(peer, {(protocol, port)}) for every egress rule of every policy selecting ``labels``."""
    out = []
    for p in find(docs, "NetworkPolicy"):
        spec = p["spec"]
        if "Egress" in spec["policyTypes"] and spec["podSelector"].get("matchLabels", {}).items() <= labels.items():
            for rule in spec.get("egress") or []:
                ports = {(pt["protocol"], pt["port"]) for pt in rule.get("ports") or []}
                out += [(peer, ports) for peer in rule.get("to") or []]
    return out


def reaches(egress, ports: set, **peer) -> bool:
    """Some rule lets the pod reach ``ports`` on a peer matching ``peer`` (selector or ipBlock)."""
    def match(p):
        if "ip" in peer:
            return "ipBlock" in p and p["ipBlock"]["cidr"] == "0.0.0.0/0"
        if "namespace" in peer:
            ns = p.get("namespaceSelector", {}).get("matchLabels", {})
            return ns.get("kubernetes.io/metadata.name") == peer["namespace"] and (
                "pod" not in peer or p.get("podSelector", {}).get("matchLabels") == peer["pod"])
        return "namespaceSelector" not in p and p.get("podSelector", {}).get("matchLabels") == peer["pod"]
    return any(match(p) and ports <= got for p, got in egress)


@pytest.mark.parametrize("overlay", BOT_OVERLAYS)
def test_egress_is_denied_but_for_what_each_pod_needs(overlay):
    docs = render(overlay)
    dns = {("UDP", 53), ("TCP", 53)}
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOADS]
    for labels in pods:
        assert reaches(egress_of(docs, labels), dns, namespace="kube-system", pod={"k8s-app": "kube-dns"}), labels
    bot = egress_of(docs, {"app": "ctbot"})
    assert reaches(bot, {("TCP", 6379)}, pod={"app": "ctbot-redis"})
    config = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctbot-config"))
    kfp = re.fullmatch(r"https?://[\w-]+\.([\w-]+):(\d+)", config["data"]["CT_KFP_HOST"])
    assert reaches(bot, {("TCP", int(kfp[2]))}, namespace=kfp[1])        # the KFP API server
    assert reaches(bot, {("TCP", 443)}, ip=True)                        # Slack's Web API, S3
    redis = egress_of(docs, {"app": "ctbot-redis"})
    assert not [p for p, _ in redis if "ipBlock" in p]                  # Redis calls out nowhere


def test_prometheus_rule_holds_the_documented_alerts():
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Suggested alerts"):]
    block = section[section.index("```yaml") + len("```yaml"):]
    documented = yaml.safe_load(block[:block.index("```")])["groups"][0]["rules"]
    [rule] = find(render("prod-monitoring"), "PrometheusRule")
    assert rule["metadata"]["namespace"] == "ctbot"
    shipped = rule["spec"]["groups"][0]["rules"]
    assert [(r["alert"], " ".join(r["expr"].split()), r.get("for")) for r in shipped] == [
        (r["alert"], " ".join(r["expr"].split()), r.get("for")) for r in documented]
    assert all(r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"] for r in shipped)


def test_our_images_are_tagged_with_the_package_version():
    import tomllib
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for overlay in OVERLAYS:
        docs = render(overlay)
        for d in docs:
            for pod in pod_specs(d):
                for c in pod["containers"]:
                    name, _, tag = c["image"].rpartition(":")
                    if name.rsplit("/", 1)[-1] in ("ctbot", "ctbot-trainer"):
                        assert tag == version, (overlay, c["image"])
        config = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctbot-config"))
        assert config["data"]["CT_IMAGE"].endswith(f"/ctbot-trainer:{version}"), overlay


def env_example() -> dict:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k: v for k, v in pairs}


def test_example_secret_comes_from_the_committed_env_example_with_no_real_values():
    assert (ROOT / ".env.example").resolve() == ENV_EXAMPLE.resolve()
    example = env_example()
    assert all(v in ("", "change-me") for v in example.values()), example
    secret = one(render("dev"), "Secret", "ctbot")
    assert set(secret["data"]) == set(example)
    assert not find(render("prod"), "Secret")    # prod never overwrites the real one
    # every key the workloads take from the Secret is in the example
    for overlay in BOT_OVERLAYS:
        for d in render(overlay):
            for pod in pod_specs(d):
                for c in pod["containers"]:
                    for e in c.get("env") or []:
                        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                        if ref and ref["name"] == "ctbot":
                            assert ref["key"] in example


def test_no_secret_values_in_config():
    for f in [*K8S.rglob("*.yaml"), ENV_EXAMPLE]:
        text = f.read_text()
        for word in ("xoxb-", "xapp-", "SLACK_SIGNING_SECRET=", "AWS_SECRET_ACCESS_KEY="):
            if f == ENV_EXAMPLE and word.endswith("="):
                assert f"{word}\n" in text, f"{f}: {word} must be empty"
                continue
            assert word not in text, f"{f} holds a secret-looking value {word!r}"


def test_prod_runs_two_replicas_and_the_trainer_image():
    docs = render("prod")
    assert one(docs, "Deployment", "ctbot")["spec"]["replicas"] == 2
    config = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctbot-config"))
    assert config["data"]["CT_IMAGE"] == "registry.example.com/ml/ctbot-trainer:0.1.0"


def test_monitoring_overlay_scrapes_the_bot():
    docs = render("prod-monitoring")
    [sm] = find(docs, "ServiceMonitor")
    svc = one(docs, "Service", "ctbot")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("http", "/metrics")]
    assert "ctbot-from-prometheus" in {p["metadata"]["name"] for p in find(docs, "NetworkPolicy")}


def test_cluster_guide_names_every_object():
    guide = (ROOT / "docs" / "cluster.md").read_text()   # the README links to it
    for overlay in BOT_OVERLAYS:
        for d in render(overlay):
            name = d["metadata"]["name"]
            if d["kind"] == "ConfigMap":
                name = name.rsplit("-", 1)[0]      # the generator's hash suffix
            assert f"`{name}`" in guide and d["kind"] in guide, (overlay, d["kind"], name)


@pytest.mark.parametrize("overlay", sorted(SERVING))
def test_serving_overlays_render_the_model_server(overlay):
    docs = render(overlay)
    kind, name = SERVING[overlay]
    workload = one(docs, kind, name)
    assert workload["metadata"]["namespace"] == NAMESPACES[overlay]     # the bot's, with its Secret
    [pod] = pod_specs(workload)
    container = pod["containers"][0]
    if kind == "InferenceService":
        assert container["name"] == "kserve-container"   # KServe's name for a custom predictor
        assert container["image"].startswith("registry.example.com/ml/ctbot-trainer:")   # torch + faiss
    else:
        assert container["image"].startswith("ctbot-trainer:")      # what ./dev.sh images builds
    assert container["args"][:1] == ["serve-model"] and "0.0.0.0" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live" and startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # only the store's credentials from the bot's Secret; the config under its hashed name
    keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"}
    assert not [e for e in container["envFrom"] if "secretRef" in e]
    [config] = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctbot-serving-config")]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["CT_MODEL_NAME"] == "mnist-arcface"


@pytest.mark.parametrize("overlay", sorted(SERVING))
def test_model_server_answers_only_its_namespace_and_the_serving_system(overlay):
    docs = render(overlay)
    policy = one(docs, "NetworkPolicy", "ctbot-serving-ingress")["spec"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    peers = rule["from"]
    assert {"podSelector": {}} in peers                      # any pod of this namespace (the bot's)
    namespaces = [p["namespaceSelector"] for p in peers if "namespaceSelector" in p]
    assert namespaces == [{"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                                 "values": ["kserve", "knative-serving"]}]}]
    assert not [p for p in peers if p.get("namespaceSelector") == {}]     # not every namespace
    server = policy["podSelector"]["matchLabels"]
    egress = egress_of(docs, server)
    assert reaches(egress, {("TCP", 443)}, ip=True) and reaches(egress, {("UDP", 53)}, namespace="kube-system",
                                                                pod={"k8s-app": "kube-dns"})


def test_kserve_predictor_has_a_disruption_budget_and_spare_replica():
    docs = render("prod-serving")
    isvc = one(docs, "InferenceService", "mnist-arcface")
    pdb = one(docs, "PodDisruptionBudget", "mnist-arcface-predictor")
    assert pdb["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "mnist-arcface"}
    assert pdb["spec"]["maxUnavailable"] == 1 and isvc["spec"]["predictor"]["minReplicas"] >= 2
