"""The model registry in the object store: versioned packages and a production alias.

    python -m steps.deploy --store ROOT --model NAME publish --package-prefix runs/R/candidate/ --run-id R
    python -m steps.deploy --store ROOT --model NAME rollback [--to N]
    python -m steps.deploy --store ROOT --model NAME show
    python -m steps.deploy --store ROOT --model NAME verify [--version N]

Layout (keys from steps.layout): models/<model>/v<N>/ holds a package (model.pt,
model_export.pt, index.faiss, labels.npy, metrics.json, ...) plus meta.json and, written
last, manifest.json {version, run_id, created_at, files: {name: {sha256, size}}};
models/<model>/production.json is the alias {version, updated_at, run_id, top1,
history: [...]}. The alias is replaced by one conditional PUT (compare-and-set on its
ETag), so readers see either the old or the new version, and two movers can't lose each
other's move; a version number is claimed with a create-only PUT, so it is never handed
out twice. Readers call verify_package (or download_version) so a package torn by a
crash mid-copy or a prune is refused rather than served. Why conditional writes and not
a Redis lock: the pipeline's deploy step runs in a cluster pod that has the store but
not ctbot's Redis, and both must serialise against each other (docs/architecture.md).

No torch or faiss here: the bot imports this module for promote and rollback.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

from steps import layout
from steps.crashpoints import crash_point
from steps.storage import PreconditionFailed, Store, open_store

_VERSION = re.compile(r"^v(\d+)/")
# Registry bookkeeping, rewritten per version, never copied from a source package.
_BOOKKEEPING = (layout.META_JSON, layout.MANIFEST_JSON)


def _prefix(model: str) -> str:
    if not model or "/" in model or model.startswith("."):
        raise ValueError(f"bad model name {model!r}")
    return layout.model_prefix(model)


def _version_prefix(model: str, version: int) -> str:
    _prefix(model)
    return layout.version_prefix(model, int(version))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _digest(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


def read_alias(store: Store, model: str) -> dict | None:
    _prefix(model)
    return store.get_json(layout.alias_key(model))


def list_versions(store: Store, model: str) -> list[int]:
    """Versions whose package is (still) in the store, ascending."""
    base = _prefix(model)
    found = set()
    for obj in store.list(base):
        m = _VERSION.match(obj.key[len(base):])
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def read_meta(store: Store, model: str, version: int) -> dict | None:
    _prefix(model)
    return store.get_json(layout.meta_key(model, version))


def _lineage(history: list[dict]) -> list[int]:
    """The stack of versions production went through, as rollbacks undo deployments:
    deploy/promote push; a rollback to v pops back to v (or pushes it if v is not there)."""
    stack: list[int] = []
    for h in history:
        v = int(h["version"])
        if h.get("action") == "rollback" and v in stack:
            del stack[stack.index(v) + 1:]
        elif not stack or stack[-1] != v:
            stack.append(v)
    return stack


ANY = object()   # publish without a precondition on the current production version


class StaleAlias(ValueError):
    """Production moved since the actor looked: nothing was changed. ``moved`` says how:
    {"expected", "current", "action", "by", "at"} (the alias entry that moved it)."""

    def __init__(self, message: str, *, expected=None, alias: dict | None = None):
        super().__init__(message)
        last = ((alias or {}).get("history") or [{}])[-1]
        self.moved = {"expected": expected, "current": (alias or {}).get("version"),
                      "action": last.get("action"), "by": last.get("by"), "at": last.get("at")}


def _move_alias(store: Store, model: str, decide, attempts: int = 20) -> dict:
    """Compare-and-set on the alias: ``decide(alias)`` returns the history entry to add
    (it may raise to refuse); the write only lands if nobody moved the alias meanwhile,
    else it decides again on the fresh alias. Returns the new alias."""
    key = layout.alias_key(model)
    for _ in range(attempts):
        raw, tag = store.get_tagged(key)
        alias = json.loads(raw) if raw else None
        entry = decide(alias)
        new = {"version": entry["version"], "updated_at": entry["at"], "run_id": entry.get("run_id"),
               "top1": entry.get("top1"), "history": list((alias or {}).get("history", [])) + [entry]}
        try:
            store.put_bytes(key, _json_bytes(new), "application/json",
                            if_match=tag, if_none_match=tag is None)
            return new
        except PreconditionFailed:
            continue   # someone else moved it: look again
    raise RuntimeError(f"{model}: the production alias kept changing; gave up after {attempts} tries")


def _claim_version(store: Store, model: str, alias: dict | None) -> int:
    """The next version number, owned by this caller alone: created with if-none-match,
    so two publishes at once get two numbers, and a pruned number is never reused."""
    base = _prefix(model)
    claimed = [int(m.group(1)) for o in store.list(base + "claims/")
               if (m := re.match(r"v(\d+)\.json$", o.key[len(base) + len("claims/"):]))]
    used = claimed + list_versions(store, model) + [int(h["version"]) for h in (alias or {}).get("history", [])]
    version = max(used, default=0) + 1
    while True:
        try:
            store.put_bytes(layout.version_claim_key(model, version), _json_bytes({"at": _now()}),
                            "application/json", if_none_match=True)
            return version
        except PreconditionFailed:
            version += 1


GATED = {"pending": "is waiting for approval", "rejected": "was rejected",
         "expired": "has an expired approval"}


def _check_not_gated(store: Store, run_id: str) -> None:
    """The bot's approval gate, seen from the store: a run it holds for an approver is
    published only with an approver's name (ctbot's own approve path passes it)."""
    approval = store.get_json(layout.approval_key(run_id)) or {}
    why = GATED.get(approval.get("state", ""))
    if why:
        raise ValueError(f"run {run_id} {why}: an approver publishes it through ctbot "
                         f"(Approve, or an approver's `/ct deploy {run_id}`); nothing was deployed")


def publish(store: Store, model: str, package_prefix: str, *, run_id: str, by: str, keep: int = 5,
            metrics: dict | None = None, action: str = "deploy", approved_by: str = "",
            expect_version: int | None | object = ANY) -> int:
    """Copy the package under package_prefix to a new version, point production at it,
    prune old versions. Returns the new version number."""
    if action not in ("deploy", "promote"):
        raise ValueError(f"action must be deploy or promote, got {action!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not approved_by:
        _check_not_gated(store, run_id)
    package_prefix = package_prefix.rstrip("/") + "/"
    objects = [o for o in store.list(package_prefix) if o.key[len(package_prefix):] not in _BOOKKEEPING]
    if not objects:
        raise ValueError(f"no model package under {store.uri(package_prefix)}")
    def still(alias):
        current = (alias or {}).get("version")
        if expect_version is not ANY and current != expect_version:
            shown = f"v{expect_version}" if expect_version is not None else "no production model"
            raise StaleAlias(f"Production is now {f'v{current}' if current else 'unset'}, not {shown} "
                             "as when this was decided; nothing was deployed",
                             expected=expect_version, alias=alias)

    alias = read_alias(store, model)
    still(alias)
    # Never reuse a number, even of a pruned version: history and reports refer to it.
    version = _claim_version(store, model, alias)
    dst = _version_prefix(model, version)
    files = {}
    for o in objects:  # hash the bytes as copied: the manifest vouches for this version
        name = o.key[len(package_prefix):]
        data = store.get_bytes(o.key)
        store.put_bytes(dst + name, data)
        files[name] = _digest(data)
        crash_point("mid_publish")
    metrics = metrics if metrics is not None else store.get_json(package_prefix + layout.METRICS_JSON)
    top1 = (metrics or {}).get("top1")
    at = _now()
    meta = {"model": model, "version": version, "run_id": run_id, "by": by, "at": at,
            "action": action, "source": store.uri(package_prefix), "top1": top1,
            "metrics": metrics, "files": sorted(o.key[len(package_prefix):] for o in objects)}
    meta_bytes = _json_bytes(meta)
    store.put_bytes(layout.meta_key(model, version), meta_bytes, "application/json")
    files[layout.META_JSON] = _digest(meta_bytes)
    # Last, and before the alias moves: a version without a manifest is incomplete.
    store.put_json(layout.manifest_key(model, version),
                   {"model": model, "version": version, "run_id": run_id, "created_at": at,
                    "files": dict(sorted(files.items()))})
    entry = {"version": version, "action": action, "by": by, "at": at, "run_id": run_id, "top1": top1}
    if approved_by:
        entry["approved_by"] = approved_by
    def decide(alias):
        still(alias)      # compare-and-set: checked again against the alias being replaced
        return entry
    new_alias = _move_alias(store, model, decide)
    prune(store, model, keep, alias=new_alias)
    return version


def compared_version(store: Store, run_id: str) -> int | None:
    """The production version the run's evaluate step compared its candidate against
    (None: there was no production model), from the candidate's metrics.json."""
    metrics = store.get_json(layout.candidate_key(run_id, layout.METRICS_JSON))
    if not isinstance(metrics, dict) or "production" not in metrics:
        raise ValueError(f"run {run_id} has no evaluation in {store.uri(layout.candidate_prefix(run_id))}"
                         f"{layout.METRICS_JSON}: nothing to bind the deploy to")
    production = metrics.get("production") or {}
    return int(production["version"]) if production.get("version") is not None else None


