"""TrainParams: coercion of KFP/Slack input, clear errors, and a torch-free import path."""
import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steps.params import TrainParams


def test_defaults_are_valid_and_round_trip():
    p = TrainParams()
    p.check()
    assert TrainParams.from_dict(p.to_dict()) == p
    assert p.embedding_dim == 128


def test_from_dict_coerces_kfp_floats_and_slack_strings():
    p = TrainParams.from_dict({"epochs": 3.0, "batch_size": "64", "lr": "0.01", "seed": "7",
                               "lr_schedule": "Cosine", "margin": 0.3, "augment_shift": None})
    assert (p.epochs, p.batch_size, p.lr, p.seed, p.lr_schedule) == (3, 64, 0.01, 7, "cosine")
    assert isinstance(p.epochs, int) and isinstance(p.batch_size, int)
    assert p.augment_shift == TrainParams().augment_shift  # None keeps the default


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ValueError) as e:
        TrainParams.from_dict({"epoch": 3, "learning_rate": 0.1})
    msg = str(e.value)
    assert "epoch, learning_rate" in msg and "valid:" in msg and "batch_size" in msg


@pytest.mark.parametrize("key,value,needle", [
    ("epochs", 0, "epochs=0 is out of range [1, 200]"),
    ("lr", 5, "lr=5.0 is out of range"),
    ("lr_schedule", "step", "must be one of onecycle, cosine, none"),
    ("epochs", 2.5, "`epochs` must be an int, got `2.5`"),
    ("batch_size", "many", "`batch_size` must be an int, got `many`"),
    ("device", "tpu", "device='tpu' must be one of auto, cpu, cuda"),
])
def test_bad_values_say_what_is_allowed(key, value, needle):
    with pytest.raises(ValueError, match=None) as e:
        TrainParams.from_dict({key: value})
    assert needle in str(e.value)


def test_describe_lists_every_field_with_type_default_range_help():
    d = TrainParams.describe()
    assert set(d) == set(TrainParams.valid_keys())
    assert d["epochs"] == {"type": "int", "default": TrainParams().epochs, "range": [1, 200],
                           "help": d["epochs"]["help"]} and d["epochs"]["help"]
    assert d["lr_schedule"]["range"] == ["onecycle", "cosine", "none"]
    json.dumps(d)  # must be JSON-serialisable for the bot


def test_bot_side_modules_do_not_import_torch_or_faiss():
    code = ("import sys, steps, steps.storage, steps.params, steps.deploy, steps.ingest, "
            "steps.validate, steps.synthetic; "
            "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- strict parameters: one value per key, ASCII numbers only -----------------------------

@pytest.mark.parametrize("tokens,needle", [
    (["epochs=1", "epochs=2"], "`epochs` is given twice (`epochs=1`, `epochs=2`)"),
    (["Epochs=1", "lr=0.1", "epochs=1"], "`epochs` is given twice"),
    (["preset=fast", "preset=v0"], "two presets given (`preset=fast`, `preset=v0`)"),
    (["preset=fast", "preset=fast"], "two presets given"),
])
def test_a_repeated_key_is_an_error_naming_it(tokens, needle):
    with pytest.raises(ValueError) as e:
        TrainParams.parse_tokens(tokens)
    assert needle in str(e.value)


@pytest.mark.parametrize("key,text", [
    ("epochs", "３"),          # full-width digit
    ("epochs", "٣"),           # Arabic-Indic digit
    ("epochs", "3_0"),         # Python's digit grouping
    ("epochs", "1e1"),         # an exponent is for floats
    ("epochs", "3.0"),         # so is a decimal point, in text
    ("epochs", "²"),
    ("epochs", "0x10"),
    ("seed", "- 3"),
    ("lr", "０.01"),
    ("lr", "1_0e-3"),
    ("lr", "nan"),
    ("lr", "inf"),
    ("lr", "1e"),
    ("lr", "."),
    ("lr", "٠.٠١"),
])
def test_numbers_in_text_are_ascii_only_and_the_error_quotes_them(key, text):
    with pytest.raises(ValueError) as e:
        TrainParams.parse_tokens([f"{key}={text}"])
    assert f"got `{text}`" in str(e.value) and "ASCII" in str(e.value)


@pytest.mark.parametrize("tokens,expected", [
    (["epochs=3"], {"epochs": 3}), (["epochs=+3"], {"epochs": 3}), (["seed=007"], {"seed": 7}),
    (["lr=0.01"], {"lr": 0.01}), (["lr=1e-3"], {"lr": 1e-3}), (["lr=.5"], {"lr": 0.5}),
    (["lr=5E-3"], {"lr": 5e-3}), (["margin=+0.3"], {"margin": 0.3}), (["lr=1."], {"lr": 1.0}),
])
def test_ascii_numbers_are_read(tokens, expected):
    assert TrainParams.parse_tokens(tokens) == expected


def test_kfp_floats_still_coerce_to_ints():
    assert TrainParams.from_dict({"epochs": 3.0}).epochs == 3
    assert TrainParams.from_dict({"epochs": 3}).epochs == 3


INT_KEYS = [k for k, d in TrainParams.describe().items() if d["type"] == "int"]
FLOAT_KEYS = [k for k, d in TrainParams.describe().items() if d["type"] == "float"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(INT_KEYS), st.text(min_size=1, max_size=12).filter(lambda t: "=" not in t))
def test_an_int_key_takes_only_ascii_digits(key, text):
    """Whatever is typed, an int key is read only from [+-]?[0-9]+, and to that number."""
    text = text.strip()
    try:
        got = TrainParams.parse_tokens([f"{key}={text}"])
    except ValueError as e:
        assert str(e)
        return
    assert re.fullmatch(r"[+-]?[0-9]+", text, re.ASCII), text
    assert got == {key: int(text)}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FLOAT_KEYS), st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1,
                                            max_size=12).filter(lambda t: "=" not in t))
