"""Prometheus metrics of the model server, served at GET /metrics.

The three phase histograms carry the names KServe's own model server uses
(``request_preprocess_seconds``, ``request_predict_seconds``,
``request_postprocess_seconds``, labelled by model), so dashboards made for KServe
predictors read them unchanged. Preprocess is parsing and checking the request body,
predict is the embedder, the search and the vote, postprocess is building the
response body; all three are recorded before the response is sent, so a scrape right
after an answer counts it. Their own registry keeps library series out of the scrape.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Several worker processes (serving.workers > 1) share their series through files in
# this directory (prometheus_client's multiprocess mode); a scrape of any worker adds
# them all up. The process_* series are then left out: they would be one worker's.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
REGISTRY = CollectorRegistry(auto_describe=True)
if not MULTIPROCESS_DIR:
    ProcessCollector(registry=REGISTRY)

# One image takes about a millisecond here, a batch of 256 tens of milliseconds.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PREPROCESS = Histogram("request_preprocess_seconds", "Parsing and checking an infer request's body",
                       ["model_name"], buckets=_BUCKETS, registry=REGISTRY)
PREDICT = Histogram("request_predict_seconds", "Embedding, search and vote of an infer request",
                    ["model_name"], buckets=_BUCKETS, registry=REGISTRY)
POSTPROCESS = Histogram("request_postprocess_seconds", "Building and writing an infer response",
                        ["model_name"], buckets=_BUCKETS, registry=REGISTRY)
INFER_REQUESTS = Counter("ctbot_serving_infer_requests_total", "Infer requests answered, by HTTP status",
                         ["model_name", "code"], registry=REGISTRY)
SERVED_VERSION = Gauge("ctbot_serving_model_version",
                       "The model version being served (0: none yet; with several workers the lowest)",
                       ["model_name"], registry=REGISTRY, multiprocess_mode="livemin")
# Micro-batching (serving.batching): one observation per model call; a count above 1
# request is a merged call.
BATCH_REQUESTS = Histogram("ctbot_serving_batch_requests", "Infer requests answered by one model call",
                           ["model_name"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
                           registry=REGISTRY)
BATCH_IMAGES = Histogram("ctbot_serving_batch_images", "Images embedded by one model call",
                         ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=REGISTRY)


def model_call(model: str, requests: int, images: int) -> None:
    BATCH_REQUESTS.labels(model).observe(requests)
    BATCH_IMAGES.labels(model).observe(images)


def infer_done(model: str, preprocess: float, predict: float, postprocess: float) -> None:
    PREPROCESS.labels(model).observe(preprocess)
    PREDICT.labels(model).observe(predict)
    POSTPROCESS.labels(model).observe(postprocess)


def exposition(model: str, version: int | None) -> tuple[bytes, str]:
    """(body, content type) of a scrape; the version gauge is read at scrape time."""
    SERVED_VERSION.labels(model).set(version or 0)
    if MULTIPROCESS_DIR:
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, MULTIPROCESS_DIR)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