def deploy_candidate(store: Store, model: str, run_id: str, *, by: str, keep: int = 5) -> dict:
    """The pipeline's deploy: publish the run's candidate only if production is still the
    version evaluate compared it against (compare-and-set on the alias), so a rollback or
    promote made while the run was between evaluate and deploy is never overruled.
    Returns {"version": N, "compared_with": M} or, when production moved,
    {"held": {"expected", "current", "action", "by", "at"}, "reason": "..."}."""
    expected = compared_version(store, run_id)
    try:
        version = publish(store, model, layout.candidate_prefix(run_id), run_id=run_id, by=by, keep=keep,
                          expect_version=expected)
    except StaleAlias as e:
        return {"held": e.moved, "reason": moved_reason(e.moved)}
    return {"version": version, "compared_with": expected}


MOVED_BY = {"rollback": "rolled back", "promote": "promoted", "deploy": "deployed"}


def moved_reason(moved: dict, mention=str) -> str:
    """"production moved from v7 to v6 during the run (rolled back by U…)"; ``mention``
    renders the mover (the bot passes a Slack mention)."""
    def v(n):
        return f"v{n}" if n is not None else "none"
    how = MOVED_BY.get(moved.get("action") or "", "moved")
    by = f" ({how} by {mention(moved['by'])})" if moved.get("by") else ""
    return f"production moved from {v(moved.get('expected'))} to {v(moved.get('current'))} during the run{by}"


