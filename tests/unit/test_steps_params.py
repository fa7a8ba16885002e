"""TrainParams: coercion of KFP/Slack input, clear errors, and a torch-free import path."""
import json
import subprocess
import sys

import pytest

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
