"""The training form (a modal): a preset, the parameters that matter most, and a free
"more key=value" field, all built from ``TrainParams.describe()`` so a new parameter
shows up in it (in the more field's list) without editing this module.

Pure: the builder, and ``form_tokens`` which turns a submission back into the
``key=value`` tokens `/ct train` takes, with errors per field.
"""
from __future__ import annotations

import json

from slack_sdk.models.blocks import (
    InputBlock,
    Option,
    PlainTextInputElement,
    PlainTextObject,
    StaticSelectElement,
)

from bot import ids
from bot.blocks.common import context, section
from bot.blocks.limits import clip

# The parameters that get a field of their own, in this order; every other parameter of
# TrainParams.describe() is listed under the "more" field.
FEATURED = ("epochs", "lr", "margin", "batch_size", "seed")
LABELS = {"epochs": "Epochs", "lr": "Learning rate", "margin": "ArcFace margin", "batch_size": "Batch size",
          "seed": "Seed"}
PRESET_BLOCK, MORE_BLOCK, VALUE = "preset", "more", "value"
NO_PRESET = "-"


def field_block(name: str) -> str:
    return f"p_{name}"


def _shown(value) -> str:
    """A default as a person types it: 0.005, not 5e-03."""
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.10f}".rstrip("0").rstrip(".") if 1e-4 <= abs(value) < 1e6 else repr(value)
    return str(value)


def range_text(d: dict) -> str:
    rng = d.get("range") or []
    if rng and isinstance(rng[0], str):
        return "one of " + ", ".join(rng) if len(rng) <= 4 else f"one of {len(rng)} choices (help lists them)"
    return f"{_shown(rng[0])} to {_shown(rng[1])}" if len(rng) == 2 else ""


def train_form(params: dict, presets: dict, *, private_metadata: dict | None = None,
               command: str = "/ct") -> dict:
    """The modal view. ``params`` is TrainParams.describe(), ``presets`` PRESETS."""
    options = [Option(value=NO_PRESET, text="none: the defaults")] + \
        [Option(value=name, text=clip(f"{name}: " + ", ".join(f"{k}={_shown(v)}" for k, v in keys.items()), 75))
         for name, keys in list(presets.items())[:99] if len(name) <= 150]   # Slack: 100 options
    blocks = [section("Starts one training run, like "
                      f"`{command} train key=value …`. Fields left at their default take the preset's value.")]
    blocks.append(InputBlock(block_id=PRESET_BLOCK, label="Preset", optional=False,
                             element=StaticSelectElement(action_id=VALUE, options=options, initial_option=options[0]),
                             hint="A named set of parameters; the fields below and the more field go on top.")
                  .to_dict())
    for name in FEATURED:
        if name not in params:
            continue
        d = params[name]
        hint = f"{range_text(d)} · default {_shown(d['default'])} · {d.get('help', '')}"
        blocks.append(InputBlock(block_id=field_block(name), label=f"{LABELS.get(name, name)} ({name})",
                                 optional=True, hint=clip(hint, 2000),
                                 element=PlainTextInputElement(action_id=VALUE, initial_value=_shown(d["default"])))
                      .to_dict())
    others = [n for n in params if n not in FEATURED]
    listed = "; ".join(f"{n} ({range_text(params[n])}, default {_shown(params[n]['default'])})" for n in others)
    blocks.append(InputBlock(block_id=MORE_BLOCK, label="More parameters (key=value …)", optional=True,
                             hint=clip("Separated by spaces or new lines. " + listed, 2000),
                             element=PlainTextInputElement(action_id=VALUE, multiline=True,
                                                           placeholder="augment_rotate=10 ema=0.999")).to_dict())
    blocks.append(context(f"`{command} help` explains every parameter."))
    return {"type": "modal", "callback_id": ids.TRAIN_FORM,
            "title": PlainTextObject(text="Train a model").to_dict(),
            "submit": PlainTextObject(text="Start run").to_dict(),
            "close": PlainTextObject(text="Cancel").to_dict(),
            "private_metadata": json.dumps(private_metadata or {}, separators=(",", ":")),
            "blocks": blocks}


def _value(values: dict, block: str):
    cell = (values.get(block) or {}).get(VALUE) or {}
    if cell.get("type") == "static_select":
        return ((cell.get("selected_option") or {}).get("value")) or ""
    return (cell.get("value") or "").strip()


def form_tokens(values: dict, params: dict, check) -> tuple[list[str], dict[str, str]]:
    """(the `/ct train` tokens, {block_id: error}) of a submission's ``state.values``.

    ``check(tokens)`` is the text form's validation (TrainingService.parse_params: raises
    with a message a user can act on). Each field is checked alone so its error lands next
    to it, then everything together. A featured field left at its default is not sent,
    so the preset's value for it holds."""
    tokens, errors = [], {}
    preset = _value(values, PRESET_BLOCK)
    if preset and preset != NO_PRESET:
        tokens.append(f"preset={preset}")
    for name in FEATURED:
        if name not in params:
            continue
        raw = _value(values, field_block(name))
        if raw == "" or raw == _shown(params[name]["default"]):
            continue
        token = f"{name}={raw}"
        try:
            check([token])
        except Exception as e:   # noqa: BLE001 - ParamError: its text is meant for people
            errors[field_block(name)] = clip(str(e), 300)
            continue
        tokens.append(token)
    more = _value(values, MORE_BLOCK).split()
    bad = [t for t in more if t.count("=") != 1 or not t.split("=")[0] or not t.split("=")[1]]
    own = sorted({t.split("=")[0].lower() for t in more if t.count("=") == 1} & (set(FEATURED) | {"preset"}))
    if bad:
        errors[MORE_BLOCK] = clip("Write each as key=value with no spaces around =: " + ", ".join(bad), 150)
    elif own:
        errors[MORE_BLOCK] = clip(f"Set {', '.join(own)} in {'its' if len(own) == 1 else 'their'} own field.", 150)
    else:
        try:
            check(more)
        except Exception as e:   # noqa: BLE001
            errors[MORE_BLOCK] = clip(str(e), 300)
        tokens += more
    if not errors:
        try:
            check(tokens)
        except Exception as e:   # noqa: BLE001 - a combination no single field breaks
            errors[MORE_BLOCK] = clip(str(e), 300)
    return tokens, errors