def verify_package(store: Store, model: str, version: int, *, check_hashes: bool = True) -> dict:
    """The manifest of models/<model>/v<version>/ once every file it lists is present
    with its size and (unless check_hashes=False, which only lists) its sha256. Raises
    ValueError naming the first missing or mismatching file, or the missing manifest."""
    prefix = _version_prefix(model, version)
    manifest = store.get_json(layout.manifest_key(model, version))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{model} v{version} has no valid manifest.json under {store.uri(prefix)}: "
                         "the package is incomplete (publish writes the manifest last) or predates manifests")
    if manifest.get("version") is not None and int(manifest["version"]) != int(version):
        raise ValueError(f"{model} v{version}: manifest.json is for v{manifest['version']}")
    sizes = {o.key[len(prefix):]: o.size for o in store.list(prefix)}
    for name, want in sorted(manifest["files"].items()):
        if name not in sizes:
            raise ValueError(f"{model} v{version} is torn: {name} is missing (listed in manifest.json)")
        data = store.get_bytes(prefix + name) if check_hashes else None
        _check_file(f"{model} v{version}", name, sizes[name], data, want)
    return manifest


def copy_version_files(store: Store, model: str, version: int, manifest: dict, names, dst: str) -> None:
    """Copy these files of a published version (``manifest``: its manifest.json, from
    verify_package(check_hashes=False)) to dst, a prefix, each checked against the
    manifest as read: one read of each instead of a full verify_package()'s and then the
    copy's, and the bytes written are the bytes checked. All are read and checked before
    any is written. Raises ValueError naming a missing or mismatching file."""
    names = list(names)
    blobs = read_version_files(store, model, version, manifest, names)
    store.map(lambda pair: store.put_bytes(dst + pair[0], pair[1]), zip(names, blobs, strict=True))


