"""Training hyper-parameters: one dataclass, torch-free so the bot can describe and
check them without importing torch.

KFP hands ints over as floats (3.0) and Slack hands everything over as strings ("3"),
so ``from_dict`` coerces both and rejects unknown keys and out-of-range values with a
message a user can act on. Numbers typed as text are ASCII only: Python's int() and
float() also read "３" (full-width), "٣" (Arabic-Indic), "3_0" and "1e1", so a typo
or a pasted digit would silently become some other number.
"""
from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

# Named parameter sets, applied under any explicit key=value. ``v0`` is the recipe the
# first release shipped with, kept so anyone can rerun the comparison against it.
# Measured on full MNIST by bench/bench_model.py (k=5 vote, 2026-12-01, two runs, one in
# each row order): the defaults 99.63% (seeds 0-4: 99.63/99.57/99.51/99.54/99.53) at
# 0.40-0.44x v0's wall, in one process and through the pipeline; fast 99.59%; v0 99.51%.
PRESETS: dict[str, dict] = {
    "fast": {"epochs": 3},
    # mode=warm's own short schedule (applied under explicit keys whenever mode=warm): it
    # starts from production's weights, so one epoch at a low peak adapts them to the new
    # data without undoing them, and no held-out split (val_fraction 0): its kNN check
    # would embed 22k images for a figure the gate does not use (evaluate measures the
    # candidate). Offline, history + 1 shifted batch, seeds 0 and 1, the k=50 vote: 0.05 pp
    # behind full on clean, 0.12 on shifted (lr 2e-3 with val: 0.08 / 0.17; half an epoch,
    # even with the new batch oversampled 4x: 0.2-0.4 pp behind on shifted). freeze=2 keeps
    # production's first two conv layers: a step costs about 0.6x, and over bench_ct's five
    # rounds top-1 moved by 0.02-0.03 pp on average, less than one seed from another.
    # docs/continuous-training.md ("Warm").
    "warm": {"mode": "warm", "epochs": 1, "lr": 1e-3, "warmup": 0.1, "val_fraction": 0.0, "freeze": 2},
    "v0": {"epochs": 8, "batch_size": 256, "lr": 4e-3, "lr_schedule": "onecycle",
           "margin": 0.5, "scale": 30.0, "augment_shift": 2, "augment_rotate": 0.0,
           "augment_scale": 0.0, "augment_elastic": 0.0, "layers": "c16,p,c32,p,c64,c128", "warmup": 0.2, "min_steps": 1},
}

# name -> (min, max) inclusive; for str fields: the allowed values.
_RANGES: dict[str, tuple] = {
    "mode": ("full", "warm", "refresh"),
    "epochs": (1, 200),
    "batch_size": (8, 8192),
    "lr": (1e-6, 1.0),
    "lr_schedule": ("onecycle", "cosine", "none"),
    "weight_decay": (0.0, 1.0),
    "embedding_dim": (2, 1024),
    "margin": (0.0, 1.0),
    "scale": (1.0, 128.0),
    "seed": (0, 2**31 - 1),
    "device": ("auto", "cpu", "cuda"),
    "augment_shift": (0, 6),
    "augment_rotate": (0.0, 45.0),
    "augment_scale": (0.0, 0.3),
    "augment_elastic": (0.0, 4.0),
    "val_fraction": (0.0, 0.5),
    "threads": (0, 256),
    # Layer stacks measured in bench/bench_model.py; "c<N>" 3x3 conv, "s2" stride 2, "p" max-pool,
    # a final "f" flattens the feature map instead of averaging it.
    "layers": ("c16,p,c32,p,c64,c128", "c16,p,c32,p,c64,c96", "c16,p,c32,p,c64,c64",
               "c16,p,c32,p,c64s2,c128", "c16s2,c32,p,c64,c128", "c32,p,c64,p,c128",
               "c16,p,c32,p,c64,c64,f", "c16,p,c32,p,c64,c64,p,f"),
    "warmup": (0.0, 0.5),
    "min_steps": (1, 1000),
    "epoch_fraction": (0.05, 1.0),
    "label_smoothing": (0.0, 0.5),
    "ema": (0.0, 0.9999),
    "freeze": (0, 8),
}


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


