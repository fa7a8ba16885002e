"""The training form over signed HTTP: `/ct train` alone opens it (views.open with the
command's trigger_id), a bad submission gets errors next to its fields, a good one
starts exactly one run, as `/ct train key=value …` would."""
from __future__ import annotations

from bot import ids
from bot.blocks.forms import FEATURED, MORE_BLOCK, PRESET_BLOCK, field_block
from core.config import AccessSection
from tests.slack_helpers import ALICE, BOB, message_text, start_bot


def open_form(bot, user=ALICE) -> dict:
    trigger = bot.standin.new_trigger(user)
    reply = bot.slash("train", user=user, trigger_id=trigger)
    assert reply.status == 200 and reply.body in ("", {})        # nothing to show: the form is the answer
    (call,) = bot.standin.wait_for("views.open", where=lambda a: a["trigger_id"] == trigger)
    (modal,) = bot.standin.modals(user)
    return {"reply": reply, "call": call, "modal": modal}


def test_train_alone_opens_the_form_with_the_commands_trigger(bot):
    opened = open_form(bot)
    view = opened["modal"]["view"]
    assert view["callback_id"] == ids.TRAIN_FORM and view["title"]["text"] == "Train a model"
    inputs = {b["block_id"]: b for b in view["blocks"] if b["type"] == "input"}
    assert list(inputs) == [PRESET_BLOCK, *[field_block(n) for n in FEATURED], MORE_BLOCK]
    epochs = inputs[field_block("epochs")]
    assert epochs["element"]["initial_value"] == "4" and epochs["hint"]["text"].startswith("1 to 200 · default 4")
    assert inputs[field_block("lr")]["element"]["initial_value"] == "0.005"
    presets = [o["value"] for o in inputs[PRESET_BLOCK]["element"]["options"]]
    from steps.params import PRESETS
    assert presets == ["-", *PRESETS] and {"fast", "v0"} <= set(presets)   # every preset, as TrainParams has them
    # Every other parameter is named in the free field's hint: a new one shows up there.
    assert "augment_rotate (0 to 45, default 8)" in inputs[MORE_BLOCK]["hint"]["text"]
    assert bot.runner.submits == []


def test_a_bad_submission_gets_errors_next_to_its_fields(bot):
    view_id = open_form(bot)["modal"]["id"]
    out = bot.standin.submit_view(bot.url, view_id, {field_block("epochs"): "1000", field_block("lr"): "fast",
                                                     MORE_BLOCK: "foo=1"})
    assert out["status"] == 200
    errors = out["errors"]
    assert set(errors) == {field_block("epochs"), field_block("lr"), MORE_BLOCK}
    assert errors[field_block("epochs")] == "epochs=1000 is out of range [1, 200]"
    assert errors[field_block("lr")].startswith("`lr` must be a float, got `fast`")
    assert out["errors"][MORE_BLOCK].startswith("unknown training parameter(s): foo; valid: epochs")
    assert bot.standin.modals(ALICE)[0]["open"] and bot.runner.submits == []
    # A field set twice, and a malformed token, are named too.
    for more, expected in (("epochs=3", "Set epochs in its own field."),
                           ("lr = 0.1", "Write each as key=value with no spaces around =: lr, =, 0.1")):
        assert bot.standin.submit_view(bot.url, view_id, {MORE_BLOCK: more})["errors"] == {MORE_BLOCK: expected}
    assert bot.runner.submits == []


def test_a_good_submission_starts_one_run_once(bot):
    view_id = open_form(bot)["modal"]["id"]
    values = {PRESET_BLOCK: "v0", field_block("epochs"): "2", MORE_BLOCK: "augment_rotate=5\nema=0.99"}
    out = bot.standin.submit_view(bot.url, view_id, values)
    assert out["status"] == 200 and out["body"] in ("", {}) and out["errors"] == {}
    assert bot.standin.modals(ALICE) == []                        # closed
    started = bot.standin.wait_for("response", where=lambda a: "Started run" in message_text(a))
    (submit,) = bot.runner.submits
    params = submit["params"]
    # The preset under the fields: epochs from the form, lr from v0 (left at its default in the form).
    assert (params["epochs"], params["lr"], params["augment_rotate"], params["ema"]) == (2, 4e-3, 5.0, 0.99)
    assert submit["requested_by"] == ALICE and f"`{submit['run_id']}`" in message_text(started[0].args)
    # Slack delivering the same submission again starts nothing more.
    bot.standin.submit_view(bot.url, view_id, values)
    bot.slash("status")
    assert len(bot.runner.submits) == 1
    assert [e["action"] for e in bot.state.read_audit(20)].count("train_requested") == 1


def test_who_may_not_train_gets_no_form(tmp_path, redis_url):
    b = start_bot(tmp_path, redis_url, access=AccessSection(train=[ALICE]))
    try:
        reply = b.slash("train", user=BOB)
        assert reply.status == 200 and "You may not start training runs" in reply.text
        assert b.standin.calls("views.open") == [] and b.runner.submits == []
    finally:
        b.close()


def test_train_with_parameters_is_unchanged(bot):
    reply = bot.slash("train epochs=2")
    assert "Starting a training run" in reply.text
    bot.standin.wait_for("response", where=lambda a: "Started run" in message_text(a))
    assert bot.runner.submits[0]["params"]["epochs"] == 2 and bot.standin.calls("views.open") == []


def test_chromium_renders_the_form_with_its_errors(bot, tmp_path):
    from PIL import Image, ImageStat

    from tests.integration.test_slack_page import browse
    view_id = open_form(bot)["modal"]["id"]
    bot.standin.submit_view(bot.url, view_id, {field_block("epochs"): "1000"})
    page = bot.standin.save_view_html(tmp_path / "site" / "train-form.html", view_id=view_id)
    shot = tmp_path / "site" / "train-form.png"
    browse(page, tmp_path, f"--screenshot={shot}")
    dom = browse(page, tmp_path, "--dump-dom").stdout
    assert "Train a model" in dom and "Start run" in dom and "Learning rate (lr)" in dom
    assert 'class="b-input has-error"' in dom and "epochs=1000 is out of range [1, 200]" in dom
    assert '<div class="f-input">1000</div>' in dom                 # what the user typed stays
    assert dom.count('class="b-input"') + dom.count('class="b-input has-error"') == 2 + len(FEATURED)
    img = Image.open(shot).convert("RGB")
    assert max(ImageStat.Stat(img).stddev) > 20      # not blank
    # The error's colour (#e01e5a) is on screen.
    assert any(n > 50 for n, c in img.getcolors(1 << 20) if all(abs(a - b) <= 8 for a, b in zip(c, (224, 30, 90),
                                                                                                  strict=True)))