def read_version_files(store: Store, model: str, version: int, manifest: dict, names) -> list[bytes]:
    """These files of a published version, each read once and checked against its
    ``manifest`` (size and sha256), a few at a time: only what the caller needs is read,
    not the whole package as verify_package() does. Raises ValueError naming a missing or
    mismatching file."""
    prefix, where = _version_prefix(model, version), f"{model} v{version}"

    def read(name: str) -> bytes:
        if name not in manifest["files"]:
            raise ValueError(f"{where} has no {name} (not in manifest.json)")
        try:
            data = store.get_bytes(prefix + name)
        except KeyError:
            raise ValueError(f"{where} is torn: {name} is missing (listed in manifest.json)") from None
        _check_file(where, name, len(data), data, manifest["files"][name])
        return data

    return store.map(read, list(names))


def _check_file(what: str, name: str, size: int, data: bytes | None, want: dict) -> None:
    if size != want.get("size"):
        raise ValueError(f"{what} is torn: {name} has {size} bytes, manifest.json says {want.get('size')}")
    if data is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != want.get("sha256"):
            raise ValueError(f"{what} is torn: {name} has sha256 {got[:12]}…, "
                             f"manifest.json says {str(want.get('sha256'))[:12]}…")


def prune(store: Store, model: str, keep: int, alias: dict | None = None) -> list[int]:
    """Delete all but the newest `keep` versions, never the production version nor the
    one a rollback would return to. Returns the versions deleted."""
    alias = alias if alias is not None else read_alias(store, model)
    protected = set()
    if alias:
        stack = _lineage(alias.get("history", []))
        protected.add(int(alias["version"]))
        if len(stack) >= 2:
            protected.add(stack[-2])
    versions = list_versions(store, model)
    doomed = [v for v in versions[:-keep] if v not in protected] if keep < len(versions) else []
    for v in doomed:
        # The manifest first: a half-deleted version then reads as incomplete.
        store.delete(layout.manifest_key(model, v))
        for obj in list(store.list(_version_prefix(model, v))):
            store.delete(obj.key)
    return doomed


def rollback(store: Store, model: str, to_version: int | None = None, by: str = "", *,
             expect_version: int | None = None) -> dict:
    """Point production back at an earlier version (default: the one before the current in
    the alias history). With ``expect_version``, only if production is still that version
    (compare-and-set with the move itself). Returns {"from": a, "to": b}."""
    moved = {}

    def decide(alias):
        if not alias:
            raise ValueError(f"{model} has no production version yet: nothing to roll back")
        current = int(alias["version"])
        if expect_version is not None and current != int(expect_version):
            raise StaleAlias(f"Production is now v{current}, not v{expect_version}; nothing rolled back",
                             expected=expect_version, alias=alias)
        target = _rollback_target(store, model, alias, current, to_version)
        # Listing only (sizes): the bot must not download whole packages on a click.
        verify_package(store, model, target, check_hashes=False)
        meta = read_meta(store, model, target) or {}
        moved.update({"from": current, "to": target})
        return {"version": target, "action": "rollback", "by": by, "at": _now(),
                "run_id": meta.get("run_id"), "top1": meta.get("top1"), "from": current}

    _move_alias(store, model, decide)
    return moved


def _rollback_target(store: Store, model: str, alias: dict, current: int, to_version: int | None) -> int:
    available = list_versions(store, model)
    if to_version is None:
        stack = _lineage(alias.get("history", []))
        earlier = [v for v in stack[:-1] if v in available and v != current]
        if not earlier:
            raise ValueError(f"{model} v{current} has no earlier version in its history to roll back to")
        return earlier[-1]
    target = int(to_version)
    if target == current:
        raise ValueError(f"{model} is already at v{target}")
    if target not in available:
        listed = ", ".join(f"v{v}" for v in available) or "none"
        raise ValueError(f"{model} v{target} does not exist or was pruned; available: {listed}")
    return target


