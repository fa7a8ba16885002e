"""The model server's routes as a plain ASGI app: KServe's Open Inference Protocol v2 over
REST, served by uvicorn (serving.server).

    GET  /v2/health/live               200 while the process runs
    GET  /v2/health/ready              200 once a model is loaded, else 503
    GET  /v2                           server metadata (extensions: binary_tensor_data)
    GET  /v2/models/{name}             model metadata; "versions" is what is served now
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer       (also under /versions/{v}/ for the served v)
    GET  /metrics                      Prometheus (serving.metrics)

On the probe listener only the health routes and /metrics are served. Bad input is a
4xx with {"error": "what was wrong"}; every body carries model_version. Parsing,
inference and building the answer run on a small thread pool, so the event loop keeps
answering probes while a batch is embedded; each phase's metric is recorded before the
answer it counts is sent. Requests that arrive while the model is busy are merged into
one model call (serving.batching); a request that fails parsing never joins one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving import metrics
from serving.batching import Batcher
from serving.follow import ModelHolder
from serving.protocol import ProtocolError, default_k, infer_response, model_metadata, parse_infer

log = logging.getLogger("serving.asgi")

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")
_JSON = [(b"content-type", b"application/json")]
# Bodies up to this size (a few images as JSON numbers, about 0.1 ms each to parse) are
# parsed on the event loop when they queue for a model call.
INLINE_PARSE_BYTES = 16 << 10
EXTENSIONS = ["binary_tensor_data"]   # KServe's / Triton's name for the binary data extension


class ServerConfig:
    def __init__(self, model: str, *, max_body_bytes: int = 8 << 20, max_batch: int = 256,
                 max_k: int = 100, probe_port: int | None = None, batch_wait_ms: float = 0.0,
                 max_batch_images: int = 64):
        self.model, self.max_body_bytes = model, max_body_bytes
        self.max_batch, self.max_k = max_batch, max_k
        self.probe_port = probe_port
        self.batch_wait_ms, self.max_batch_images = batch_wait_ms, max_batch_images


@dataclass
class Parsed:
    """An infer request that passed parsing: what its model call and its answer need."""
    x: np.ndarray               # float32 (N,1,28,28) in [0,1]
    k: int
    rid: str | None
    outputs: list[str]
    preprocess_seconds: float


class InferenceApp:
    """ASGI callable. ``startup``/``shutdown`` (optional, blocking) run on lifespan
    events: a worker process loads its model and starts following the alias there."""

    def __init__(self, holder: ModelHolder, config: ServerConfig, *, infer_threads: int = 2,
                 startup=None, shutdown=None):
        self.holder, self.config = holder, config
        self.pool = ThreadPoolExecutor(max_workers=infer_threads, thread_name_prefix="infer")
        self.batcher = Batcher(self.pool, self._infer_parsed, wait_ms=config.batch_wait_ms,
                               max_images=config.max_batch_images)
        self._startup, self._shutdown = startup, shutdown

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        probe_only = self.config.probe_port is not None and (scope.get("server") or (None, None))[1] == \
            self.config.probe_port
        if method == "POST" and not probe_only:
            return await self._post(path, scope, receive, send)
        if method not in ("GET", "HEAD"):
            return await self._json(send, 405, {"error": f"{method} is not served here"}, close=True)
        if path == "/v2/health/live":
            return await self._json(send, 200, {"live": True})
        if path == "/v2/health/ready":
            return await self._ready(send)
        if path == "/metrics":
            current = self.holder.current
            body, ctype = metrics.exposition(self.config.model, current.version if current else None)
            return await _send(send, 200, body, [(b"content-type", ctype.encode())])
        if probe_only:
            return await self._json(send, 404, {"error": f"the probe port serves health and /metrics, not {path}"})
        return await self._get(path, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._startup:
                        await asyncio.get_running_loop().run_in_executor(None, self._startup)
                except Exception as e:   # the worker cannot serve: uvicorn exits it with a clear line
                    log.error("model server startup failed: %s: %s", type(e).__name__, e)
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._shutdown:
                    self._shutdown()
                self.pool.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---- GET ----

    async def _get(self, path: str, send) -> None:
        cfg = self.config
        if path in ("/v2", "/v2/"):
            return await self._json(send, 200, {"name": "ctbot-serving", "version": "1", "extensions": EXTENSIONS})
        m = _MODEL_PATH.match(path)
        if not m:
            return await self._json(send, 404, {"error": f"no route GET {path}"})
        model = self.holder.current
        problem = self._model_problem(m, model)
        if problem:
            return await self._json(send, 404, {"error": problem}, model)
        if m.group(3) == "/ready":
            return await self._ready(send, model)
        if m.group(3) == "/infer":
            return await self._json(send, 405, {"error": "infer takes POST"}, model)
        meta = model_metadata(cfg.model, model.version if model else None, cfg.max_batch, cfg.max_k)
        if model is None:
            meta["state"] = self._why_not_ready()
        else:   # how this version searches and embeds, for whoever tunes it
            meta["parameters"]["serving"] = {**model.how, "gallery": model.gallery_size}
        return await self._json(send, 200, meta, model)

    # ---- POST ----

    async def _post(self, path: str, scope, receive, send) -> None:
        m = _MODEL_PATH.match(path)
        if not m or m.group(3) != "/infer":
            return await self._counted(send, 404 if not m else 405, {"error": f"no route POST {path}"}, close=True)
        # One read of holder.current: this request finishes on this model whatever the
        # follower swaps in meanwhile.
        model = self.holder.current
        body = await _read_body(receive)
        if body is None:   # the client went away (or a limit closed the connection)
            return
        problem = self._model_problem(m, model)
        if problem:
            return await self._counted(send, 404, {"error": problem}, model)
        if model is None:
            return await self._counted(send, 503, {"error": f"not ready: {self._why_not_ready()}"})
        json_length = next((v.decode("latin-1") for n, v in scope["headers"]
                            if n == b"inference-header-content-length"), None)
        if self.batcher.idle():   # the model is free: this request runs at once, alone
            status, data = await self.batcher.alone(self._infer, model, body, json_length)
        else:
            status, data = await self._infer_queued(model, body, json_length)
        await _send(send, status, data, _JSON)

    async def _infer_queued(self, model, body: bytes, json_length: str | None) -> tuple[int, bytes]:
        """Parse now, then wait to be merged into the worker's next model call. A small body
        is parsed right here: that costs less than the hop to the pool and back."""
        if len(body) <= INLINE_PARSE_BYTES:
            parsed = self._parse(model, body, json_length)
        else:
            parsed = await asyncio.get_running_loop().run_in_executor(self.pool, self._parse, model, body,
                                                                      json_length)
        if not isinstance(parsed, Parsed):
            return parsed
        # Parsing gives every input form the one array form the model takes; the key keeps
        # any other form (another dtype or image size) out of its calls.
        return await self.batcher.merged(model, (parsed.x.dtype.str, parsed.x.shape[1:]), len(parsed.x), parsed)

    def _infer(self, model, body: bytes, json_length: str | None) -> tuple[int, bytes]:
        """Parse, predict, build the answer (on the pool); metrics recorded before it is sent."""
        parsed = self._parse(model, body, json_length)
        return self._infer_parsed(model, [parsed])[0] if isinstance(parsed, Parsed) else parsed

    def _parse(self, model, body: bytes, json_length: str | None) -> Parsed | tuple[int, bytes]:
        """The request's input, or its 4xx answer (counted)."""
        cfg = self.config
        t0 = time.perf_counter()
        try:
            x, k, rid, outputs = parse_infer(body, max_batch=cfg.max_batch, max_k=cfg.max_k, json_length=json_length)
            if k is None:
                k = default_k(model.gallery_size)
            elif k > model.gallery_size:
                raise ProtocolError(400, f"parameter k={k} is more than the {model.gallery_size} gallery images "
                                         f"of v{model.version}")
        except ProtocolError as e:
            metrics.INFER_REQUESTS.labels(cfg.model, str(e.status)).inc()
            return e.status, _dumps({"error": e.message, "model_version": str(model.version)})
        return Parsed(x, k, rid, outputs, time.perf_counter() - t0)

    def _infer_parsed(self, model, requests: list[Parsed]) -> list[tuple[int, bytes]]:
        """One model call for all of ``requests`` (one model snapshot), then each one's answer."""
        t0 = time.perf_counter()
        results = self._predict(model, requests)
        predict_seconds = time.perf_counter() - t0
        metrics.model_call(self.config.model, len(requests), sum(len(p.x) for p in requests))
        return [self._answer(model, p, r, predict_seconds) for p, r in zip(requests, results, strict=True)]

    def _predict(self, model, requests: list[Parsed]) -> list:
        """Each request's result, or the exception its call raised: a merged call that
        fails is retried one request at a time, so one bad request fails alone."""
        try:
            return model.predict_many([p.x for p in requests], [p.k for p in requests])
        except Exception as e:   # one log line, no traceback: a flood of them costs the disk
            if len(requests) == 1:
                log.error("inference failed: %s: %s", type(e).__name__, e)
                return [e]
            log.warning("a merged call of %d requests failed (%s: %s); running each alone",
                        len(requests), type(e).__name__, e)
            return [self._predict(model, [p])[0] for p in requests]

    def _answer(self, model, p: Parsed, result, predict_seconds: float) -> tuple[int, bytes]:
        cfg = self.config
        if isinstance(result, Exception):
            metrics.INFER_REQUESTS.labels(cfg.model, "500").inc()
            return 500, _dumps({"error": "inference failed; the server's log says why",
                                "model_version": str(model.version)})
        t0 = time.perf_counter()
        data = _dumps(infer_response(cfg.model, model.version, result, p.outputs, p.rid))
        metrics.infer_done(cfg.model, p.preprocess_seconds, predict_seconds, time.perf_counter() - t0)
        metrics.INFER_REQUESTS.labels(cfg.model, "200").inc()
        return 200, data

    # ---- helpers ----

    def _model_problem(self, m, model) -> str | None:
        name, version = m.group(1), m.group(2)
        if name != self.config.model:
            return f"unknown model {name!r}: this server serves {self.config.model!r}"
        if version is not None and (model is None or version not in (str(model.version), f"v{model.version}")):
            served = f"v{model.version}" if model else "no version yet"
            return f"version {version!r} of {name!r} is not served here (serving {served})"
        return None

    async def _ready(self, send, model=None) -> None:
        model = model or self.holder.current
        if model is None:
            return await self._json(send, 503, {"ready": False, "reason": self._why_not_ready()})
        return await self._json(send, 200, {"ready": True, "name": self.config.model}, model)

    def _why_not_ready(self) -> str:
        h = self.holder
        if h.alias_version is None:
            return "no production model yet"
        return h.last_error or f"loading v{h.alias_version}"

    async def _json(self, send, status: int, body: dict, model=None, close: bool = False) -> None:
        if "model_version" not in body:
            model = model if model is not None else self.holder.current
            body["model_version"] = str(model.version) if model is not None else None
        await _send(send, status, _dumps(body), _JSON + ([(b"connection", b"close")] if close else []))

    async def _counted(self, send, status: int, body: dict, model=None, close: bool = False) -> None:
        """An infer answer that is not an inference: counted by status before it is sent."""
        metrics.INFER_REQUESTS.labels(self.config.model, str(status)).inc()
        await self._json(send, status, body, model, close)


def _dumps(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def _send(send, status: int, data: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", b"%d" % len(data))]})
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive) -> bytes | None:
    """The whole body; its size is already bounded by serving.limits. None on disconnect."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]
