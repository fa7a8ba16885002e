"""Per-step Kubernetes resources, applied to the pipeline's tasks at compile time.

Config format (YAML or JSON file, ``ctbot pipeline compile --resources FILE``)::

    default:                 # merged under every step (finalize and select_best too)
      cpu: "500m"            # CPU request; add cpu_limit to cap it
      memory: 1Gi            # memory request and limit (memory_limit overrides the limit)
      env: {S3_ENDPOINT_URL: "http://minio.kubeflow:9000"}
      secret_env: {s3-credentials: {accesskey: AWS_ACCESS_KEY_ID, secretkey: AWS_SECRET_ACCESS_KEY}}
    train:
      cpu: "4"
      memory: 8Gi
      gpu: 1                 # accelerator limit
      gpu_type: nvidia.com/gpu
      node_selector: {cloud.google.com/gke-accelerator: nvidia-tesla-t4}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      pvc: {name: ctbot-cache, mount_path: /cache}
      timeout_seconds: 7200
    image: ghcr.io/ctbot/ctbot:v1.2   # optional: container image for every step

Steps: ingest validate train embed index evaluate deploy finalize select_best reuse
stage_model (reuse: mode=refresh's stand-in for train). A sweep's
trials take the ``train`` settings. Unknown keys are an error, so typos do not silently
drop a GPU request.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

STEP_NAMES = ("ingest", "validate", "train", "embed", "index", "evaluate", "deploy",
              "finalize", "select_best", "reuse", "stage_model")
STEP_KEYS = {"cpu", "cpu_limit", "memory", "memory_limit", "gpu", "gpu_type", "node_selector",
             "tolerations", "pvc", "env", "secret_env", "timeout_seconds"}
TOP_KEYS = {"default", "image", *STEP_NAMES}

# The Secret every step reads its store endpoint and credentials from, in the namespace
# the runs execute in (k8s/base/pipeline-resources.yaml; README "Running on a cluster").
# An empty S3_ENDPOINT_URL means AWS.
S3_SECRET = "ctbot-s3"
S3_SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                 "S3_ENDPOINT_URL": "S3_ENDPOINT_URL"}

# Sensible for MNIST on CPU nodes: training is the only heavy step. Without the Secret a
# pod on a cluster could not reach the store at all, so it is part of the defaults.
DEFAULT_RESOURCES: dict = {
    "default": {"cpu": "500m", "memory": "1Gi", "secret_env": {S3_SECRET: S3_SECRET_ENV}},
    "ingest": {"memory": "2Gi"},
    "train": {"cpu": "4", "memory": "8Gi"},
    "embed": {"cpu": "2", "memory": "4Gi"},
    "evaluate": {"cpu": "1", "memory": "2Gi"},
    "finalize": {"cpu": "250m", "memory": "512Mi"},
}


class ResourceConfigError(ValueError):
    pass


def load_resources(path: str | Path | None) -> dict:
    """Read a config file (YAML or JSON) and lay it over the defaults, per step and
    key: a file that only asks for a GPU for train keeps the other defaults."""
    cfg = copy.deepcopy(DEFAULT_RESOURCES)
    if path is None:
        return cfg
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        user = json.loads(text)
    else:
        import yaml
        user = yaml.safe_load(text) or {}
    check(user)
    for step, spec in user.items():
        if step == "image":
            cfg["image"] = spec
        else:
            cfg[step] = {**cfg.get(step, {}), **spec}
    return cfg


def check(cfg: dict) -> None:
    if not isinstance(cfg, dict):
        raise ResourceConfigError("resources config must be a mapping of step -> settings")
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise ResourceConfigError(f"unknown step(s) in resources config: {', '.join(unknown)}; "
                                  f"valid: default, image, {', '.join(STEP_NAMES)}")
    for step, spec in cfg.items():
        if step == "image":
            continue
        if not isinstance(spec, dict):
            raise ResourceConfigError(f"resources.{step} must be a mapping")
        bad = sorted(set(spec) - STEP_KEYS)
        if bad:
            raise ResourceConfigError(f"unknown key(s) in resources.{step}: {', '.join(bad)}; "
                                      f"valid: {', '.join(sorted(STEP_KEYS))}")
        pvc = spec.get("pvc")
        if pvc is not None and not (isinstance(pvc, dict) and pvc.get("name") and pvc.get("mount_path")):
            raise ResourceConfigError(f"resources.{step}.pvc needs name and mount_path")


def for_step(cfg: dict, step: str) -> dict:
    merged = dict(cfg.get("default") or {})
    for key, value in (cfg.get(step) or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def apply(task, step: str, cfg: dict | None):
    """Set the task's container resources and pod settings from ``cfg``."""
    if not cfg:
        return task
    from kfp import kubernetes

    spec = for_step(cfg, step)
    if cfg.get("image"):
        task.set_container_image(cfg["image"])
    if spec.get("cpu"):
        task.set_cpu_request(str(spec["cpu"]))
    if spec.get("cpu_limit"):
        task.set_cpu_limit(str(spec["cpu_limit"]))
    if spec.get("memory"):
        task.set_memory_request(str(spec["memory"]))
    if spec.get("memory_limit") or spec.get("memory"):
        task.set_memory_limit(str(spec.get("memory_limit") or spec["memory"]))
    if spec.get("gpu"):
        task.set_accelerator_type(spec.get("gpu_type") or "nvidia.com/gpu")
        task.set_accelerator_limit(int(spec["gpu"]))
    for key, value in (spec.get("node_selector") or {}).items():
        kubernetes.add_node_selector(task, label_key=key, label_value=str(value))
    for tol in spec.get("tolerations") or []:
        kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator"),
                                  value=tol.get("value"), effect=tol.get("effect"),
                                  toleration_seconds=tol.get("toleration_seconds"))
    if spec.get("pvc"):
        kubernetes.mount_pvc(task, pvc_name=spec["pvc"]["name"],
                             mount_path=spec["pvc"]["mount_path"])
    for name, value in (spec.get("env") or {}).items():
        task.set_env_variable(name, str(value))
    for secret, mapping in (spec.get("secret_env") or {}).items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=dict(mapping))
    if spec.get("timeout_seconds"):
        kubernetes.set_timeout(task, int(spec["timeout_seconds"]))
    return task