def test_a_float_key_takes_only_ascii_decimal_text(key, text):
    text = text.strip()
    try:
        got = TrainParams.parse_tokens([f"{key}={text}"])
    except ValueError:
        return
    assert text.isascii() and re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text), text
    assert got == {key: float(text)}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(INT_KEYS), st.integers(-10**6, 10**6), st.sampled_from(["0123456789", "０１２３４５６７８９",
                                                                              "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९"]))
def test_an_int_in_another_scripts_digits_is_refused(key, n, digits):
    text = str(n).translate(str.maketrans("0123456789", digits))
    if digits == "0123456789":
        try:
            assert TrainParams.parse_tokens([f"{key}={text}"]) == {key: n}
        except ValueError as e:
            assert "out of range" in str(e)
    else:
        with pytest.raises(ValueError, match="ASCII"):
            TrainParams.parse_tokens([f"{key}={text}"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(TrainParams.valid_keys() + ["preset"]), min_size=2, max_size=6).filter(
    lambda ks: len(set(ks)) < len(ks)))
def test_any_repeated_key_is_refused(keys):
    tokens = [f"{k}=1" for k in keys]
    with pytest.raises(ValueError) as e:
        TrainParams.parse_tokens(tokens)
    assert "twice" in str(e.value) or "two presets" in str(e.value)


def test_mode_warm_brings_preset_warms_schedule_under_explicit_keys():
    from steps.params import PRESETS
    p = TrainParams.from_dict({"mode": "warm"})
    assert (p.epochs, p.lr, p.warmup, p.val_fraction) == (1, 1e-3, 0.1, 0.0) == tuple(
        PRESETS["warm"][k] for k in ("epochs", "lr", "warmup", "val_fraction"))
    assert TrainParams.from_dict({"mode": "warm", "val_fraction": 0.05}).val_fraction == 0.05
    assert TrainParams.parse_tokens(["mode=warm", "lr=2e-3"]) == {**PRESETS["warm"], "lr": 2e-3}
    assert TrainParams.from_dict({"mode": "full"}).epochs == 4    # full keeps the defaults


def test_freeze_needs_mode_warm_and_a_conv_layer_left_to_train():
    assert TrainParams.from_dict({"mode": "warm", "freeze": 2}).freeze == 2
    with pytest.raises(ValueError, match="freeze=1 keeps the first layers as they start.*use it with mode=warm"):
        TrainParams.from_dict({"freeze": 1}).check()
    with pytest.raises(ValueError, match=r"freeze=4 would leave no conv layer to train: "
                                         r"layers=c16,p,c32,p,c64,c64,p,f has 4"):
        TrainParams.from_dict({"mode": "warm", "freeze": 4}).check()
