"""The kustomize overlays render, and secrets only ever come from Secret references."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_renders_bot_with_secret_refs(overlay):
    docs = render(overlay)
    bot = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ctbot")
    container = bot["spec"]["template"]["spec"]["containers"][0]
    secret_refs = {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
    assert secret_refs == {"ctbot-slack", "ctbot-s3"}
    assert container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_no_secret_values_in_config():
    for f in K8S.rglob("*.yaml"):
        text = f.read_text()
        for word in ("xoxb-", "xapp-", "SLACK_SIGNING_SECRET=", "AWS_SECRET_ACCESS_KEY="):
            assert word not in text, f"{f} holds a secret-looking value {word!r}"


def test_prod_runs_two_replicas_of_the_bot():
    docs = render("prod")
    bot = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ctbot")
    assert bot["spec"]["replicas"] == 2
