"""What a run reuses from the production model, and where its model waits for the later steps.

Modes (TrainParams.mode):
  full     train from scratch (the trained model is staged here for embed and evaluate)
  warm     train from production's weights (``production_weights`` fetches them)
  refresh  no training: production's weights and gallery are staged as the run's model,
           embed encodes only the objects production has not seen (``new_rows``), and
           index appends them to a copy of production's index

Every mode leaves lineage.json in the staged model: {"mode", "weights_from"} (the
version whose weights were reused, None for full); embed adds the objects and images it
added to the gallery, and the published package keeps it. Torch-free.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from steps import deploy as registry
from steps import layout

LINEAGE_JSON = "lineage.json"
# The files of a package that make up a model and its gallery (not its run's reports).
MODEL_FILES = ("model.pt", "model_export.pt", "params.json")
GALLERY_FILES = ("index.faiss", "labels.npy", "index.json", layout.DATA_CARD_JSON)


class NoProduction(ValueError):
    """A mode that reuses production's weights ran before any version was deployed."""


def production_version(store, model: str, mode: str) -> int:
    alias = registry.read_alias(store, model)
    if not alias or alias.get("version") is None:
        raise NoProduction(f"mode={mode} reuses the production model's weights, and {model} has no "
                           "production version yet: run mode=full first")
    return int(alias["version"])


def stage_production(store, model: str, run_id: str) -> dict:
    """mode=refresh: copy production's weights and gallery to the run's model prefix (store
    to store, after checking the version is whole). Returns {"version", "prefix"}."""
    version = production_version(store, model, "refresh")
    try:
        manifest = registry.verify_package(store, model, version, check_hashes=False)
        missing = [n for n in (*MODEL_FILES, *GALLERY_FILES) if n not in manifest["files"]]
        if not missing:   # hashes checked as the files are copied
            dst = layout.run_model_prefix(run_id)
            registry.copy_version_files(store, model, version, manifest, (*MODEL_FILES, *GALLERY_FILES), dst)
    except ValueError as e:
        raise ValueError(f"cannot refresh from production: {e}") from None
    if missing:
        raise ValueError(f"cannot refresh from {model} v{version}: its package lacks "
                         f"{', '.join(missing)} (published before refresh existed?); run mode=full")
    store.put_json(dst + LINEAGE_JSON, {"mode": "refresh", "weights_from": version})
    return {"version": version, "prefix": dst}


def production_weights(store, model: str, local_dir: str) -> int:
    """mode=warm: production's model files, each read once and checked against its
    manifest, into local_dir (not its gallery: warm embeds its own); returns its version."""
    version = production_version(store, model, "warm")
    manifest = registry.verify_package(store, model, version, check_hashes=False)
    blobs = registry.read_version_files(store, model, version, manifest, MODEL_FILES)
    for name, data in zip(MODEL_FILES, blobs, strict=True):
        (Path(local_dir) / name).write_bytes(data)
    return version


def stage_trained(store, run_id: str, model_dir: str) -> str:
    """full and warm: upload the trained model (lineage.json included) for the later steps."""
    dst = layout.run_model_prefix(run_id)
    registry.upload_package(store, model_dir, dst)
    return dst


def fetch_staged(store, prefix: str, local_dir: str) -> Path:
    """The run's staged model (and, for refresh, production's gallery) in local_dir."""
    prefix = prefix.rstrip("/") + "/"
    names = [o.key[len(prefix):] for o in store.list(prefix)]
    if not names:
        raise FileNotFoundError(f"no staged model under {store.uri(prefix)}")
    store.map(lambda name: store.download_file(prefix + name, Path(local_dir) / name), names)
    return Path(local_dir)


def read_lineage(model_dir: str | Path) -> dict:
    path = Path(model_dir) / LINEAGE_JSON
    return json.loads(path.read_text()) if path.is_file() else {"mode": "full", "weights_from": None}


def new_rows(card: dict, src: np.ndarray, base_card: dict) -> tuple[np.ndarray, list[str]]:
    """(indices of the rows from sources the base gallery has not seen, those sources' URIs).

    A source is the same when its URI and content tag match. refresh can only add: a
    source of the base gallery that was rewritten or removed since would leave stale rows
    in it, so that is an error naming it."""
    base = {s["uri"]: s.get("tag") for s in base_card.get("sources", [])}
    now = {s["uri"]: s.get("tag") for s in card.get("sources", [])}
    if base and all(t is None for t in base.values()):
        raise ValueError("production's data card predates content tags, so the objects it was built "
                         "from cannot be told from new ones: run mode=warm or mode=full once")
    changed = sorted(u for u, t in base.items() if u in now and (t is None or now[u] != t))
    gone = sorted(u for u in base if u not in now)
    if changed or gone:
        what = "; ".join(filter(None, [changed and "rewritten since: " + ", ".join(changed[:5]),
                                       gone and "removed since: " + ", ".join(gone[:5])]))
        raise ValueError(f"refresh can only add images to production's gallery, and objects it was "
                         f"built from changed ({what}): run mode=warm or mode=full")
    fresh = [i for i, s in enumerate(card.get("sources", [])) if s["uri"] not in base]
    rows = np.flatnonzero(np.isin(src, fresh)) if fresh else np.zeros(0, np.int64)
    return rows, [card["sources"][i]["uri"] for i in fresh]


def train_in_mode(store_root: str, model: str, data_dir: str, out_dir: str, params, on_epoch=None) -> dict:
    """Train as params.mode says (full: from scratch; warm: from production's weights) and
    leave lineage.json beside the weights."""
    import tempfile

    from steps.storage import open_store
    from steps.train import prefetch_lazy_imports, train

    if params.mode == "refresh":
        raise ValueError("mode=refresh does not train: the pipeline reuses production's weights")
    prefetch_lazy_imports()   # while production's weights and the data come from the store
    weights_from = None
    with tempfile.TemporaryDirectory() as init_dir:
        if params.mode == "warm":
            weights_from = production_weights(open_store(store_root), model, init_dir)
        result = train(data_dir, out_dir, params, on_epoch=on_epoch,
                       init_from=init_dir if weights_from is not None else None)
    lineage = {"mode": params.mode, "weights_from": weights_from}
    (Path(out_dir) / LINEAGE_JSON).write_text(json.dumps(lineage))
    return {**result, **lineage}
