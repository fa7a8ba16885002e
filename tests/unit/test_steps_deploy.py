"""The model registry on the moto S3 server: publish, alias history, rollback, prune."""
import hashlib
import json
import subprocess
import sys

import pytest

from steps import layout
from steps.deploy import (
    download_package,
    download_version,
    list_versions,
    publish,
    read_alias,
    read_meta,
    rollback,
    upload_package,
    verify_package,
)
from steps.storage import LocalStore

MODEL = "mnist-arcface"


def make_candidate(store, run_id, top1):
    prefix = f"runs/{run_id}/candidate/"
    store.put_bytes(prefix + "model.pt", f"weights of {run_id}".encode())
    store.put_bytes(prefix + "index.faiss", b"index")
    store.put_json(prefix + "metrics.json", {"top1": top1})
    return prefix


def test_publish_twice_then_rollback(s3_store):
    v1 = publish(s3_store, MODEL, make_candidate(s3_store, "r1", 0.981), run_id="r1", by="U1")
    v2 = publish(s3_store, MODEL, make_candidate(s3_store, "r2", 0.985), run_id="r2", by="weekly")
    assert (v1, v2) == (1, 2)
    assert list_versions(s3_store, MODEL) == [1, 2]
    assert s3_store.get_bytes(f"models/{MODEL}/v2/model.pt") == b"weights of r2"
    meta = read_meta(s3_store, MODEL, 2)
    assert meta["run_id"] == "r2" and meta["by"] == "weekly" and meta["top1"] == 0.985
    assert meta["files"] == ["index.faiss", "metrics.json", "model.pt"]
    alias = read_alias(s3_store, MODEL)
    assert alias["version"] == 2 and alias["top1"] == 0.985 and alias["run_id"] == "r2"
    assert [(h["version"], h["action"], h["by"], h["run_id"]) for h in alias["history"]] == [
        (1, "deploy", "U1", "r1"), (2, "deploy", "weekly", "r2")]

    assert rollback(s3_store, MODEL, by="U2") == {"from": 2, "to": 1}
    alias = read_alias(s3_store, MODEL)
    assert alias["version"] == 1 and alias["top1"] == 0.981
    assert alias["history"][-1]["action"] == "rollback" and alias["history"][-1]["from"] == 2
    with pytest.raises(ValueError, match="has no earlier version in its history"):
        rollback(s3_store, MODEL)
    assert rollback(s3_store, MODEL, to_version=2) == {"from": 1, "to": 2}
    with pytest.raises(ValueError, match="already at v2"):
        rollback(s3_store, MODEL, to_version=2)


def test_rollback_walks_back_through_the_lineage(s3_store):
    for i, top1 in enumerate([0.97, 0.98, 0.99], start=1):
        publish(s3_store, MODEL, make_candidate(s3_store, f"r{i}", top1), run_id=f"r{i}", by="u")
    assert rollback(s3_store, MODEL)["to"] == 2
    assert rollback(s3_store, MODEL)["to"] == 1
    # a new deployment after rollbacks gets a fresh number and becomes the new head
    assert publish(s3_store, MODEL, make_candidate(s3_store, "r4", 0.99), run_id="r4", by="u",
                   action="promote") == 4
    assert read_alias(s3_store, MODEL)["history"][-1]["action"] == "promote"
    assert rollback(s3_store, MODEL) == {"from": 4, "to": 1}


def test_prune_keeps_the_newest_plus_production_and_its_predecessor(s3_store):
    for i in range(1, 4):
        publish(s3_store, MODEL, make_candidate(s3_store, f"r{i}", 0.98), run_id=f"r{i}", by="u", keep=2)
    assert list_versions(s3_store, MODEL) == [2, 3]
    rollback(s3_store, MODEL, to_version=2)        # production is now v2, history v1..v3
    publish(s3_store, MODEL, make_candidate(s3_store, "r4", 0.98), run_id="r4", by="u", keep=1)
    # v4 is production; v2 (the rollback target) survives; v3 goes
    assert list_versions(s3_store, MODEL) == [2, 4]
    assert not any(o.key.startswith(f"models/{MODEL}/v3/") for o in s3_store.list("models/"))
    # pruned numbers are never reused
    assert publish(s3_store, MODEL, make_candidate(s3_store, "r5", 0.98), run_id="r5", by="u", keep=1) == 5
    with pytest.raises(ValueError, match=r"v3 does not exist or was pruned; available: v4, v5"):
        rollback(s3_store, MODEL, to_version=3)


