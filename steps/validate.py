"""Check an ingested data set before any training time is spent on it.

    python -m steps.validate --data-dir D [--min-per-class 10 --max-imbalance 10 ...]

Fatal problems raise ValidationError with a message that names the offending objects;
milder ones come back as warnings. The verdict is also written to data_dir/validation.json.

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
from pathlib import Path

import numpy as np

from steps.ingest import counts, fingerprint, image_hashes

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


def _load(path: Path, what: str) -> dict:
    try:
        with np.load(path) as d:
            arrays = {k: d[k] for k in d.files}
    except FileNotFoundError:
        raise ValidationError(f"{what} {path} is missing: run ingest first") from None
    except (ValueError, OSError) as e:
        raise ValidationError(f"{what} {path} is unreadable: {e}") from None
    x, y = arrays.get("x"), arrays.get("y")
    if x is None or y is None:
        raise ValidationError(f"{what} {path} lacks arrays x and y")
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValidationError(f"{what} {path}: images must be uint8 28x28, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValidationError(f"{what} {path}: {len(x)} images but labels of shape {y.shape}")
    arrays.setdefault("src", np.zeros(len(x), np.int32))
    return arrays


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


def validate(data_dir: str, *, min_per_class: int = 10, max_imbalance: float = 10.0,
             max_duplicate_fraction: float = 0.05, max_leak_fraction: float = 0.05) -> dict:
    """Returns {"ok": True, "warnings": [...], "stats": {...}} or raises ValidationError.

    Leakage: training images identical to eval images are dropped from data.npz in place
    (ingest already drops the ones it saw; this catches the rest) and reported as a
    warning, unless they exceed max_leak_fraction of the training set, which is fatal:
    then the eval set and the training data are most likely mixed up.
    """
    d = Path(data_dir)
    card_path = d / "data_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    warnings: list[str] = []
    stats: dict = {}
    try:
        fatal = _card_problems(card)
        if "eval" in card:
            fatal += _card_problems(card["eval"], where=" in the eval set")
        if fatal:
            raise ValidationError("; ".join(fatal))
        data = _load(d / "data.npz", "training data")
        x, y, src = data["x"], data["y"], data["src"]
        sources = card.get("sources", [])
        problem = _label_problem(y, src, sources)
        if problem:
            raise ValidationError(problem)
        hashes = image_hashes(x)

        eval_path = d / "eval.npz"
        if eval_path.is_file():
            ev = _load(eval_path, "eval set")
            e_sources = card.get("eval", {}).get("sources", [])
            problem = _label_problem(ev["y"], ev["src"], e_sources, where=" in the eval set")
            if problem:
                raise ValidationError(problem)
            if len(ev["x"]) == 0:
                raise ValidationError(f"the eval set {card.get('eval', {}).get('uri', eval_path)} is empty")
            ec = np.bincount(ev["y"].astype(np.int64), minlength=10)
            stats["eval_n"] = int(len(ev["y"]))
            missing = [str(i) for i in range(10) if ec[i] == 0]
            if missing:
                warnings.append(f"the eval set has no images of class {', '.join(missing)}")
            # before the counts: leaked rows are dropped, and a large leak explains an empty set
            x, y, src, hashes = _check_leakage(d, card, x, y, src, hashes, ev["x"],
                                               max_leak_fraction, warnings, stats)

        if len(x) == 0:
            raise ValidationError("no training images: " + (
                "the data URIs held no readable images" if not card.get("uris")
                else "nothing readable under " + _list(card["uris"])))
        for s in card.get("skipped", []):
            warnings.append(f"skipped {s['uri']} ({s['reason']})")

        c = np.bincount(y.astype(np.int64), minlength=10)
        stats["n"], stats["counts"] = int(len(y)), {str(i): int(c[i]) for i in range(10)}
        low = [f"{i} ({c[i]})" for i in range(10) if c[i] < min_per_class]
        if low:
            raise ValidationError(f"too few images for class {_list(low, 10)}: need at least "
                                  f"{min_per_class} per class")
        ratio = float(c.max() / c.min()) if c.min() else math.inf
        stats["imbalance"] = round(ratio, 3)
        big, small = int(c.argmax()), int(c.argmin())
        imbalance = (f"class imbalance {ratio:.1f}x (class {big}: {c[big]} images, "
                     f"class {small}: {c[small]})")
        if ratio > max_imbalance:
            raise ValidationError(f"{imbalance} exceeds the {max_imbalance:g}x limit")
        if ratio > math.sqrt(max_imbalance):
            warnings.append(imbalance)

        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        n_dup = int(len(x) - len(first))
        stats["duplicates"] = n_dup
        stats["duplicate_fraction"] = round(n_dup / len(x), 5)
        if n_dup:
            # groups of identical images carrying more than one label
            pairs = np.unique(np.stack([inverse.reshape(-1), y.astype(np.int64)], 1), axis=0)
            conflicting = int((np.bincount(pairs[:, 0]) > 1).sum())
            stats["conflicting_duplicates"] = conflicting
            repeats = np.setdiff1d(np.arange(len(x)), first)
            dup_src = sorted({sources[s]["uri"] for s in np.unique(src[repeats]) if s < len(sources)})
            msg = (f"{_plural(n_dup, 'exact duplicate image')} ({n_dup / len(x):.1%}) in "
                   + _list(dup_src))
            if n_dup / len(x) > max_duplicate_fraction:
                raise ValidationError(f"{msg}: above the {max_duplicate_fraction:.0%} limit")
            warnings.append(msg + (f"; {conflicting} of them with conflicting labels" if conflicting else ""))
        stats["counts"] = counts(y)
        stats["n"] = int(len(y))
    except ValidationError as e:
        _write(d, {"ok": False, "error": str(e), "warnings": warnings, "stats": stats})
        raise
    result = {"ok": True, "warnings": warnings, "stats": stats}
    _write(d, result)
    return result


def _check_leakage(d, card, x, y, src, hashes, eval_x, max_leak_fraction, warnings, stats):
    eval_h = set(image_hashes(eval_x).tolist())
    leaked = np.array([h in eval_h for h in hashes.tolist()], bool)
    earlier = card.get("leakage", {})
    n_before = earlier.get("n_before", len(x))
    total = int(leaked.sum()) + int(earlier.get("dropped", 0))
    stats["leaked"] = total
    if not total:
        return x, y, src, hashes
    by_source = {e["uri"]: e["n"] for e in earlier.get("by_source", [])}
    sources = card.get("sources", [])
    for i in np.flatnonzero(leaked):
        uri = sources[src[i]]["uri"] if src[i] < len(sources) else f"source #{src[i]}"
        by_source[uri] = by_source.get(uri, 0) + 1
    named = _list([f"{u} ({n})" for u, n in sorted(by_source.items())])
    msg = (f"{_plural(total, 'training image')} ({total / max(n_before, 1):.1%}) identical to "
           f"eval images, from {named}")
    if total / max(n_before, 1) > max_leak_fraction:
        raise ValidationError(f"{msg}: above the {max_leak_fraction:.0%} limit; is the eval set "
                              f"mixed into the training data?")
    warnings.append(msg + ": dropped from training")
    if leaked.any():  # rows ingest did not already drop
        keep = ~leaked
        x, y, src, hashes = x[keep], y[keep], src[keep], hashes[keep]
        np.savez(d / "data.npz", x=x, y=y, src=src)
        card["n"], card["counts"], card["fingerprint"] = int(len(x)), counts(y), fingerprint(x, y)
        card["leakage"] = {"dropped": total, "n_before": n_before,
                           "by_source": [{"uri": u, "n": n} for u, n in sorted(by_source.items())]}
        (d / "data_card.json").write_text(json.dumps(card, indent=1))
    return x, y, src, hashes


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
