"""Block Kit builders: content, confirm dialogs on destructive buttons, and Slack's limits
even for absurd inputs."""
from __future__ import annotations

import json
import time

import pytest

from bot import blocks, ids
from bot.blocks.limits import MAX_BLOCKS, MAX_PAYLOAD, check_limits, clip, fit
from core.types import NewData, RunRecord
from steps.params import TrainParams
from tests.slack_helpers import buttons, message_text, report


def run(**kw) -> RunRecord:
    base = dict(run_id="r-20261122-0912-ab12", model="mnist-arcface", trigger="manual",
                reason="/ct train by <@U0ALICE01>", requested_by="U0ALICE01", params={"epochs": 2},
                data_uris=["s3://b/data/batch-0.npz"], state="running", created_at=time.time() - 75,
                started_at=time.time() - 70)
    base.update(kw)
    return RunRecord(**base)


def assert_sendable(m: dict) -> None:
    assert m["text"].strip(), "every message needs a fallback text"
    assert check_limits(m["blocks"], m["text"]) == []


def test_help_lists_every_subcommand_and_parameter_with_ranges():
    m = blocks.help_message("/ct", TrainParams.describe())
    assert_sendable(m)
    text = message_text(m)
    for sub in ("train", "status", "runs", "data", "deploy", "rollback", "schedule", "cancel"):
        assert f"/ct {sub}" in text
    for name in TrainParams.describe():
        assert name in text
    assert "1…200" in text          # epochs range
    assert "onecycle|cosine|none" in text


def test_progress_shows_step_icons_epoch_and_elapsed():
    steps = {"ingest": {"state": "done", "seconds": 0.4}, "validate": {"state": "done", "seconds": 0.1},
             "train": {"state": "running", "summary": {"epoch": 3, "epochs": 8, "loss": 0.4123}}}
    r = run()
    m = blocks.run_progress(r, steps, now=r.started_at + 125)
    assert_sendable(m)
    text = message_text(m)
    assert "✅ *ingest*" in text and "⏳ *train* · epoch 3/8 · loss 0.412" in text
    assert "▫️ *embed*" in text
    assert "elapsed 2m 05s" in text
    cancel = buttons(m["blocks"])[ids.CANCEL_RUN]
    assert cancel["style"] == "danger" and cancel["confirm"]["confirm"]["text"] == "Cancel run"


def test_failed_step_shows_cross_and_error():
    steps = {"ingest": {"state": "done"}, "validate": {"state": "failed", "error": "3 corrupt objects: s3://b/x.png"}}
    m = blocks.run_progress(run(state="failed"), steps, now=time.time())
    text = message_text(m)
    assert "❌ *validate*" in text and "3 corrupt objects" in text
    assert ids.CANCEL_RUN not in buttons(m["blocks"])     # nothing to cancel once it ended


def test_final_report_deployed_has_metrics_delta_worst_classes_and_rollback_with_confirm():
    r = run(state="succeeded", finished_at=time.time(), external_url="http://kfp.example/runs/1")
    rep = report(r.run_id, top1=0.9812, prod_top1=0.9790, decision="deploy", version=4)
    m = blocks.final_report(r, rep)
    assert_sendable(m)
    text = message_text(m)
    assert "98.12%" in text and "+0.22 pp vs production v3" in text
    assert "deployed as v4" in text
    worst = sorted(rep["metrics"]["per_class"].items(), key=lambda kv: kv[1])[:3]
    for cls, _ in worst:
        assert f"`{cls}`" in text.split("Worst classes")[1].split("\n")[1]
    assert "4000 images from 1 object(s)" in text and "46s" in text
    assert "`epochs=2`, the rest default" in text and "lr=" not in text   # only non-defaults
    assert "KFP run" in text
    assert "<@U0ALICE01>" in text                      # who triggered it, as a mention
    b = buttons(m["blocks"])
    assert set(b) == {ids.ROLLBACK, ids.VIEW_RUN, ids.RETRAIN}
    assert b[ids.ROLLBACK]["confirm"]["title"]["text"] == "Roll back production?"
    assert b[ids.ROLLBACK]["value"] == "4"


def test_final_report_held_offers_promote_anyway_with_confirm():
    r = run(state="succeeded", finished_at=time.time())
    rep = report(r.run_id, top1=0.9701, prod_top1=0.9790, decision="hold")
    m = blocks.final_report(r, rep)
    text = message_text(m)
    assert "held" in text and "-0.89 pp" in text and "regressed" in text
    b = buttons(m["blocks"])
    assert ids.PROMOTE in b and ids.ROLLBACK not in b
    assert b[ids.PROMOTE]["confirm"]["confirm"]["text"] == "Promote"
    assert b[ids.PROMOTE]["value"] == r.run_id


def test_final_report_of_failed_run_names_step_and_error_and_offers_no_promote():
    r = run(state="failed", finished_at=time.time())
    rep = {"run_id": r.run_id, "status": "failed", "failed_step": "validate",
           "error": "validate: label 12 out of range in s3://b/data/x.npz", "params": {}}
    m = blocks.final_report(r, rep)
    assert_sendable(m)
    text = message_text(m)
    assert "failed" in text and "validate" in text and "label 12 out of range" in text
    assert set(buttons(m["blocks"])) == {ids.VIEW_RUN, ids.RETRAIN}