def test_errors_are_clear(s3_store):
    with pytest.raises(ValueError, match="has no production version yet"):
        rollback(s3_store, MODEL)
    with pytest.raises(ValueError, match="no model package under s3://"):
        publish(s3_store, MODEL, "runs/missing/candidate/", run_id="x", by="u")


def test_upload_and_download_package(s3_store, tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "model.pt").write_bytes(b"w")
    (pkg / "sub" / "x.json").write_text("{}")
    keys = upload_package(s3_store, str(pkg), "runs/r9/candidate")
    assert keys == ["runs/r9/candidate/model.pt", "runs/r9/candidate/sub/x.json"]
    got = download_package(s3_store, "runs/r9/candidate/", str(tmp_path / "back"))
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in got) == ["model.pt", "sub/x.json"]


def test_publish_writes_the_manifest_last_then_moves_the_alias(tmp_path):
    puts = []

    class Recording(LocalStore):
        def put_bytes(self, key, data, content_type=None, **conditions):
            puts.append(key)
            super().put_bytes(key, data, content_type, **conditions)

    store = Recording(tmp_path)
    prefix = make_candidate(store, "r1", 0.98)
    puts.clear()
    assert publish(store, MODEL, prefix, run_id="r1", by="u") == 1
    assert puts[-2:] == [layout.manifest_key(MODEL, 1), layout.alias_key(MODEL)]
    manifest = verify_package(store, MODEL, 1)
    assert manifest["version"] == 1 and manifest["run_id"] == "r1" and manifest["created_at"]
    assert set(manifest["files"]) == {"index.faiss", "metrics.json", "model.pt", "meta.json"}
    assert manifest["files"]["model.pt"] == {"size": len(b"weights of r1"), "sha256": hashlib.sha256(
        b"weights of r1").hexdigest()}
    # republishing a version copies its package, never its bookkeeping
    assert publish(store, MODEL, layout.version_prefix(MODEL, 1), run_id="r1", by="u") == 2
    assert read_meta(store, MODEL, 2)["files"] == ["index.faiss", "metrics.json", "model.pt"]
    assert verify_package(store, MODEL, 2)["version"] == 2


def test_a_torn_package_is_refused_by_name(s3_store, tmp_path):
    publish(s3_store, MODEL, make_candidate(s3_store, "r1", 0.98), run_id="r1", by="u")
    publish(s3_store, MODEL, make_candidate(s3_store, "r2", 0.99), run_id="r2", by="u")
    assert download_version(s3_store, MODEL, 2, str(tmp_path / "ok"))["run_id"] == "r2"
    assert (tmp_path / "ok" / "model.pt").read_bytes() == b"weights of r2"

    s3_store.put_bytes(layout.package_key(MODEL, 2, "model.pt"), b"weights of rX")  # same size
    with pytest.raises(ValueError, match=r"mnist-arcface v2 is torn: model.pt has sha256 .* manifest.json says"):
        verify_package(s3_store, MODEL, 2)
    assert verify_package(s3_store, MODEL, 2, check_hashes=False)["version"] == 2  # sizes only
    with pytest.raises(ValueError, match=r"is torn: model.pt has sha256"):
        download_version(s3_store, MODEL, 2, str(tmp_path / "bad"))
    s3_store.put_bytes(layout.package_key(MODEL, 2, "index.faiss"), b"longer index")
    with pytest.raises(ValueError, match=r"v2 is torn: index.faiss has 12 bytes, manifest.json says 5"):
        verify_package(s3_store, MODEL, 2, check_hashes=False)
    s3_store.delete(layout.package_key(MODEL, 1, "index.faiss"))
    with pytest.raises(ValueError, match=r"v1 is torn: index.faiss is missing \(listed in manifest.json\)"):
        verify_package(s3_store, MODEL, 1)
    with pytest.raises(ValueError, match=r"v1 is torn: index.faiss is missing"):
        rollback(s3_store, MODEL, to_version=1)  # the alias never points at a torn version
    assert read_alias(s3_store, MODEL)["version"] == 2

    s3_store.delete(layout.manifest_key(MODEL, 1))
    with pytest.raises(ValueError, match=r"v1 has no valid manifest.json under s3://.*incomplete"):
        verify_package(s3_store, MODEL, 1)
    with pytest.raises(ValueError, match=r"no manifest.json under s3://.*incomplete"):
        download_version(s3_store, MODEL, 1, str(tmp_path / "none"))