def upload_package(store: Store, local_dir: str, prefix: str) -> list[str]:
    """Put every file under local_dir into the store under prefix; returns the keys."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"package directory {root} does not exist")
    prefix = prefix.rstrip("/") + "/"
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    if not paths:
        raise ValueError(f"package directory {root} is empty")
    keys = [prefix + path.relative_to(root).as_posix() for path in paths]
    store.map(lambda pair: store.upload_file(*pair), zip(paths, keys, strict=True))
    return keys


def download_package(store: Store, prefix: str, local_dir: str, *,
                     require_manifest: bool = False) -> list[Path]:
    """Fetch a package (e.g. runs/<id>/candidate/ or models/<m>/v<N>/) into local_dir;
    returns the local paths. When the package has a manifest.json, exactly its files are
    fetched and checked against it (ValueError on a torn package)."""
    return _download(store, prefix, local_dir, require_manifest)[0]


def download_version(store: Store, model: str, version: int, local_dir: str) -> dict:
    """Fetch a published version into local_dir after checking it is whole; returns its
    manifest. Raises ValueError for a torn or incomplete package."""
    return _download(store, _version_prefix(model, version), local_dir, True)[1]


def _download(store: Store, prefix: str, local_dir: str, require_manifest: bool) -> tuple[list[Path], dict | None]:
    prefix = prefix.rstrip("/") + "/"
    where = store.uri(prefix)
    manifest = store.get_json(prefix + layout.MANIFEST_JSON)
    if manifest is None:
        if require_manifest:
            raise ValueError(f"no manifest.json under {where}: the package is incomplete "
                             "(publish writes the manifest last) or predates manifests")
        names = [o.key[len(prefix):] for o in list(store.list(prefix))]
        if not names:
            raise FileNotFoundError(f"no package under {where}")
        return store.map(lambda n: store.download_file(prefix + n, Path(local_dir) / n), names), None

    def fetch(item) -> Path:
        # Check the bytes fetched, not a second read: a prune may race the download.
        name, want = item
        try:
            data = store.get_bytes(prefix + name)
        except KeyError:
            raise ValueError(f"{where} is torn: {name} is missing (listed in manifest.json)") from None
        _check_file(where, name, len(data), data, want)
        path = Path(local_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path
    return store.map(fetch, sorted(manifest.get("files", {}).items())), manifest


def show(store: Store, model: str) -> dict:
    alias = read_alias(store, model)
    return {"model": model, "production": alias and {k: alias.get(k) for k in
                                                     ("version", "updated_at", "run_id", "top1")},
            "versions": list_versions(store, model),
            "history": (alias or {}).get("history", [])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="s3://bucket/prefix or a directory")
    ap.add_argument("--model", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("publish", help="publish a package and make it production")
    p.add_argument("--package-prefix", required=True, help="store key prefix of the package")
    p.add_argument("--run-id", required=True)
    p.add_argument("--by", default="cli")
    p.add_argument("--keep", type=int, default=5)
    p.add_argument("--action", default="deploy", choices=("deploy", "promote"))
    r = sub.add_parser("rollback", help="point production at an earlier version")
    r.add_argument("--to", type=int, help="version (default: the previous one in history)")
    r.add_argument("--by", default="cli")
    sub.add_parser("show", help="production alias, versions and history")
    v = sub.add_parser("verify", help="check a version against its manifest")
    v.add_argument("--version", type=int, help="default: the production version")
    args = ap.parse_args(argv)
    store = open_store(args.store)
    try:
        if args.cmd == "publish":
            v = publish(store, args.model, args.package_prefix, run_id=args.run_id, by=args.by,
                        keep=args.keep, action=args.action)
            out = {"version": v, "model": args.model}
        elif args.cmd == "rollback":
            out = rollback(store, args.model, args.to, by=args.by)
        elif args.cmd == "verify":
            version = args.version if args.version is not None else (read_alias(store, args.model) or {}).get("version")
            if version is None:
                raise ValueError(f"{args.model} has no production version; pass --version")
            m = verify_package(store, args.model, int(version))
            out = {"model": args.model, "version": int(version), "ok": True, "files": len(m["files"])}
        else:
            out = show(store, args.model)
    except ValueError as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
