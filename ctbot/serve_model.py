"""`ctbot serve-model`: serve the production model over KServe's Open Inference Protocol v2."""
from __future__ import annotations

import argparse
import logging
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="s3://bucket/prefix or a directory (default: CT_STORE)")
    p.add_argument("--model", help="model name (default: CT_MODEL_NAME)")
    # Unset flags (None) take the config's serving: section.
    p.add_argument("--host", help="bind address, 0.0.0.0 in a pod (default: serving.host)")
    p.add_argument("--port", type=int, help="HTTP port, 0 for any free one (default: serving.port, 8080)")
    p.add_argument("--poll-seconds", type=float,
                   help="how often the production alias is read, one small GET (default: serving.poll_seconds)")
    p.add_argument("--max-body-bytes", type=int, help="larger requests get 413 (default: serving.max_body_bytes)")
    p.add_argument("--max-batch", type=int, help="most images in one request (default: serving.max_batch)")
    p.add_argument("--batch-wait-ms", type=float,
                   help="how long an idle worker waits for more requests to merge into one model call; "
                        "0: never, requests that arrive while the model is busy are merged anyway "
                        "(default: serving.batch_wait_ms)")
    p.add_argument("--max-batch-images", type=int,
                   help="most images in one merged model call (default: serving.max_batch_images)")
    p.add_argument("--threads", type=int,
                   help="torch/faiss threads per request, 0: all CPUs; requests run in parallel "
                        "(default: serving.threads)")
    p.add_argument("--workers", type=int,
                   help="worker processes, each loads the model and follows the alias; 0: one per CPU "
                        "(default: serving.workers)")
    p.add_argument("--probe-port", type=int,
                   help="a second port answering only the health probes and /metrics; 0: any free one, "
                        "-1: none (default: serving.probe_port, 8081)")
    p.add_argument("--search", choices=("exact", "ivf"),
                   help="exact: the package's flat index; ivf: an inverted-file index built from it at "
                        "load, much faster on a large gallery (default: serving.search)")
    p.add_argument("--notice-channel", default=None,
                   help="Redis pub/sub channel whose messages trigger an alias check at once "
                        "(default: ct:alias:<model> when REDIS_URL is set; '' for none)")
    p.add_argument("--log-level", default="INFO")


def with_config_defaults(args: argparse.Namespace, settings) -> argparse.Namespace:
    """Flags not given take the config's ``serving:`` values."""
    for key, value in settings.serving:
        if key != "url" and getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def limits_of(args: argparse.Namespace):
    from serving.limits import HttpLimits
    return HttpLimits(max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
                      max_body_bytes=args.max_body_bytes, max_connections=args.max_connections,
                      keepalive_seconds=args.keepalive_seconds, request_seconds=args.request_seconds,
                      shutdown_seconds=args.graceful_seconds)


def run(args: argparse.Namespace) -> int:
    from core.config import load_settings
    from ctbot.lifetime import until_signalled
    from steps.cpus import available_cpus

    settings = load_settings(getattr(args, "config", None))
    with_config_defaults(args, settings)
    if args.threads:
        # Before torch and faiss load: torch and faiss each bring an OpenMP runtime, and
        # set_num_threads reaches only one; an idle worker of the other spun on every
        # request (bench: 29 ms CPU per one-image request against 9 ms with this set).
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = args.model or settings.model_name
    channel = args.notice_channel if args.notice_channel is not None else f"ct:alias:{model}"
    probe_port = None if args.probe_port < 0 else args.probe_port
    workers = args.workers or available_cpus()

    def say_ready(url: str, probe_url: str | None, what: str) -> None:
        # One machine-readable line: tests and the bench read the chosen port from it.
        print(f"ctbot serve-model: serving {url} ({what})", flush=True)
        if probe_url:
            print(f"ctbot serve-model: probes and metrics on {probe_url}", flush=True)

    if workers > 1:   # the supervisor stays free of torch: each worker loads its own model
        from serving.server import WorkerSpec, run_workers
        spec = WorkerSpec(store=args.store or settings.store, model=model, poll_seconds=args.poll_seconds,
                          max_body_bytes=args.max_body_bytes, max_batch=args.max_batch, threads=args.threads,
                          infer_threads=args.infer_threads, search=args.search, redis_url=settings.redis_url,
                          notice_channel=channel, log_level=args.log_level, batch_wait_ms=args.batch_wait_ms,
                          max_batch_images=args.max_batch_images)
        return run_workers(spec, workers, args.host, args.port, limits=limits_of(args), probe_port=probe_port,
                           graceful_seconds=args.graceful_seconds, on_ready=say_ready)

    from ctbot.wiring import build_store
    from serving.app import start_serving
    from steps.storage import open_store

    store = open_store(args.store) if args.store else build_store(settings)
    serving = start_serving(store, model, host=args.host, port=args.port,
                            poll_seconds=args.poll_seconds, max_body_bytes=args.max_body_bytes,
                            max_batch=args.max_batch, threads=args.threads, search=args.search,
                            redis_url=settings.redis_url, notice_channel=channel, probe_port=probe_port,
                            infer_threads=args.infer_threads, limits=limits_of(args),
                            graceful_seconds=args.graceful_seconds, batch_wait_ms=args.batch_wait_ms,
                            max_batch_images=args.max_batch_images)
    current = serving.holder.current
    why = serving.holder.last_error or "no production model yet"
    say_ready(serving.url, serving.probe_url, f"{model} v{current.version}" if current else f"{model}: {why}; not ready")
    until_signalled()
    serving.stop()
    return 0