MODES = _RANGES["mode"]


@dataclass
class TrainParams:
    epochs: int = _f(4, "passes over the training data")
    batch_size: int = _f(256, "images per optimiser step (global, split across GPUs under DDP)")
    lr: float = _f(5e-3, "peak learning rate (AdamW)")
    lr_schedule: str = _f("onecycle", "learning-rate schedule over the whole run")
    weight_decay: float = _f(5e-4, "AdamW decoupled weight decay")
    embedding_dim: int = _f(128, "size of the L2-normalised embedding")
    margin: float = _f(0.4, "ArcFace additive angular margin m (radians)")
    scale: float = _f(30.0, "ArcFace logit scale s")
    seed: int = _f(0, "random seed (weights, split, shuffling, augmentation)")
    device: str = _f("auto", "auto picks CUDA when available (DDP over all GPUs), else CPU")
    augment_shift: int = _f(2, "random translation of training images, in pixels (0 = off)")
    augment_rotate: float = _f(8.0, "random rotation of training images, up to this many degrees")
    augment_scale: float = _f(0.08, "random zoom of training images by up to this fraction (0.1 = 90-110%)")
    augment_elastic: float = _f(0.0, "random smooth warp of training images, up to this many pixels (0 = off)")
    val_fraction: float = _f(0.05, "share of the training data held out to measure val_top1 (kNN)")
    threads: int = _f(0, "CPU threads for torch; 0 = every CPU this process may use (cgroup limit)")
    layers: str = _f("c16,p,c32,p,c64,c64,p,f", "network: c<N> = 3x3 conv to N channels (s2: stride 2), p = 2x2 max-pool, "
                     "f (last) = flatten the map into the projection instead of averaging it")
    warmup: float = _f(0.2, "share of the steps spent raising the learning rate to its peak")
    min_steps: int = _f(20, "optimiser steps per epoch at least: small data gets smaller batches (>= 16)")
    epoch_fraction: float = _f(1.0, "share of an epoch's batches each epoch trains on, drawn at random from all "
                               "the data (preset warm: a short pass that still sees every kind of image)")
    label_smoothing: float = _f(0.0, "share of the ArcFace target spread over the other classes")
    ema: float = _f(0.0, "decay of an exponential moving average of the weights, kept as the model (0 = off)")
    freeze: int = _f(0, "leading conv layers (each with its BatchNorm) kept at the weights training starts "
                     "from, production's in mode=warm: no gradient is computed for them, so a step costs less")
    mode: str = _f("full", "full: train from scratch; warm: start from production's weights and "
                   "train briefly (preset warm); refresh: no training, production's weights embed "
                   "the new objects into a copy of its gallery")

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def parse_tokens(cls, tokens: list[str] | None) -> dict:
        """["epochs=3", "preset=v0"] -> the typed, range-checked keys the user gave.

        The one key=value parser: Slack, ``ctbot pipeline --set`` and ``python -m
        steps.train`` all come through here. A ``preset`` expands into its keys first,
        so explicit keys win over it. Raises ValueError with a message a user can act on.
        """
        raw: dict = {}
        for tok in tokens or []:
            key, sep, value = tok.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected key=value, got `{tok}`; "
                                 f"valid keys: preset, {', '.join(cls.valid_keys())}")
            key = key.strip().lower()
            if key in raw:   # the last one silently winning would hide a typo
                if key == "preset":
                    raise ValueError(f"two presets given (`preset={raw[key]}`, `preset={value.strip()}`); "
                                     "give one, and set single keys on top of it")
                raise ValueError(f"`{key}` is given twice (`{key}={raw[key]}`, `{key}={value.strip()}`); "
                                 "give it once")
            raw[key] = value.strip()
        raw = expand_preset(raw)
        checked = cls.from_dict(raw)
        return {k: getattr(checked, k) for k in raw}

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainParams:
        """Build from loosely typed input; ``None`` values mean 'use the default'."""
        d = expand_preset(dict(d or {}))
        unknown = sorted(k for k in d if k not in cls.valid_keys())
        if unknown:
            raise ValueError(f"unknown training parameter(s): {', '.join(unknown)}; "
                             f"valid: {', '.join(cls.valid_keys())}")
        values = {}
        for f in fields(cls):
            if f.name not in d or d[f.name] is None:
                continue
            values[f.name] = _coerce(f.name, type(f.default), d[f.name])
        p = cls(**values)
        p.check()
        return p

    def check(self) -> None:
        problems = []
        for f in fields(self):
            v, rng = getattr(self, f.name), _RANGES[f.name]
            if isinstance(rng[0], str):
                if v not in rng:
                    problems.append(f"{f.name}={v!r} must be one of {', '.join(rng)}")
            elif not (rng[0] <= v <= rng[1]):
                problems.append(f"{f.name}={v} is out of range [{rng[0]}, {rng[1]}]")
        n_conv = sum(1 for spec in self.layers.split(",") if spec.startswith("c"))
        if self.freeze and self.mode != "warm":
            problems.append(f"freeze={self.freeze} keeps the first layers as they start, which only "
                            "means something from production's weights: use it with mode=warm")
        elif self.freeze >= n_conv > 0:
            problems.append(f"freeze={self.freeze} would leave no conv layer to train: "
                            f"layers={self.layers} has {n_conv}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def describe(cls) -> dict:
        """name -> {type, default, range, help}: enough for a user-facing help text."""
        out = {}
        for f in fields(cls):
            rng = _RANGES[f.name]
            out[f.name] = {
                "type": type(f.default).__name__,
                "default": f.default if f.default is not MISSING else None,
                "range": list(rng) if isinstance(rng[0], str) else [rng[0], rng[1]],
                "help": f.metadata.get("help", ""),
            }
        return out


def expand_preset(d: dict) -> dict:
    """{"preset": "v0", "epochs": 3} -> v0's keys with epochs=3 on top. mode=warm brings
    preset warm's schedule unless another preset is named."""
    if "preset" not in d:
        if str(d.get("mode") or "").strip().lower() == "warm":
            return {**PRESETS["warm"], **d}
        return d
    d = dict(d)
    name = str(d.pop("preset")).strip().lower()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **d}


# Text forms accepted for numbers: ASCII digits, a sign; for floats also a decimal point
# and an exponent. re.ASCII keeps \d-like classes from matching other scripts' digits.
_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)


def _coerce(name: str, kind: type, value):
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, str) and not _INT_TEXT.fullmatch(value.strip())):
                raise ValueError
            x = int(value.strip()) if isinstance(value, str) else value
            if isinstance(x, float):   # KFP hands ints over as floats
                if not math.isfinite(x) or x != int(x):
                    raise ValueError
                x = int(x)
            return int(x)
        if kind is float:
            if isinstance(value, bool) or (isinstance(value, str) and not _FLOAT_TEXT.fullmatch(value.strip())):
                raise ValueError
            x = float(value)
            if not math.isfinite(x):
                raise ValueError
            return x
        if kind is str:
            return str(value).strip().lower()
    except (TypeError, ValueError):
        pass
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    digits = {int: " (write ASCII digits 0-9, optionally signed)",
              float: " (write ASCII digits with an optional sign, decimal point and exponent, e.g. 0.01 or 1e-3)"}
    raise ValueError(f"`{name}` must be {article} {kind.__name__}, got `{value}`{digits.get(kind, '')}")
