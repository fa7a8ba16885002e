"""Promote, rollback, status and data summary: the service over the real model registry
(steps.deploy) in the moto S3 store and a real redis-server."""
from __future__ import annotations

import pytest

from core.config import Settings
from core.service import Conflict, ServiceError
from core.state import StateStore
from steps import deploy, layout
from tests.recording import RecordingNotifier, RecordingRunner, finish_run, make_service


@pytest.fixture
def env(bucket, redis_url, s3_store):
    s3_store.put_bytes("data/2026-11-01/a.npz", b"x")
    settings = Settings(store=f"s3://{bucket}/", keep_versions=5)
    state = StateStore.from_url(redis_url)
    runner, notifier = RecordingRunner(), RecordingNotifier()
    return make_service(settings, state, s3_store, runner, notifier), runner, notifier, state, s3_store


def held_run(service, runner, store, top1=0.96):
    run = service.request_training("r", {}, "U1")
    finish_run(store, runner, run.run_id, decision="hold", top1=top1)
    return service.refresh(run.run_id)


def test_promote_publishes_a_held_candidate(env):
    service, runner, notifier, state, store = env
    run = held_run(service, runner, store)
    assert run.decision == "hold" and run.model_version is None
    version = service.promote(run.run_id, "U7")
    assert version == 1
    alias = deploy.read_alias(store, "mnist-arcface")
    assert alias["version"] == 1 and alias["history"][-1]["action"] == "promote"
    assert alias["history"][-1]["by"] == "U7" and alias["run_id"] == run.run_id
    assert store.exists(layout.version_prefix("mnist-arcface", 1) + "model.pt")
    got = state.get_run(run.run_id)
    assert got.model_version == 1 and "promoted to v1 by <@U7>" in got.decision_reason
    assert state.read_audit(1)[0]["action"] == "promote" and state.read_audit(1)[0]["version"] == "1"
    assert "v1 is now production" in notifier.named("say")[-1][0]
    prod = service.status()["production"]
    assert prod["version"] == 1 and prod["top1"] == pytest.approx(0.96) and prod["updated_at"]
    with pytest.raises(Conflict, match="already published as mnist-arcface v1"):
        service.promote(run.run_id, "U7")


def test_promote_refuses_runs_without_a_model(env):
    service, runner, notifier, state, store = env
    active = service.request_training("r", {}, "U1")
    with pytest.raises(Conflict, match="still running"):
        service.promote(active.run_id, "U1")
    finish_run(store, runner, active.run_id, failed_step="train")
    service.refresh(active.run_id)
    with pytest.raises(Conflict, match="failed; only a successful run"):
        service.promote(active.run_id, "U1")
    nocand = service.request_training("r", {}, "U1")
    finish_run(store, runner, nocand.run_id, decision="hold", candidate=False)
    service.refresh(nocand.run_id)
    with pytest.raises(ServiceError, match="has no model package at `s3://"):
        service.promote(nocand.run_id, "U1")


def test_rollback(env):
    service, runner, notifier, state, store = env
    with pytest.raises(ServiceError, match="has no production version yet"):
        service.rollback(None, "U1")
    v1 = service.promote(held_run(service, runner, store, 0.95).run_id, "U1")
    v2 = service.promote(held_run(service, runner, store, 0.97).run_id, "U1")
    assert (v1, v2) == (1, 2)
    assert service.rollback(None, "U3") == {"from": 2, "to": 1}
    assert deploy.read_alias(store, "mnist-arcface")["version"] == 1
    entry = state.read_audit(1)[0]
    assert (entry["action"], entry["who"], entry["from"], entry["to"]) == ("rollback", "U3", "2", "1")
    assert "rolled mnist-arcface back from v2 to v1" in notifier.named("say")[-1][0]
    with pytest.raises(ServiceError, match="v7 does not exist or was pruned; available: v1, v2"):
        service.rollback(7, "U3")
    assert service.rollback(2, "U3") == {"from": 1, "to": 2}


def test_data_summary(env):
    service, runner, notifier, state, store = env
    state.add_pending(2, 2048, {"3": 2})
    run = held_run(service, runner, store)
    store.put_json(layout.data_card_key(run.run_id), {"n": 40, "counts": {"3": 40},
                                                      "sources": [], "fingerprint": "sha256:ab"})
    service.promote(run.run_id, "U1")
    store.put_json(layout.version_prefix("mnist-arcface", 1) + "data_card.json", {"n": 40})
    summary = service.data_summary()
    assert summary["prefix"] == store.uri("data/")
    assert summary["last_trained"]["run_id"] == run.run_id
    assert summary["last_trained"]["data_card"]["n"] == 40
    assert summary["production"] == {"version": 1, "data_card": {"n": 40}}
    assert summary["recent"][0]["run_id"] == run.run_id and summary["recent"][0]["n"] == 40
    # the held run succeeded, so data that arrived before it is no longer pending
    assert summary["pending"]["objects"] == 0
