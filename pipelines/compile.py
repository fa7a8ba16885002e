"""Compile the pipeline to KFP IR YAML (what a cluster's UI or kfp.Client uploads).

    python -m pipelines.compile -o ctbot.yaml [--resources resources.yaml] [--sweep]
or  ctbot pipeline compile -o ctbot.yaml [--resources resources.yaml] [--sweep]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def compile_pipeline(out_path: str | Path, *, resources: str | Path | dict | None = None,
                     sweep: bool = False, parallelism: int = 2) -> Path:
    """Write the IR YAML; ``resources`` is a config file path, a config dict (laid over
    nothing) or None for the defaults (pipelines.resources.DEFAULT_RESOURCES)."""
    from kfp import compiler

    from pipelines import resources as res
    from pipelines.pipeline import build_pipeline

    if isinstance(resources, dict):
        res.check(resources)
        cfg = resources
    else:
        cfg = res.load_resources(resources)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg, sweep=sweep, parallelism=parallelism),
                                package_path=str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-o", "--output", required=True, help="where to write the IR YAML")
    ap.add_argument("--resources", help="per-step resources (YAML/JSON); see pipelines/resources.py")
    ap.add_argument("--sweep", action="store_true",
                    help="compile the sweep variant (ParallelFor over a `sweep` parameter)")
    ap.add_argument("--parallelism", type=int, default=2, help="sweep trials run at once")


def run(args: argparse.Namespace) -> int:
    out = compile_pipeline(args.output, resources=args.resources, sweep=args.sweep,
                           parallelism=args.parallelism)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
