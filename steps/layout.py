"""Where every run and model artifact lives, relative to the store root.

Both runners (local and Kubeflow) write here, and the bot only reads from here, so
the bot never depends on which runner ran a pipeline. Nothing else builds these keys.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

STEPS = ("ingest", "validate", "train", "embed", "index", "evaluate", "deploy")


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


def step_key(run_id: str, step: str) -> str:
    """JSON: {step, state: running|done|failed|skipped, started_at, finished_at, seconds,
    summary: {...}, error}. Overwritten while the step runs (train writes epoch progress)."""
    return f"runs/{run_id}/steps/{step}.json"


def report_key(run_id: str) -> str:
    return f"runs/{run_id}/report.json"


def confusion_png_key(run_id: str) -> str:
    return f"runs/{run_id}/confusion.png"


def confusion_csv_key(run_id: str) -> str:
    return f"runs/{run_id}/confusion.csv"


def data_card_key(run_id: str) -> str:
    return f"runs/{run_id}/data_card.json"


def shard_key(tag: str) -> str:
    """A decoded source object's pixels (steps.ingest), keyed by its URI and content tag:
    kept across runs so a run reads only objects it has not seen."""
    return f"cache/shards/{tag}.npz"


def shard_index_key(uris: list[str]) -> str:
    """One object with the sidecars of every unit these data URIs held at their last
    ingest (steps.ingest): the next ingest of the same URIs reads its seen objects'
    sidecars in one request, not one each. Entries are keyed by content tag, so an index
    left behind by older data only misses."""
    digest = hashlib.sha256(json.dumps(sorted(uris)).encode()).hexdigest()[:32]
    return f"cache/shards/index/{digest}.npz"


def shard_meta_key(tag: str) -> str:
    """The shard's sidecar: labels, image hashes, issues; all a run's data preparation
    reads of an object it has seen. Written after the pixels, so it implies them."""
    return f"cache/shards/{tag}.meta.npz"


def run_model_prefix(run_id: str) -> str:
    """The run's model between training (or, for refresh, production's copy) and evaluate:
    kept in the store so either branch of the pipeline's mode condition can hand it on."""
    return f"runs/{run_id}/model/"

def approval_key(run_id: str) -> str:
    """JSON {state: pending|approved|rejected|expired, by, at}: the run's approval as the
    bot last decided it, for publishers that can't see ctbot's Redis (steps.deploy's CLI)."""
    return f"runs/{run_id}/approval.json"


def candidate_prefix(run_id: str) -> str:
    """The run's model package, kept whether deployed or held, so 'Promote anyway' works."""
    return f"runs/{run_id}/candidate/"


def model_prefix(model: str) -> str:
    return f"models/{model}/"


def version_prefix(model: str, version: int) -> str:
    return f"models/{model}/v{version}/"


def alias_key(model: str, alias: str = "production") -> str:
    """JSON: {version, updated_at, history: [{version, action, by, at, run_id}]}.
    One PUT replaces it whole, so moving the alias is atomic."""
    return f"models/{model}/{alias}.json"


# ---- files inside a model package (a run's candidate or a published version) ----

METRICS_JSON = "metrics.json"
PARAMS_JSON = "params.json"
DATA_CARD_JSON = "data_card.json"
META_JSON = "meta.json"
# Written last by publish: a version without it is incomplete (see steps.deploy.verify_package).
MANIFEST_JSON = "manifest.json"


def candidate_key(run_id: str, name: str) -> str:
    return candidate_prefix(run_id) + name


def package_key(model: str, version: int, name: str) -> str:
    return version_prefix(model, int(version)) + name


def meta_key(model: str, version: int) -> str:
    return package_key(model, version, META_JSON)


def version_claim_key(model: str, version: int) -> str:
    """Created with a conditional put (if-none-match): whoever creates it owns that version
    number. Kept after a prune, so a number is never handed out twice."""
    return f"models/{model}/claims/v{int(version)}.json"


def manifest_key(model: str, version: int) -> str:
    """JSON: {version, run_id, created_at, files: {name: {sha256, size}}}."""
    return package_key(model, version, MANIFEST_JSON)


# ---- URIs and run ids: stated once, used by the service, the runners and the CLIs ----

DEFAULT_EVAL_KEY = "eval/eval.npz"


def store_root(root: str) -> str:
    """The store as a pipeline's tasks see it: local paths made absolute, since task
    processes may not share the caller's working directory."""
    if root.startswith("s3://"):
        return root
    return str(Path(root.removeprefix("file://")).expanduser().resolve())


def uri(root: str, key_or_uri: str) -> str:
    """A full URI or absolute path as given; anything else is a key in the store."""
    if "://" in key_or_uri or key_or_uri.startswith("/"):
        return key_or_uri
    return store_root(root).rstrip("/") + "/" + key_or_uri


def resolve_eval_uri(root: str, eval_uri: str = "") -> str:
    """The fixed eval set: the configured URI or key, else eval/eval.npz in the store."""
    return uri(root, eval_uri or DEFAULT_EVAL_KEY)


def data_uris_or_default(root: str, data_prefix: str, given: list[str] | None = None) -> list[str]:
    return list(given) if given else [uri(root, data_prefix)]


def new_run_id(ts: float | None = None) -> str:
    """Readable and unique: r-20261122-0912-ab12 (UTC minute + 16 random bits; a
    collision is caught by the SET NX that creates the run record)."""
    stamp = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return f"r-{stamp:%Y%m%d-%H%M}-{secrets.token_hex(2)}"


AUDIT_PREFIX = "audit/"


def audit_day_prefix(day: str) -> str:
    """``day`` is YYYY/MM/DD (UTC). The audit trail's archive: one JSON-lines object per
    batch under the day's folder (core/audit.py says why not one object per day)."""
    return f"{AUDIT_PREFIX}{day}/"


def audit_batch_key(day: str, first_id: str) -> str:
    """A batch of audit entries, named by its first Redis stream id ("ms-seq"), zero-padded
    so that keys sort in stream order."""
    ms, _, seq = first_id.partition("-")
    return f"{audit_day_prefix(day)}{int(ms):013d}-{int(seq or 0):06d}.jsonl"
