"""Property-based tests: whatever a user types and whatever a run produced, the command
parser answers specifically (no other exception escapes) and every message ctbot sends
stays within Slack's limits. The limits are restated here, not imported, so the check
does not share a bug with the code it checks."""
from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot import blocks
from bot.listeners.parse import UnknownSubcommand, UsageError, parse
from core.types import NewData, RunRecord
from steps.layout import STEPS
from steps.params import TrainParams

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text people paste: unicode digits (²٣), emoji, mrkdwn control characters, long runs.
weird = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=400)
words = st.lists(st.one_of(st.sampled_from(["train", "runs", "rollback", "deploy", "cancel", "status", "data",
                                            "schedule", "pause", "resume", "help", "v3", "²", "٣", "epochs=²",
                                            "lr=nan", "epochs=1e9", "preset=v0", "preset=nope", "=", "a=b=c",
                                            "`r-1`", "&lt;", "<@U1>", "*bold*"]),
                           st.text(alphabet=string.printable, max_size=30), weird), max_size=8)


def slack_limits_broken(msg: dict) -> list[str]:
    """Slack's documented limits for one message (plus our 12k-character payload cap)."""
    out = []
    bl = msg.get("blocks") or []
    if not (msg.get("text") or "").strip():
        out.append("empty text")
    if len(bl) > 50:
        out.append("over 50 blocks")
    if len(json.dumps(bl, ensure_ascii=False)) > 12000:
        out.append("payload over 12k characters")
    for b in bl:
        t = b.get("type")
        text = (b.get("text") or {}).get("text", "") if isinstance(b.get("text"), dict) else ""
        if t == "section":
            if len(text) > 3000:
                out.append("section text over 3000")
            if len(b.get("fields") or []) > 10:
                out.append("over 10 fields")
            out += ["field over 2000" for f in b.get("fields") or [] if len(f.get("text", "")) > 2000]
        elif t == "header" and len(text) > 150:
            out.append("header over 150")
        elif t == "actions" and len(b.get("elements") or []) > 25:
            out.append("over 25 elements")
        elif t == "context" and len(b.get("elements") or []) > 10:
            out.append("context over 10 elements")
    return out


@PROPS
@given(st.one_of(weird, words.map(" ".join)))
def test_the_parser_answers_any_text_specifically(text):
    try:
        p = parse(text, "/ct")
    except (UsageError, UnknownSubcommand):
        return
    if p.sub == "runs":
        assert 1 <= p.n <= 1000
    if p.sub == "rollback" and p.version is not None:
        assert p.version >= 1
    if p.sub == "train":
        try:
            TrainParams.parse_tokens(p.args)
        except ValueError as e:
            assert str(e)               # a message a user can act on


@PROPS
@given(st.sampled_from(["runs", "rollback", "rollback v"]), st.sampled_from("²³¹٣۴߅໒༣၄႕០᠑１𝟘𝟙"))
def test_unicode_digits_get_a_usage_error_not_a_crash(sub, digit):
    try:
        parse(f"{sub}{'' if sub.endswith('v') else ' '}{digit}", "/ct")
    except UsageError as e:
        assert "not a" in str(e)
    else:
        raise AssertionError(f"{sub} {digit} was accepted")


# ---- the Block Kit builders -------------------------------------------------------------

ids = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=60)
floats = st.one_of(st.floats(0, 1), st.none())
per_class = st.dictionaries(st.sampled_from([str(c) for c in range(10)] + ["x" * 200]), st.floats(0, 1),
                            max_size=12)
params = st.dictionaries(st.sampled_from(TrainParams.valid_keys()), st.one_of(st.integers(), weird, st.floats(0, 10)),
                         max_size=20)
states = st.sampled_from(["queued", "running", "succeeded", "failed", "canceled"])


@st.composite
def runs(draw):
    return RunRecord(run_id=draw(ids), model=draw(ids), trigger=draw(st.sampled_from(["manual", "weekly", "new_data"])),
                     reason=draw(weird), requested_by=draw(st.one_of(ids, st.just("U0ALICE01"))),
                     params=draw(params), data_uris=draw(st.lists(weird, max_size=50)), state=draw(states),
                     created_at=draw(st.floats(0, 2e9)), started_at=draw(st.one_of(st.none(), st.floats(0, 2e9))),
                     finished_at=draw(st.one_of(st.none(), st.floats(0, 2e9))),
                     slack_channel=draw(st.sampled_from(["", "C0CT"])), slack_ts=draw(st.sampled_from(["", "1.2"])),
                     external_url=draw(st.sampled_from(["", "https://kfp.example/#/runs/details/x"])),
                     progress=draw(st.dictionaries(st.sampled_from(STEPS), states, max_size=7)),
                     decision=draw(st.sampled_from(["", "deploy", "hold"])), decision_reason=draw(weird),
                     top1=draw(floats), model_version=draw(st.one_of(st.none(), st.integers(1, 10**6))),
                     error=draw(weird), failed_step=draw(st.sampled_from(["", *STEPS])))


