"""TrainingService against a real redis-server and the moto S3 server.

The runner is the RecordingRunner (counts launches; a pipeline's results are written
into the store by tests.recording.finish_run, with the pipeline's own finalize_run)."""
from __future__ import annotations

import threading
import time

import pytest

from core.config import Settings
from core.service import Conflict, ParamError, ServiceError, UnknownRun
from core.state import StateStore
from core.types import RunRecord
from steps.params import TrainParams
from tests.recording import RecordingNotifier, RecordingRunner, finish_run, make_service, write_step


@pytest.fixture
def settings(bucket):
    return Settings(store=f"s3://{bucket}/", redis_url="", runner="local")


@pytest.fixture
def state(redis_url):
    return StateStore.from_url(redis_url)


@pytest.fixture
def data(s3_store):
    keys = ["data/2026-11-01/a.npz", "data/2026-11-02/b.npz", "data/2026-11-02/5/x.png"]
    for k in keys:
        s3_store.put_bytes(k, b"0123456789")
    s3_store.put_bytes("data/2026-11-02/.upload.tmp", b"partial")  # hidden: not data
    return keys


@pytest.fixture
def runner():
    return RecordingRunner()


@pytest.fixture
def notifier():
    return RecordingNotifier()


@pytest.fixture
def service(settings, state, s3_store, runner, notifier, data):
    return make_service(settings, state, s3_store, runner, notifier)


def test_request_records_submits_and_posts(service, runner, notifier, state, s3_store, data):
    run = service.request_training("/ct train by <@U1>", {"epochs": 2}, "U1")
    assert run.run_id.startswith("r-") and len(run.run_id) == len("r-20261122-0912-ab12")
    assert run.state == "running" and run.trigger == "manual" and run.external_id == "ext-1"
    assert run.external_url.endswith(run.run_id)
    assert (run.slack_channel, run.slack_ts) != ("", "")
    # the stored record is the returned one
    assert state.get_run(run.run_id).to_dict() == run.to_dict()
    # a frozen snapshot of the data prefix, hidden files left out
    assert sorted(run.data_uris) == sorted(s3_store.uri(k) for k in data)
    sub = runner.submits[0]
    assert sub["data_uris"] == run.data_uris
    assert sub["params"]["epochs"] == 2 and sub["params"]["batch_size"] == TrainParams().batch_size  # full TrainParams
    assert run.params == sub["params"]
    assert sub["eval_uri"] == s3_store.uri("eval/eval.npz")
    assert sub["requested_by"] == "U1"
    assert state.lock_holder("mnist-arcface") == run.run_id
    assert service.active_run().run_id == run.run_id
    assert [c[0].run_id for c in notifier.named("run_started")] == [run.run_id]
    audit = state.read_audit(5)
    assert audit[0]["action"] == "train_requested" and audit[0]["run_id"] == run.run_id
    assert audit[0]["who"] == "U1" and audit[0]["trigger"] == "manual"


def test_snapshot_is_taken_at_request_time(service, runner, s3_store, data):
    run = service.request_training("r", {}, "U1")
    s3_store.put_bytes("data/2026-11-03/late.npz", b"late")
    assert s3_store.uri("data/2026-11-03/late.npz") not in runner.submits[0]["data_uris"]
    assert len(run.data_uris) == 3


def test_explicit_data_uris_are_used_as_given(service, runner):
    run = service.request_training("r", {}, "U1", data_uris=["s3://elsewhere/x.npz"])
    assert run.data_uris == runner.submits[0]["data_uris"] == ["s3://elsewhere/x.npz"]


def test_no_data_is_a_clear_error(settings, state, s3_store, runner):
    service = make_service(settings, state, s3_store, runner)
    with pytest.raises(ServiceError, match="No training data under `s3://.*/data/`"):
        service.request_training("r", {}, "U1")
    assert runner.submits == [] and state.lock_holder("mnist-arcface") is None


