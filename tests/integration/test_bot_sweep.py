"""`/ct sweep key=v1,v2 …` over signed HTTP: the product of the value lists, checked
before anything starts, submitted as one run's sweep; its report carries a trials table
and a chart of validation top-1 by trial in its thread. (The local runner running a
sweep's trials through the pipeline is tests/integration/test_pipeline_local.py.)"""
from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from steps import layout
from tests.recording import finish_run
from tests.slack_helpers import ALICE, message_text, write_step


def test_a_sweep_submits_every_combination_as_one_run(bot):
    reply = bot.slash("sweep lr=0.002,0.005 layers=c16,p,c32,p,c64,c64,f|c16,p,c32,p,c64,c64,p,f")
    assert "Starting a sweep" in reply.text
    answer = message_text(bot.responses(reply)[-1])
    (submit,) = bot.runner.submits
    trials = submit["sweep"]
    assert [t["trial"] for t in trials] == [0, 1, 2, 3]
    assert [(t["params"]["lr"], t["params"]["layers"]) for t in trials] == [
        (0.002, "c16,p,c32,p,c64,c64,f"), (0.002, "c16,p,c32,p,c64,c64,p,f"),
        (0.005, "c16,p,c32,p,c64,c64,f"), (0.005, "c16,p,c32,p,c64,c64,p,f")]
    assert f"Started sweep run `{submit['run_id']}` with 4 trials" in answer
    assert bot.service.get_run(submit["run_id"]).requested_by == ALICE


@pytest.mark.parametrize("text, expected", [
    ("sweep lr=1e-3,2e-3,3e-3 seed=0,1,2", "That sweep makes 9 combinations; at most 8 are allowed (sweep.max_trials)."),
    ("sweep epochs=2,1000", "Trial 2 (epochs=1000): epochs=1000 is out of range [1, 200]"),
    ("sweep nope=1,2", "Trial 1 (nope=1): unknown training parameter(s): nope"),
    ("sweep", "`/ct sweep` needs at least one `key=v1,v2`."),
    ("sweep lr=0.1", "A sweep needs a key with two or more values"),
    ("sweep lr 0.1,0.2", "Malformed sweep parameter(s): “lr”, “0.1,0.2”."),
])
def test_a_bad_sweep_is_refused_before_anything_starts(bot, text, expected):
    reply = bot.slash(text)
    assert reply.status == 200 and expected in reply.text, reply.text
    assert bot.runner.submits == [] and bot.standin.calls("response") == []


def test_the_sweeps_report_has_its_trials_table_and_chart(bot):
    bot.responses(bot.slash("sweep lr=0.002,0.004,0.008"))
    (submit,) = bot.runner.submits
    run_id = submit["run_id"]
    report = finish_run(bot.store, bot.runner, run_id, decision="deploy", version=1, top1=0.99)
    report["trials"] = [{"trial": i, "state": "done", "seconds": 30.0 + i, "val_top1": v,
                         "params": {**report["params"], "lr": lr}}
                        for i, (lr, v) in enumerate([(0.002, 0.981), (0.004, 0.987), (0.008, 0.979)])]
    bot.store.put_json(layout.report_key(run_id), report)
    run = bot.service.refresh(run_id)
    text = message_text(bot.standin.message(bot.channel, run.slack_ts).to_payload())
    assert "*Sweep: 3 trials*" in text
    table = text[text.index("trial  parameters"):]
    rows = [" ".join(line.split()) for line in table.splitlines()[2:5]]
    assert rows == ["0 lr=0.002 98.10% 30s done", "★ 1 lr=0.004 98.70% 31s done", "2 lr=0.008 97.90% 32s done```"]
    thread = bot.standin.thread(bot.channel, run.slack_ts)
    files = {f["name"]: f for m in thread for f in m.files}
    chart = files[f"sweep-{run_id}.png"]
    assert chart["title"] == f"Validation top-1 by trial, run {run_id}"
    png = next(v["bytes"] for v in bot.standin.uploaded().values() if v["name"] == chart["name"])

    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size[0] > 3 * 48 and (46, 182, 125) in {c for _, c in img.getcolors(1 << 16)}   # the winner's bar
    assert f"confusion-{run_id}.png" in files                          # the matrix still comes too


def test_chromium_renders_the_trials_table_and_chart(bot, tmp_path):
    from tests.integration.test_slack_page import browse
    test_the_sweeps_report_has_its_trials_table_and_chart(bot)
    page = bot.standin.save_html(tmp_path / "site" / "sweep.html")
    shot = tmp_path / "site" / "sweep.png"
    browse(page, tmp_path, f"--screenshot={shot}")
    dom = browse(page, tmp_path, "--dump-dom").stdout
    assert "<b>Sweep: 3 trials</b>" in dom and "★ 1" in dom
    assert any("-sweep-" in src for src in re.findall(r'<img[^>]*\bsrc="([^"]+)"', dom))
    img = Image.open(shot).convert("RGB")
    assert (46, 182, 125) in {c for _, c in img.getcolors(1 << 20)}      # the chart's winning bar is on screen


def test_the_run_message_shows_each_trials_progress(bot):
    bot.responses(bot.slash("sweep lr=0.002,0.004"))
    run_id = bot.runner.submits[0]["run_id"]
    write_step(bot.store, run_id, "ingest", "done", 0.3)
    write_step(bot.store, run_id, "train", "running", epoch=1, epochs=2, trial=1)
    write_step(bot.store, run_id, "train-trial-0", "done", 20.0, epoch=2, epochs=2, val_top1=0.981)
    write_step(bot.store, run_id, "train-trial-1", "running", epoch=1, epochs=2, loss=0.52)
    run = bot.service.refresh(run_id)
    bot.standin.wait_for("chat.update", where=lambda a: a.get("ts") == run.slack_ts)
    lines = message_text(bot.standin.message(bot.channel, run.slack_ts).to_payload()).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("⏳ *train*"))
    assert lines[at + 1] == "    ✅ *train-trial-0* · 20s · epoch 2/2 · val top-1 0.981"
    assert lines[at + 2] == "    ⏳ *train-trial-1* · epoch 1/2 · loss 0.520"
    assert lines[at + 3].startswith("▫️ *embed*")