@st.composite
def reports(draw):
    n = draw(st.integers(0, 12))
    return {"run_id": draw(ids), "model": draw(ids), "status": draw(states), "params": draw(params),
            "data": {"n": draw(st.integers(0, 10**7)), "counts": draw(st.dictionaries(weird, st.integers(), max_size=30)),
                     "sources": [{"uri": draw(weird), "size": 1}] * draw(st.integers(0, 100)),
                     "fingerprint": draw(weird)},
            "eval": {"uri": draw(weird), "n": draw(st.integers(0, 10**6))},
            "validation": {"warnings": draw(st.lists(weird, max_size=40))},
            "timings": draw(st.dictionaries(st.sampled_from(STEPS), st.floats(0, 1e5), max_size=7)),
            "total_seconds": draw(st.one_of(st.none(), st.floats(0, 1e6))),
            "metrics": {"top1": draw(floats), "per_class": draw(per_class),
                        "confusion": [[draw(st.integers(0, 10**6))] * n for _ in range(n)]},
            "production": draw(st.one_of(st.none(), st.fixed_dictionaries({"version": st.integers(1, 99),
                                                                           "top1": st.floats(0, 1)}))),
            "decision": draw(st.sampled_from(["", "deploy", "hold"])), "reason": draw(weird),
            "model_version": draw(st.one_of(st.none(), st.integers(1, 99))),
            "failed_step": draw(st.sampled_from([None, *STEPS])), "error": draw(st.one_of(st.none(), weird))}


step_docs = st.dictionaries(st.sampled_from(STEPS), st.fixed_dictionaries({
    "state": st.sampled_from(["running", "done", "failed", "skipped"]), "seconds": st.one_of(st.none(), st.floats(0, 1e5)),
    "summary": st.dictionaries(st.sampled_from(["epoch", "epochs", "loss", "val_top1", "n", "reason", "top1"]),
                               st.one_of(st.integers(0, 10**6), st.floats(0, 10), weird), max_size=7),
    "error": st.one_of(st.none(), weird)}), max_size=7)


def sent(msg: dict) -> dict:
    """What a builder's message becomes on its way out (the notifier and listeners fit it)."""
    out = blocks.fit_message(msg)
    assert slack_limits_broken(out) == [], slack_limits_broken(out)
    return out


@PROPS
@given(runs(), step_docs, st.floats(0, 2e9))
def test_run_progress_and_details_fit(run, steps, now):
    sent(blocks.run_progress(run, steps, now))
    sent(blocks.run_details(run, steps, now))


@PROPS
@given(runs(), reports())
def test_final_report_and_thread_details_fit(run, report):
    sent(blocks.final_report(run, report))
    sent(blocks.thread_details(run, report))


@PROPS
@given(st.lists(runs(), max_size=60), runs(), step_docs)
def test_overviews_fit(many, active, steps):
    status = {"active": active, "steps": steps, "production": {"version": 3, "top1": 0.99, "updated_at": "x"},
              "next_retrain": None, "schedule_paused": False, "pending": {"objects": 5, "bytes": 10}}
    sent(blocks.status_message(status))
    sent(blocks.runs_message(many))
    sent(blocks.schedule_message(status))


@PROPS
@given(st.lists(weird, min_size=1, max_size=300), st.integers(0, 10**12), weird, ids)
def test_new_data_alert_fits(keys, size, fp, alert_id):
    msg = sent(blocks.new_data_alert(NewData(keys=keys, total_bytes=size, fingerprint=fp), alert_id))
    sent(blocks.resolved(msg["blocks"], "note " * 1000))


@PROPS
@given(weird, weird)
def test_replies_fit(text, hint):
    sent(blocks.error(text * 20, hint))
    sent(blocks.info(text * 20, hint))
    sent(blocks.working(text))
    sent(blocks.unknown_subcommand("/ct", text, [text] * 5))


# ---- the cockpit: the training form, the Home tab, /ct history --------------------------------