def test_second_request_conflicts_until_forced(service, runner, state):
    first = service.request_training("r", {}, "U1")
    with pytest.raises(Conflict) as e:
        service.request_training("again", {}, "U2")
    msg = str(e.value)
    assert first.run_id in msg and f"/ct cancel {first.run_id}" in msg and "<@U1>" in msg
    assert "Traceback" not in msg
    assert e.value.run.run_id == first.run_id
    assert len(runner.submits) == 1 and state.lock_holder("mnist-arcface") == first.run_id
    forced = service.request_training("forced", {}, "U2", force=True)
    assert len(runner.submits) == 2
    assert state.lock_holder("mnist-arcface") == forced.run_id
    assert state.get_run(first.run_id).active  # still tracked by the run watch


def test_a_finished_holder_does_not_block(service, runner, s3_store, state):
    first = service.request_training("r", {}, "U1")
    finish_run(s3_store, runner, first.run_id)  # finished while nobody refreshed it
    second = service.request_training("r2", {}, "U1")
    assert state.get_run(first.run_id).state == "succeeded"
    assert state.lock_holder("mnist-arcface") == second.run_id


def test_a_lock_left_by_a_vanished_run_is_cleared(service, state):
    state.acquire_lock("mnist-arcface", "r-ghost", 3600)
    run = service.request_training("r", {}, "U1")
    assert state.lock_holder("mnist-arcface") == run.run_id


def test_an_expired_lock_does_not_let_a_second_run_in(service, state):
    first = service.request_training("r", {}, "U1")
    state.r.delete("ct:lock:mnist-arcface")  # as if its TTL ran out while it still runs
    with pytest.raises(Conflict, match=first.run_id):
        service.request_training("r2", {}, "U1")
    assert state.lock_holder("mnist-arcface") is None


def test_repeated_dedupe_key_returns_the_same_run(service, runner):
    a = service.request_training("alert", {}, "U1", trigger="new_data", dedupe_key="alert:nd-1")
    b = service.request_training("alert", {}, "U2", trigger="new_data", dedupe_key="alert:nd-1")
    assert a.run_id == b.run_id and len(runner.submits) == 1


def test_concurrent_clicks_with_one_dedupe_key_start_one_run(service, runner):
    barrier, results, errors = threading.Barrier(4), [], []

    def click():
        barrier.wait()
        try:
            results.append(service.request_training("click", {}, "U1", dedupe_key="alert:nd-2").run_id)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=click) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert len(runner.submits) == 1


def test_bad_params_are_refused_with_the_valid_keys(service, runner, state):
    with pytest.raises(ParamError) as e:
        service.request_training("r", {"epochz": 3}, "U1")
    assert "epochz" in str(e.value) and "epochs" in str(e.value) and "batch_size" in str(e.value)
    with pytest.raises(ParamError, match=r"epochs=0 is out of range \[1, 200\]"):
        service.request_training("r", {"epochs": 0}, "U1")
    assert runner.submits == [] and state.list_runs() == []
    assert state.lock_holder("mnist-arcface") is None


def test_parse_params(service):
    assert service.parse_params(["epochs=3", "lr=0.01", "device=cpu"]) == {
        "epochs": 3, "lr": 0.01, "device": "cpu"}
    with pytest.raises(ParamError, match="expected key=value, got `epochs`; valid keys: preset, epochs, batch_size, lr"):
        service.parse_params(["epochs"])
    with pytest.raises(ParamError, match="`epochs` must be an int, got `three`"):
        service.parse_params(["epochs=three"])
    with pytest.raises(ParamError, match="lr=5.0 is out of range"):
        service.parse_params(["lr=5"])
    with pytest.raises(ParamError, match="unknown training parameter.*colour"):
        service.parse_params(["colour=red"])


def test_unknown_run(service):
    for call in (lambda: service.get_run("r-nope"), lambda: service.refresh("r-nope"),
                 lambda: service.cancel("r-nope", "U1"), lambda: service.promote("r-nope", "U1")):
        with pytest.raises(UnknownRun, match="No run with id `r-nope`"):
            call()