def test_cli_publish_rollback_show(s3_store, bucket):
    make_candidate(s3_store, "r1", 0.98)
    make_candidate(s3_store, "r2", 0.99)
    base = [sys.executable, "-m", "steps.deploy", "--store", f"s3://{bucket}/", "--model", MODEL]

    def cli(*args):
        r = subprocess.run(base + list(args), capture_output=True, text=True)
        return r.returncode, json.loads(r.stdout)
    assert cli("publish", "--package-prefix", "runs/r1/candidate/", "--run-id", "r1") == (0, {"version": 1, "model": MODEL})
    assert cli("publish", "--package-prefix", "runs/r2/candidate/", "--run-id", "r2")[1]["version"] == 2
    assert cli("rollback") == (0, {"from": 2, "to": 1})
    code, shown = cli("show")
    assert code == 0 and shown["production"]["version"] == 1 and shown["versions"] == [1, 2]
    code, err = cli("rollback", "--to", "7")
    assert code == 1 and "v7 does not exist" in err["error"]
    assert cli("verify") == (0, {"model": MODEL, "version": 1, "ok": True, "files": 4})
    s3_store.delete(f"models/{MODEL}/v2/model.pt")
    code, err = cli("verify", "--version", "2")
    assert code == 1 and "v2 is torn: model.pt is missing" in err["error"]


def test_evaluate_refuses_to_compare_with_a_torn_production_package(tmp_path):
    from steps.evaluate import production_score

    store = LocalStore(tmp_path / "store")
    unused = lambda: "unused.npz"  # noqa: E731  (production's images: never reached)
    assert production_score(store, MODEL, "unused-emb.npz", unused) == (None, None)  # nothing deployed yet
    publish(store, MODEL, make_candidate(store, "r1", 0.98), run_id="r1", by="u")
    store.delete(layout.package_key(MODEL, 1, "index.faiss"))
    with pytest.raises(ValueError, match=r"cannot compare with production: .*index.faiss is missing"):
        production_score(store, MODEL, "unused-emb.npz", unused)


def evaluated(store, run_id, top1, production):
    """A candidate as evaluate leaves it: metrics.json says what production it was compared with."""
    prefix = make_candidate(store, run_id, top1)
    store.put_json(prefix + "metrics.json", {"top1": top1, "production": production})
    return prefix


def test_the_pipeline_deploy_publishes_only_over_the_production_it_compared_with(s3_store):
    from steps.deploy import deploy_candidate
    publish(s3_store, MODEL, make_candidate(s3_store, "r1", 0.97), run_id="r1", by="U1")
    publish(s3_store, MODEL, make_candidate(s3_store, "r2", 0.98), run_id="r2", by="U1")
    evaluated(s3_store, "r3", 0.99, {"version": 2, "top1": 0.98})
    assert deploy_candidate(s3_store, MODEL, "r3", by="U1") == {"version": 3, "compared_with": 2}

    evaluated(s3_store, "r4", 0.995, {"version": 3, "top1": 0.99})
    rollback(s3_store, MODEL, by="U0OPS0001")                 # an operator, between evaluate and deploy
    out = deploy_candidate(s3_store, MODEL, "r4", by="U1")
    assert out["held"] == {"expected": 3, "current": 2, "action": "rollback", "by": "U0OPS0001",
                           "at": read_alias(s3_store, MODEL)["updated_at"]}
    assert out["reason"] == "production moved from v3 to v2 during the run (rolled back by U0OPS0001)"
    assert read_alias(s3_store, MODEL)["version"] == 2 and list_versions(s3_store, MODEL) == [1, 2, 3]

    evaluated(s3_store, "r5", 0.99, None)                     # compared with no production at all
    assert "production moved from none to v2" in deploy_candidate(s3_store, MODEL, "r5", by="U1")["reason"]
    s3_store.delete("runs/r5/candidate/metrics.json")
    with pytest.raises(ValueError, match="nothing to bind the deploy to"):
        deploy_candidate(s3_store, MODEL, "r5", by="U1")


