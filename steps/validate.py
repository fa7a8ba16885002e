"""Check an ingested data set before any training time is spent on it.

    python -m steps.validate --data-dir D [--min-per-class 10 --max-imbalance 10 ...]

Fatal problems raise ValidationError with a message that names the offending objects;
milder ones come back as warnings. The verdict is also written to data_dir/validation.json.
The checks are small functions run in the order of CHECKS; each returns (fatal problems,
warnings), and the first one with a fatal problem stops the run.

Fatal: unreadable objects, wrong image shapes, labels outside 0-9, pixel values outside
0..255, an empty or malformed array file, a class below min_per_class, imbalance above
max_imbalance, exact duplicates above max_duplicate_fraction, training images identical
to eval images above max_leak_fraction.
Warnings: skipped objects, imbalance above sqrt(max_imbalance), a few duplicates,
duplicates with conflicting labels, leaked images (dropped), eval classes missing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steps import dataset
from steps.ingest import counts, fingerprint_of
from steps.layout import DATA_CARD_JSON

MISSING = ("object not found", "no objects under this prefix")  # ingest's wording


class ValidationError(Exception):
    """A fatal data problem; str(e) names the objects and the problem."""


def _list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", and {len(items) - limit} more" if len(items) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _card_problems(card: dict, where: str = "") -> list[str]:
    """Fatal problems ingest recorded in a data card (training data or its eval part)."""
    out = []
    errors = card.get("errors", [])
    missing = [e for e in errors if e["error"] in MISSING]
    corrupt = [e for e in errors if e["error"] not in MISSING]
    for kind, group in (("corrupt object", corrupt), ("missing object", missing)):
        if group:
            out.append(f"{_plural(len(group), kind)}{where}: "
                       + _list([f"{e['uri']} ({e['error']})" for e in group]))
    shapes = card.get("shape_issues", [])
    if shapes:
        out.append(f"{_plural(len(shapes), 'object')} with the wrong image shape{where}: "
                   + _list([f"{s['uri']} ({s['problem']})" for s in shapes]))
    for issue in card.get("label_issues", []):
        out.append(f"labels out of range 0-9{where} in {issue['uri']}: "
                   + ", ".join(str(v) for v in issue.get("values", [])[:10])
                   + (f" ({issue['count']} images)" if issue.get("count", 1) > 1 else ""))
    for issue in card.get("value_issues", []):
        out.append(f"bad pixel values{where} in {issue['uri']}: {issue['problem']}")
    return out


def _load(d: Path, which: str, what: str) -> dict:
    """y, h, src of one side of the data set (steps.dataset; no pixels in its rows form)."""
    try:
        return dataset.read_rows(d, which)
    except FileNotFoundError:
        raise ValidationError(f"{what} {dataset.arrays_path(d, which)} is missing: run ingest first") from None
    except ValueError as e:
        raise ValidationError(f"{what}: {e}") from None


def _label_problem(y, src, sources, where="") -> str | None:
    bad = y > 9
    if not bad.any():
        return None
    parts = []
    for s in np.unique(src[bad]):
        uri = sources[s]["uri"] if s < len(sources) else f"source #{s}"
        vals = np.unique(y[bad & (src == s)])
        parts.append(f"{uri}: {', '.join(str(int(v)) for v in vals[:10])}")
    return f"labels out of range 0-9{where} in " + "; ".join(parts)


@dataclass
class Limits:
    min_per_class: int = 10
    max_imbalance: float = 10.0
    max_duplicate_fraction: float = 0.05
    max_leak_fraction: float = 0.05


@dataclass
class DataSet:
    """What the checks share. Earlier checks fill in what later ones read (check_arrays
    loads y, src and the image hashes; check_leakage may drop rows), which is why their
    order matters. No check needs the pixels: ingest hashed them."""
    dir: Path
    card: dict
    limits: Limits
    stats: dict = field(default_factory=dict)
    y: np.ndarray | None = None
    src: np.ndarray | None = None
    hashes: np.ndarray | None = None
    eval: dict | None = None

    @property
    def sources(self) -> list[dict]:
        return self.card.get("sources", [])


Found = tuple[list[str], list[str]]  # (fatal problems, warnings)


def check_ingest_errors(ds: DataSet) -> Found:
    """Corrupt or missing objects, wrong shapes, bad labels or pixels that ingest recorded,
    in the training data and the eval set, all reported together."""
    fatal = _card_problems(ds.card)
    if "eval" in ds.card:
        fatal += _card_problems(ds.card["eval"], where=" in the eval set")
    return fatal, []


def check_arrays(ds: DataSet) -> Found:
    """The training data readable: one label and one hash per image (and in the arrays
    form uint8 28x28 images)."""
    try:
        data = _load(ds.dir, "data", "training data")
    except ValidationError as e:
        return [str(e)], []
    ds.y, ds.src, ds.hashes = data["y"], data["src"], data["h"]
    return [], []


def check_labels(ds: DataSet) -> Found:
    problem = _label_problem(ds.y, ds.src, ds.sources)
    return ([problem] if problem else []), []


def check_eval_set(ds: DataSet) -> Found:
    """The eval set, when there is one: readable, labels in range, not empty; classes it
    lacks are a warning (their accuracy goes unmeasured)."""
    if not dataset.exists(ds.dir, "eval"):
        return [], []
    try:
        ev = _load(ds.dir, "eval", "eval set")
    except ValidationError as e:
        return [str(e)], []
    problem = _label_problem(ev["y"], ev["src"], ds.card.get("eval", {}).get("sources", []),
                             where=" in the eval set")
    if problem:
        return [problem], []
    if len(ev["y"]) == 0:
        return [f"the eval set {ds.card.get('eval', {}).get('uri', 'eval')} is empty"], []
    ds.eval = ev
    ec = np.bincount(ev["y"].astype(np.int64), minlength=10)
    ds.stats["eval_n"] = int(len(ev["y"]))
    missing = [str(i) for i in range(10) if ec[i] == 0]
    return [], ([f"the eval set has no images of class {', '.join(missing)}"] if missing else [])


def check_leakage(ds: DataSet) -> Found:
    """Training images identical to eval images. Runs before the counts: leaked rows are
    dropped (the data set and the card rewritten in place), and a large leak explains an
    empty or thin training set."""
    if ds.eval is None:
        return [], []
    leaked = np.isin(ds.hashes, ds.eval["h"]) if len(ds.hashes) else np.zeros(0, bool)
    card = ds.card
    earlier = card.get("leakage", {})  # what ingest already dropped
    n_before = earlier.get("n_before", len(ds.y))
    total = int(leaked.sum()) + int(earlier.get("dropped", 0))
    ds.stats["leaked"] = total
    if not total:
        return [], []
    by_source = {e["uri"]: e["n"] for e in earlier.get("by_source", [])}
    for i in np.flatnonzero(leaked):
        s = ds.src[i]
        uri = ds.sources[s]["uri"] if s < len(ds.sources) else f"source #{s}"
        by_source[uri] = by_source.get(uri, 0) + 1
    named = _list([f"{u} ({n})" for u, n in sorted(by_source.items())])
    msg = (f"{_plural(total, 'training image')} ({total / max(n_before, 1):.1%}) identical to "
           f"eval images, from {named}")
    limit = ds.limits.max_leak_fraction
    if total / max(n_before, 1) > limit:
        return [f"{msg}: above the {limit:.0%} limit; is the eval set mixed into the training data?"], []
    if leaked.any():  # rows ingest did not already drop
        keep = ~leaked
        ds.y, ds.src, ds.hashes = ds.y[keep], ds.src[keep], ds.hashes[keep]
        dataset.keep_rows(ds.dir, "data", keep)
        card["n"], card["counts"] = int(len(ds.y)), counts(ds.y)
        card["fingerprint"] = fingerprint_of(ds.hashes, ds.y)
        card["leakage"] = {"dropped": total, "n_before": n_before,
                           "by_source": [{"uri": u, "n": n} for u, n in sorted(by_source.items())]}
        (ds.dir / DATA_CARD_JSON).write_text(json.dumps(card, indent=1))
    return [], [msg + ": dropped from training"]


def check_not_empty(ds: DataSet) -> Found:
    if len(ds.y):
        return [], []
    uris = ds.card.get("uris")
    return ["no training images: " + ("the data URIs held no readable images" if not uris
                                      else "nothing readable under " + _list(uris))], []


def check_skipped(ds: DataSet) -> Found:
    return [], [f"skipped {s['uri']} ({s['reason']})" for s in ds.card.get("skipped", [])]


def check_min_counts(ds: DataSet) -> Found:
    c = np.bincount(ds.y.astype(np.int64), minlength=10)
    ds.stats["n"], ds.stats["counts"] = int(len(ds.y)), {str(i): int(c[i]) for i in range(10)}
    low = [f"{i} ({c[i]})" for i in range(10) if c[i] < ds.limits.min_per_class]
    if low:
        return [f"too few images for class {_list(low, 10)}: need at least "
                f"{ds.limits.min_per_class} per class"], []
    return [], []


def check_balance(ds: DataSet) -> Found:
    """Fatal above max_imbalance, a warning above its square root."""
    c = np.bincount(ds.y.astype(np.int64), minlength=10)
    limit = ds.limits.max_imbalance
    ratio = float(c.max() / c.min()) if c.min() else math.inf
    ds.stats["imbalance"] = round(ratio, 3)
    big, small = int(c.argmax()), int(c.argmin())
    imbalance = f"class imbalance {ratio:.1f}x (class {big}: {c[big]} images, class {small}: {c[small]})"
    if ratio > limit:
        return [f"{imbalance} exceeds the {limit:g}x limit"], []
    return [], ([imbalance] if ratio > math.sqrt(limit) else [])


def check_duplicates(ds: DataSet) -> Found:
    """Exact duplicates: a warning (naming conflicting labels), fatal above the limit."""
    y, src, n = ds.y, ds.src, len(ds.y)
    _, first, inverse = np.unique(ds.hashes, return_index=True, return_inverse=True)
    n_dup = int(n - len(first))
    ds.stats["duplicates"] = n_dup
    ds.stats["duplicate_fraction"] = round(n_dup / n, 5)
    if not n_dup:
        return [], []
    # groups of identical images carrying more than one label
    pairs = np.unique(np.stack([inverse.reshape(-1), y.astype(np.int64)], 1), axis=0)
    conflicting = int((np.bincount(pairs[:, 0]) > 1).sum())
    ds.stats["conflicting_duplicates"] = conflicting
    repeats = np.setdiff1d(np.arange(n), first)
    sources = ds.sources
    dup_src = sorted({sources[s]["uri"] for s in np.unique(src[repeats]) if s < len(sources)})
    msg = f"{_plural(n_dup, 'exact duplicate image')} ({n_dup / n:.1%}) in " + _list(dup_src)
    if n_dup / n > ds.limits.max_duplicate_fraction:
        return [f"{msg}: above the {ds.limits.max_duplicate_fraction:.0%} limit"], []
    return [], [msg + (f"; {conflicting} of them with conflicting labels" if conflicting else "")]


# Run in this order; the first check with a fatal problem stops the run.
CHECKS: tuple[Callable[[DataSet], Found], ...] = (
    check_ingest_errors, check_arrays, check_labels, check_eval_set, check_leakage,
    check_not_empty, check_skipped, check_min_counts, check_balance, check_duplicates,
)


def validate(data_dir: str, *, min_per_class: int = 10, max_imbalance: float = 10.0,
             max_duplicate_fraction: float = 0.05, max_leak_fraction: float = 0.05) -> dict:
    """Returns {"ok": True, "warnings": [...], "stats": {...}} or raises ValidationError.

    Leakage: training images identical to eval images are dropped from data.npz in place
    (ingest already drops the ones it saw; this catches the rest) and reported as a
    warning, unless they exceed max_leak_fraction of the training set, which is fatal:
    then the eval set and the training data are most likely mixed up.
    """
    t0 = time.perf_counter()
    d = Path(data_dir)
    card_path = d / DATA_CARD_JSON
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    ds = DataSet(d, card, Limits(min_per_class, max_imbalance, max_duplicate_fraction, max_leak_fraction))
    warnings: list[str] = []
    for check in CHECKS:
        problems, found = check(ds)
        warnings += found
        if problems:
            error = ValidationError("; ".join(problems))
            _write(d, {"ok": False, "error": str(error), "warnings": warnings, "stats": ds.stats})
            raise error
    ds.stats["counts"] = counts(ds.y)
    ds.stats["n"] = int(len(ds.y))
    # its own compute, for the bench's data preparation figure (no task start-up in it)
    result = {"ok": True, "warnings": warnings, "stats": ds.stats,
              "seconds": round(time.perf_counter() - t0, 3)}
    _write(d, result)
    return result


def _write(d: Path, result: dict) -> None:
    if d.is_dir():
        (d / "validation.json").write_text(json.dumps(result, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="ingest's output directory")
    ap.add_argument("--min-per-class", type=int, default=10)
    ap.add_argument("--max-imbalance", type=float, default=10.0)
    ap.add_argument("--max-duplicate-fraction", type=float, default=0.05)
    ap.add_argument("--max-leak-fraction", type=float, default=0.05)
    args = ap.parse_args(argv)
    try:
        result = validate(args.data_dir, min_per_class=args.min_per_class,
                          max_imbalance=args.max_imbalance,
                          max_duplicate_fraction=args.max_duplicate_fraction,
                          max_leak_fraction=args.max_leak_fraction)
    except ValidationError as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