def view_limits_broken(view: dict) -> list[str]:
    """Slack's limits for a modal or Home tab: 100 blocks, 24-character titles, input labels
    and hints of plain text, unique block ids, private_metadata of 3000 characters."""
    out = [p for p in slack_limits_broken({"text": "x", "blocks": []})]
    bl = view.get("blocks") or []
    if len(bl) > 100:
        out.append("over 100 blocks")
    if len(json.dumps(view, ensure_ascii=False)) > 250_000:
        out.append("view over 250 kB")
    ids_ = [b["block_id"] for b in bl if b.get("block_id")]
    if len(ids_) != len(set(ids_)):
        out.append("duplicate block ids")
    for key in ("title", "submit", "close"):
        if key in view and len(view[key]["text"]) > 24:
            out.append(f"{key} over 24")
    if len(view.get("private_metadata") or "") > 3000:
        out.append("private_metadata over 3000")
    for b in bl:
        if b.get("type") == "input":
            if len(b["label"]["text"]) > 2000 or len((b.get("hint") or {}).get("text", "")) > 2000:
                out.append("input label or hint over 2000")
            options = b["element"].get("options")
            if options is not None and not 1 <= len(options) <= 100:
                out.append("a select needs 1-100 options")
            if any(len(o["text"]["text"]) > 75 or len(o["value"]) > 150 for o in options or []):
                out.append("option text over 75 or value over 150")
        elif b.get("type") == "section":
            out += slack_limits_broken({"text": "x", "blocks": [b]})
            if b.get("accessory") and len(b["accessory"]["text"]["text"]) > 75:
                out.append("button text over 75")
    return out


moves = st.fixed_dictionaries({"action": st.sampled_from(["deploy", "promote", "rollback", weird]),
                               "by": st.one_of(ids, st.just("U0ALICE01")), "at": st.one_of(weird, st.none())},
                              optional={"approved_by": ids, "from": st.integers(1, 99)})
version_rows = st.lists(st.fixed_dictionaries({
    "version": st.integers(1, 10**6), "top1": floats, "run_id": st.one_of(ids, weird, st.none()),
    "moves": st.lists(moves, min_size=1, max_size=40), "available": st.booleans(), "production": st.booleans()}),
    max_size=12)
histories = st.fixed_dictionaries({
    "production": st.one_of(st.none(), st.fixed_dictionaries({"version": st.integers(1, 99), "top1": floats,
                                                              "updated_at": weird})),
    "versions": version_rows, "last_move": st.one_of(st.none(), moves)})


@PROPS
@given(st.lists(runs(), max_size=12), st.one_of(st.none(), runs()), step_docs, histories,
       st.lists(runs(), max_size=6), st.sets(st.sampled_from(["train", "cancel", "approve", "rollback", "schedule",
                                                              "deploy"])),
       st.one_of(st.none(), st.fixed_dictionaries({"text": weird, "ok": st.booleans()})), st.booleans())
def test_home_tab_fits_a_view(many, active, steps, history, waiting, can, notice, paused):
    status = {"active": active, "steps": steps, "production": history["production"], "next_retrain": None,
              "schedule_paused": paused, "pending": {"objects": 5, "bytes": 10},
              "serving": {"url": "http://m", "versions": [3], "error": ""}}
    view = blocks.home_view(status, many, history, waiting, can, viewer="U0ALICE01", notice=notice)
    assert view["type"] == "home" and view_limits_broken(view) == []
    shown = {e.get("action_id") for b in view["blocks"]
             for e in (b.get("elements") or []) + ([b["accessory"]] if b.get("accessory") else [])}
    if "rollback" not in can:
        assert "ct_home_rollback_to" not in shown
    if "approve" not in can:
        assert not shown & {"ct_approve_deploy", "ct_reject_deploy"}
    if "train" not in can:
        assert "ct_home_train" not in shown


@PROPS
@given(histories, st.sampled_from(["/ct", "/" + "x" * 40]))
def test_history_message_fits(history, command):
    sent(blocks.history_message(history, command))


@PROPS
@given(st.dictionaries(st.sampled_from(TrainParams.valid_keys() + ["new_knob", "x" * 100]),
                       st.fixed_dictionaries({"type": st.sampled_from(["int", "float", "str"]),
                                              "default": st.one_of(st.integers(), st.floats(0, 1e9), weird),
                                              "range": st.one_of(st.lists(weird, min_size=1, max_size=30),
                                                                 st.tuples(st.floats(0, 1), st.floats(1, 1e9))
                                                                 .map(list)),
                                              "help": weird}), max_size=30),
       st.dictionaries(ids, st.dictionaries(ids, st.integers(), max_size=12), max_size=120), weird)
def test_train_form_fits_a_modal(params, presets, where):
    from bot.blocks.forms import train_form
    view = train_form(params, presets, private_metadata={"c": "C0CT", "r": where[:500]})
    assert view_limits_broken(view) == []


@PROPS
@given(weird, weird)
def test_other_command_answer_fits(command, served):
    sent(blocks.other_command(command, served))


@PROPS
@given(runs(), reports(), st.lists(st.fixed_dictionaries({
    "trial": st.integers(0, 100), "state": st.sampled_from(["done", "failed", None]),
    "seconds": st.one_of(st.none(), st.floats(0, 1e6)), "val_top1": st.one_of(st.none(), st.floats(0, 1), weird),
    "params": st.one_of(st.none(), params)}), min_size=1, max_size=64))
def test_a_sweeps_report_fits(run, report, trials):
    sent(blocks.final_report(run, {**report, "trials": trials}))