def test_thread_details_tables_and_warnings():
    r = run(state="succeeded")
    m = blocks.thread_details(r, report(r.run_id, warnings=["class 7 has 3% fewer images", "2 duplicates"]))
    assert_sendable(m)
    text = message_text(m)
    assert "Step timings" in text and "41.0s" in text
    rep = report(r.run_id)
    rep["timings"] = dict(sorted(rep["timings"].items()))          # as stored: sort_keys=True
    timings = message_text(blocks.thread_details(r, rep)).split("Step timings")[1]
    assert [timings.index(s) for s in ("ingest", "validate", "train", "embed", "index", "evaluate")] == \
        sorted(timings.index(s) for s in ("ingest", "validate", "train", "embed", "index", "evaluate"))
    assert "Per-class kNN top-1" in text and "98.32%" in text    # class 0 = top1 + 0.002
    assert "Validation warnings (2)" in text and "2 duplicates" in text


def test_huge_inputs_stay_within_slack_limits():
    r = run(state="succeeded", reason="x" * 5000, params={f"p{i}": "y" * 100 for i in range(200)})
    rep = report(r.run_id, warnings=[f"warning {i}: " + "w" * 500 for i in range(200)],
                 reason="because " * 2000)
    rep["metrics"]["per_class"] = {str(c): 0.5 for c in range(500)}
    rep["timings"] = {f"step{i}": 1.0 for i in range(300)}
    for m in (blocks.final_report(r, rep), blocks.thread_details(r, rep),
              blocks.run_progress(r, {f"extra{i}": {"state": "done"} for i in range(300)}, time.time()),
              blocks.run_details(r, {}, time.time())):
        fitted = blocks.fit_message(m)
        assert_sendable(fitted)
        assert len(json.dumps(fitted["blocks"], ensure_ascii=False)) <= MAX_PAYLOAD   # characters
    details = message_text(blocks.thread_details(r, rep))
    assert "Validation warnings (200)" in details
    shown = details.count("• warning ")
    assert 1 <= shown <= 15 and f"…and {200 - shown} more" in details   # every warning accounted for


def test_runs_list_of_many_runs_fits():
    runs = [run(run_id=f"r-20261122-09{i:02d}-ab{i:02d}", state="succeeded", top1=0.98, decision="deploy",
                model_version=i + 1) for i in range(50)]
    m = blocks.runs_message(runs)
    assert_sendable(m)
    assert "r-20261122-0949-ab49" in message_text(m)


def test_new_data_alert_has_retrain_and_dismiss_and_lists_keys():
    found = NewData(keys=[f"data/new/{i}.npz" for i in range(20)], total_bytes=3 * 2**20,
                    fingerprint="sha256:" + "f" * 64, counts={"0": 12, "1": 9})
    m = blocks.new_data_alert(found, "alert-123")
    assert_sendable(m)
    text = message_text(m)
    assert "20 new" in text and "3.0 MB" in text and "data/new/0.npz" in text and "…and 12 more" in text
    assert "`0`:12" in text
    b = buttons(m["blocks"])
    assert b[ids.RETRAIN_NEW_DATA]["value"] == "alert-123" and b[ids.DISMISS_ALERT]["value"] == "alert-123"
    auto = blocks.new_data_alert(found, "alert-123", auto_retrain=True)
    assert buttons(auto["blocks"]) == {}


def test_resolved_drops_clicked_buttons_and_adds_note():
    r = run(state="succeeded", finished_at=time.time())
    m = blocks.final_report(r, report(r.run_id, decision="hold"))
    out = blocks.resolved(m["blocks"], "promoted by <@U0BOB0001>", drop=(ids.PROMOTE,))
    assert ids.PROMOTE not in buttons(out["blocks"]) and ids.RETRAIN in buttons(out["blocks"])
    assert out["blocks"][-1]["type"] == "actions"
    assert "promoted by <@U0BOB0001>" in message_text(out)


def test_user_text_is_escaped():
    m = blocks.error("bad value <script> & co")
    assert "&lt;script&gt; &amp; co" in m["blocks"][0]["text"]["text"]


def test_status_with_active_run_production_and_pending():
    status = {"active": run(), "steps": {"ingest": {"state": "done"}, "train": {"state": "running"}},
              "production": {"version": 3, "top1": 0.979, "updated_at": "2026-11-20T09:00:00+00:00"},
              "next_retrain": None, "schedule_paused": True, "pending": {"objects": 4, "bytes": 2048,
                                                                          "since": "2026-11-21T10:00:00+00:00"}}
    m = blocks.status_message(status)
    assert_sendable(m)
    text = message_text(m)
    assert "r-20261122-0912-ab12" in text and "now *train*" in text and "1/7 steps" in text
    assert "v3 · top-1 97.90%" in text and "*paused*" in text and "4 new object(s), 2.0 KB" in text


@pytest.mark.parametrize("n", [51, 120])
def test_fit_caps_raw_block_lists_and_keeps_the_buttons(n):
    raw = [{"type": "section", "text": {"type": "mrkdwn", "text": "s" * 4000},
            "fields": [{"type": "mrkdwn", "text": "f" * 2500}] * 12} for _ in range(n)]
    raw.append({"type": "actions", "elements": [{"type": "button", "action_id": "a",
                                                 "text": {"type": "plain_text", "text": "Go"}}]})
    assert check_limits(raw)                      # the checker sees every problem...
    out = fit(raw)
    assert check_limits(out) == []                # ...and fit repairs them
    assert len(out) <= MAX_BLOCKS and out[-1]["type"] == "actions"
    assert "left out to fit" in json.dumps(out)


def test_clip_closes_code_fences():
    text = "```" + "x" * 5000 + "```"
    clipped = clip(text, 3000)
    assert len(clipped) <= 3000 and clipped.count("```") % 2 == 0