def test_a_held_deploy_turns_the_report_into_a_hold(s3_store):
    from pipelines.report import finalize_run
    from pipelines.status import mark
    from steps.deploy import deploy_candidate
    publish(s3_store, MODEL, make_candidate(s3_store, "r1", 0.97), run_id="r1", by="U1")
    publish(s3_store, MODEL, make_candidate(s3_store, "r2", 0.98), run_id="r2", by="U1")
    evaluated(s3_store, "r3", 0.99, {"version": 2, "top1": 0.98})
    for step in layout.STEPS[:-1]:
        mark(s3_store, "r3", step, "done", summary={"decision": "deploy", "reason": "deploy: better"}
             if step == "evaluate" else {})
    rollback(s3_store, MODEL, by="U0OPS0001")
    mark(s3_store, "r3", "deploy", "done", summary=deploy_candidate(s3_store, MODEL, "r3", by="U1"))
    report = finalize_run(s3_store, "r3", model=MODEL)
    assert report["status"] == "succeeded" and report["decision"] == "hold" and report["model_version"] is None
    assert report["held"]["expected"] == 2 and report["held"]["current"] == 1
    assert report["reason"].startswith("production moved from v2 to v1 during the run (rolled back by")


def test_the_cli_cannot_publish_a_run_the_bot_holds_for_an_approver(s3_store, bucket):
    make_candidate(s3_store, "r1", 0.98)
    base = [sys.executable, "-m", "steps.deploy", "--store", f"s3://{bucket}/", "--model", MODEL, "publish",
            "--package-prefix", "runs/r1/candidate/", "--run-id", "r1"]
    for state, said in (("pending", "is waiting for approval"), ("rejected", "was rejected"),
                        ("expired", "has an expired approval")):
        s3_store.put_json(layout.approval_key("r1"), {"state": state, "by": "U0OPS0001"})
        r = subprocess.run(base, capture_output=True, text=True)
        assert r.returncode == 1 and f"run r1 {said}: an approver publishes it through ctbot" in \
            json.loads(r.stdout)["error"]
        assert read_alias(s3_store, MODEL) is None
    with pytest.raises(ValueError, match="has an expired approval"):
        publish(s3_store, MODEL, "runs/r1/candidate/", run_id="r1", by="U1")
    s3_store.put_json(layout.approval_key("r1"), {"state": "approved", "by": "U0OPS0001"})
    assert json.loads(subprocess.run(base, capture_output=True, text=True).stdout)["version"] == 1


def test_store_map_keeps_order_tries_every_item_and_raises_the_first_failure(bucket):
    from steps.storage import open_store
    store = open_store(f"s3://{bucket}/")   # no client yet: it is made once, before the threads
    keys = [f"m/{i}" for i in range(12)]
    store.map(lambda k: store.put_bytes(k, k.encode()), keys)
    assert store.map(store.get_bytes, keys) == [k.encode() for k in keys]
    tried = []

    def get(key):
        tried.append(key)
        return store.get_bytes(key)
    with pytest.raises(KeyError, match="m/missing-1"):
        store.map(get, ["m/0", "m/missing-1", "m/1", "m/missing-2"])
    assert sorted(tried) == ["m/0", "m/1", "m/missing-1", "m/missing-2"]


def test_a_refresh_stages_production_byte_for_byte_and_refuses_a_torn_one(s3_store):
    from steps.reuse import GALLERY_FILES, LINEAGE_JSON, MODEL_FILES, stage_production
    prefix = "runs/r1/candidate/"
    files = {name: f"{name} of r1".encode() for name in (*MODEL_FILES, *GALLERY_FILES)}
    for name, data in files.items():
        s3_store.put_bytes(prefix + name, data)
    assert publish(s3_store, MODEL, prefix, run_id="r1", by="u", metrics={"top1": 0.98}) == 1

    staged = stage_production(s3_store, MODEL, "r2")
    assert staged == {"version": 1, "prefix": layout.run_model_prefix("r2")}
    for name, data in files.items():
        assert s3_store.get_bytes(staged["prefix"] + name) == data
    assert s3_store.get_json(staged["prefix"] + LINEAGE_JSON) == {"mode": "refresh", "weights_from": 1}

    s3_store.put_bytes(layout.package_key(MODEL, 1, "index.faiss"), b"index.faiss of rX")   # same size
    with pytest.raises(ValueError, match=r"cannot refresh from production: mnist-arcface v1 is torn: "
                                         r"index.faiss has sha256 .* manifest.json says"):
        stage_production(s3_store, MODEL, "r3")
    assert list(s3_store.list(layout.run_model_prefix("r3"))) == []    # nothing copied