def test_submit_failure_marks_the_run_failed_and_frees_the_lock(settings, state, s3_store, data,
                                                               notifier):
    broken = RecordingRunner(fail_with="KFP API unreachable: connection refused")
    service = make_service(settings, state, s3_store, broken, notifier)
    with pytest.raises(ServiceError) as e:
        service.request_training("r", {}, "U1", dedupe_key="weekly:2026-W48")
    assert "Could not start run `r-" in str(e.value) and "connection refused" in str(e.value)
    failed = state.list_runs(1)[0]
    assert failed.state == "failed" and "connection refused" in failed.error and failed.finished_at
    assert state.lock_holder("mnist-arcface") is None
    assert notifier.named("run_started") == []
    # the dedupe key was released, so a retry can start the run
    ok = make_service(settings, state, s3_store, RecordingRunner(), notifier)
    assert ok.request_training("r", {}, "U1", dedupe_key="weekly:2026-W48").state == "running"


def test_refresh_reports_progress_only_when_it_changes(service, runner, notifier, s3_store, state):
    run = service.request_training("r", {}, "U1")
    write_step(s3_store, run.run_id, "ingest", "done")
    write_step(s3_store, run.run_id, "train", "running", epoch=1, epochs=8)
    got = service.refresh(run.run_id)
    assert got.progress == {"ingest": "done", "train": "running"}
    assert state.get_run(run.run_id).progress == got.progress
    assert len(notifier.named("run_progress")) == 1
    service.refresh(run.run_id)
    assert len(notifier.named("run_progress")) == 1
    steps = notifier.named("run_progress")[0][1]
    assert steps["train"]["summary"] == {"epoch": 1, "epochs": 8}


def test_refresh_of_a_finished_run_reports_once(service, settings, runner, notifier, s3_store, state):
    run = service.request_training("r", {}, "U1")
    state.add_pending(5, 500)
    finish_run(s3_store, runner, run.run_id, decision="deploy", top1=0.991, version=4)
    # a second replica refreshes the same run at the same time
    replica = make_service(settings, StateStore(state.r), s3_store, runner, notifier)
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.refresh(run.run_id)))
               for s in (service, replica)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    done = state.get_run(run.run_id)
    assert done.state == "succeeded" and done.decision == "deploy" and done.top1 == 0.991
    assert done.model_version == 4 and "97.00%" in done.decision_reason and done.finished_at
    assert done.progress["evaluate"] == "done"
    assert state.lock_holder("mnist-arcface") is None and state.active_run_ids() == []
    finished = notifier.named("run_finished")
    assert len(finished) == 1 and finished[0][0].run_id == run.run_id   # owed to Slack once
    assert notifier.named("run_progress")[-1][0].state == "succeeded"   # then shown as final
    assert state.read_audit(1)[0]["action"] == "run_finished"


def test_success_clears_only_data_seen_before_the_run(redis_url, settings, s3_store, data,
                                                      runner, notifier):
    now = [1_000_000.0]
    state = StateStore.from_url(redis_url, clock=lambda: now[0])
    service = make_service(settings, state, s3_store, runner, notifier, clock=lambda: now[0])
    state.add_pending(3, 30)
    now[0] += 60
    run = service.request_training("r", {}, "U1")
    now[0] += 60
    state.add_pending(1, 7)  # arrived after the snapshot
    finish_run(s3_store, runner, run.run_id)
    service.refresh(run.run_id)
    assert state.pending()["objects"] == 1 and state.pending()["bytes"] == 7


def test_a_failed_run_keeps_pending_data_and_names_the_step(service, runner, notifier, s3_store, state):
    run = service.request_training("r", {}, "U1")
    state.add_pending(2, 20)
    finish_run(s3_store, runner, run.run_id, failed_step="validate")
    done = service.refresh(run.run_id)
    assert done.state == "failed" and done.failed_step == "validate"
    assert "3 corrupt objects" in done.error
    assert state.pending()["objects"] == 2
    assert state.lock_holder("mnist-arcface") is None


def test_a_run_that_ended_without_a_report_fails_clearly(service, runner, notifier, state):
    run = service.request_training("r", {}, "U1")
    runner.status[run.run_id] = "succeeded"
    done = service.refresh(run.run_id)
    assert done.state == "failed" and "report.json" in done.error
    assert len(notifier.named("run_finished")) == 1


def test_a_run_never_submitted_is_closed(redis_url, settings, s3_store, runner):
    state = StateStore.from_url(redis_url)
    service = make_service(settings, state, s3_store, runner)
    stuck = RunRecord(run_id="r-stuck", model="mnist-arcface", trigger="manual", reason="r",
                      requested_by="U1", created_at=time.time() - 3600)
    state.create_run(stuck)
    state.acquire_lock("mnist-arcface", "r-stuck", 3600)
    done = service.refresh("r-stuck")
    assert done.state == "failed" and "never submitted" in done.error
    assert state.lock_holder("mnist-arcface") is None


def test_cancel(service, runner, notifier, state):
    run = service.request_training("r", {}, "U1")
    done = service.cancel(run.run_id, "U2")
    assert done.state == "canceled" and done.finished_at and runner.cancels == [run.run_id]
    assert state.lock_holder("mnist-arcface") is None
    assert state.read_audit(1)[0]["action"] == "cancel" and state.read_audit(1)[0]["who"] == "U2"
    assert any("<@U2> canceled" in c[0] for c in notifier.named("say"))
    # the run watch does not post a final report for it afterwards
    assert service.refresh(run.run_id).state == "canceled"
    assert notifier.named("run_finished") == []
    with pytest.raises(Conflict, match="already canceled"):
        service.cancel(run.run_id, "U2")


def test_notifier_failures_do_not_break_runs(settings, state, s3_store, runner, data):
    class Down(RecordingNotifier):
        def run_started(self, run):
            raise ConnectionError("slack is down")

    service = make_service(settings, state, s3_store, runner, Down())
    run = service.request_training("r", {}, "U1")
    assert run.state == "running" and run.slack_ts == ""


def test_schedule_pause_and_status(service, state, s3_store, notifier, runner):
    service.next_retrain = lambda: "2026-12-01T09:00:00+00:00"
    service.set_schedule_paused(True, "U9")
    assert state.schedule_paused() and state.read_audit(1)[0]["action"] == "schedule_paused"
    assert "paused the weekly retrain" in notifier.named("say")[-1][0]
    run = service.request_training("r", {}, "U1")
    write_step(s3_store, run.run_id, "ingest", "done")
    state.add_pending(4, 4096)
    st = service.status()
    assert st["active"].run_id == run.run_id and st["steps"]["ingest"]["state"] == "done"
    assert st["production"] is None and st["schedule_paused"] is True
    assert st["next_retrain"] == "2026-12-01T09:00:00+00:00"
    assert st["pending"]["objects"] == 4 and st["pending"]["bytes"] == 4096
    service.set_schedule_paused(False, "U9")
    assert service.status()["schedule_paused"] is False


def test_large_snapshots_fold_into_folders(redis_url, tmp_path, runner):
    """Thousands of PNGs would overflow a command line: past SNAPSHOT_MAX_URIS objects
    the snapshot names the folders one level under the prefix (the data card still
    lists every object the run read)."""
    from core.service import SNAPSHOT_MAX_URIS
    from steps.storage import open_store
    store = open_store(str(tmp_path / "store"))
    for batch in ("2026-11-01", "2026-11-02"):
        for i in range(SNAPSHOT_MAX_URIS // 2 + 1):
            store.put_bytes(f"data/{batch}/{i % 10}/{i:05d}.png", b"p")
    store.put_bytes("data/loose.npz", b"n")
    settings = Settings(store=str(tmp_path / "store"))
    service = make_service(settings, StateStore.from_url(redis_url), store, runner)
    run = service.request_training("r", {}, "U1")
    root = str((tmp_path / "store").resolve())
    assert run.data_uris == [f"{root}/data/2026-11-01/", f"{root}/data/2026-11-02/",
                             f"{root}/data/loose.npz"]


def test_list_runs_and_active_run(service, runner, s3_store, state):
    assert service.active_run() is None and service.list_runs() == []
    first = service.request_training("r1", {}, "U1")
    finish_run(s3_store, runner, first.run_id)
    service.refresh(first.run_id)
    second = service.request_training("r2", {}, "U1")
    assert [r.run_id for r in service.list_runs(5)] == [second.run_id, first.run_id]
    assert service.active_run().run_id == second.run_id
    state.r.delete("ct:lock:mnist-arcface")  # lock expired: the active set still knows
    assert service.active_run().run_id == second.run_id
