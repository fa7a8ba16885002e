"""Slash-command ack latency of the bot process (`ctbot serve`, uvicorn), vs Bolt's built-in app.start().

    .venv/bin/python bench/bench_ack.py [--single 200] [--clients 20] [--requests-per-client 30] [--slow 300]
    .venv/bin/python bench/bench_ack.py --smoke      # a few requests each, seconds; no figure judged

What it does, on 127.0.0.1 (Bolt's app.start() itself binds 0.0.0.0; it is only ever
called over loopback here):
  * starts a private redis-server, the Slack stand-in (Web API + response_urls) and a
    local store; puts a *running* training run in Redis (run record + the model lock) whose
    "training" is a sleeping process carrying the run id, so the run watch (every 1 s
    here) keeps polling it and it stays active;
  * starts the bot as deployed (`ctbot serve`: scheduler in-process, slow work in two
    niced job-worker processes) and times process start -> first answer on /healthz;
    reads its RSS from /proc and whether torch or faiss got imported (/healthz reports
    its sys.modules);
  * sends signed slash commands (a mix of help, status, train epochs=3, runs 5 and a
    typo), each on a new connection, back to back from 1 and from 20 concurrent clients
    (in a separate process, so the stand-in's work doesn't slow the measuring clients),
    and records time-to-ack; the same with slow work on threads in the bot process
    (--job-workers 0), and with Bolt's app.start() as the baseline server;
  * the same 20 clients again while --slow (300) more connections each send a request
    head one byte a second (held: the bot's whole-request deadline is raised for the run);
  * meanwhile a prober times GET /livez and /readyz on the probe listener every 20 ms;
  * stops Redis (SIGSTOP) and times /readyz turning 503 and 20 acks answering that the
    state store can't be reached;
  * checks the slow work still happened after the acks (response_url replies arrived).
Bar: p99 <= 50 ms at 20 concurrent clients for the deployed configuration, with and
without the slow clients; probes p99 <= 100 ms throughout; with Redis hung, /readyz
503 within 2 s and each ack within 1 s; torch and faiss never imported. Exit code 1 if any is missed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.state import StateStore  # noqa: E402
from core.types import RunRecord  # noqa: E402
from devkit.localservices import free_port, start_redis  # noqa: E402
from devkit.standin import SlackStandin  # noqa: E402

SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench"
MIX = ["help", "status", "train epochs=3", "runs 5", "trian"]
SLOW = {"status", "train epochs=3", "runs 5"}          # answered after the ack, via response_url
TRIGGERS = __import__("itertools").count(1)
BAR_P99_MS = 50.0
BAR_PROBE_P99_MS = 100.0
BOLT_DEV_SERVER = """
import logging, sys
from ctbot.wiring import build_bot, build_deps
from core.config import Settings
logging.basicConfig(level=logging.WARNING)
proc = build_bot(build_deps(Settings.from_env()), with_scheduler=False)
proc.app.background.start()
proc.app.start(port=int(sys.argv[1]), path="/slack/events", http_server_logger_enabled=False)
"""
# The same app under uvicorn through Bolt's own ASGI adapter, which runs app.dispatch on
# the event loop; /livez and /readyz answered on that loop too (constant, no check).
BOLT_ASGI_SERVER = """
import logging, sys, uvicorn
from slack_bolt.adapter.asgi import SlackRequestHandler
from ctbot.wiring import build_bot, build_deps
from core.config import Settings
logging.basicConfig(level=logging.WARNING)
proc = build_bot(build_deps(Settings.from_env()), with_scheduler=False)
proc.app.background.start()
bolt = SlackRequestHandler(proc.app)
async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] in ("/livez", "/readyz", "/healthz"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})
        return
    await bolt(scope, receive, send)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", loop="uvloop", lifespan="off",
            log_level="warning", access_log=False, backlog=2048)
"""


def seed_active_run(redis_url: str, store_dir: Path) -> tuple[str, subprocess.Popen]:
    """A run that is really 'running': record + lock in Redis, a live process with its id."""
    from steps.storage import open_store
    run_id = "r-bench-0000-0001"
    training = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", run_id])
    state = StateStore.from_url(redis_url)
    state.create_run(RunRecord(run_id=run_id, model="mnist-arcface", trigger="manual", reason="bench run",
                               requested_by="U0ALICE01", state="running", started_at=time.time(),
                               external_id=str(training.pid), params={"epochs": 8}))
    assert state.acquire_lock("mnist-arcface", run_id, 3600)
    store = open_store(str(store_dir))
    store.put_json(f"runs/{run_id}/steps/train.json", {"step": "train", "state": "running",
                                                       "summary": {"epoch": 3, "epochs": 8}})
    store.put_bytes("data/batch-0.npz", b"not read by the bot")
    return run_id, training


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def maps_torch(pid: int) -> bool:
    """Whether a process has torch's or faiss's shared libraries mapped (imported)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "faiss" in maps


def children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


def start_bot(env: dict, kind: str, extra: list[str]) -> tuple[subprocess.Popen, str, float]:
    """Start the bot process (``kind``: ours, bolt-dev, bolt-asgi); returns (proc, events
    url, seconds until /healthz answered: ready, for ours, job workers included)."""
    port = free_port()
    args = [sys.executable, "-m", "ctbot.cli", "serve", "--port", str(port), "--log-level", "WARNING"] + extra
    if kind != "ours":   # the same app and job workers, served by Bolt's app.start() or its ASGI adapter
        args = [sys.executable, "-c", BOLT_DEV_SERVER if kind == "bolt-dev" else BOLT_ASGI_SERVER, str(port)]
    t0 = time.perf_counter()
    # Its own process group: the job workers of the Bolt baselines (which never shut their
    # pool down) are ended with it.
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    probe = f"http://127.0.0.1:{port}/healthz"
    deadline = t0 + 60
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bot exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(probe, timeout=1) as r:
                r.read()
                break
        except urllib.error.HTTPError as e:
            if kind == "ours" and e.code == 503:   # serving, not ready: job workers starting
                time.sleep(0.005)
                continue
            break                                # Bolt's server answers 404 on GET: it is serving
        except OSError:
            time.sleep(0.005)
    else:
        raise RuntimeError("bot did not start within 60 s")
    return proc, f"http://127.0.0.1:{port}/slack/events", time.perf_counter() - t0


class SlowClients:
    """``n`` connections sending a request head one byte a second, until closed."""

    def __init__(self, port: int, n: int):
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
        self.stop, self.head = threading.Event(), b"POST /slack/events HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 900
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        for i in range(len(self.head)):      # bounded: one byte a second, at most 15 minutes
            if self.stop.wait(1):
                return
            for s in self.socks:
                try:
                    s.send(self.head[i:i + 1])
                except OSError:
                    pass

    def held(self) -> int:
        n = 0
        for s in self.socks:
            s.setblocking(False)
            try:
                s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                n += 1
            except OSError:
                pass
            s.setblocking(True)
        return n

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


class Prober:
    """Times GET /livez and /readyz every 20 ms on a thread until stopped."""

    def __init__(self, base: str):
        self.base, self.stop, self.times, self.errors = base, threading.Event(), {"livez": [], "readyz": []}, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for i in range(100_000):
            if self.stop.wait(0.02):
                return
            path = ("livez", "readyz")[i % 2]
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{self.base}/{path}", timeout=10) as r:
                    r.read()
                self.times[path].append((time.perf_counter() - t0) * 1000)
            except OSError:
                self.errors += 1

    def result(self) -> dict:
        self.stop.set()
        self.thread.join(15)
        out = {"errors": self.errors}
        for path, xs in self.times.items():
            q = statistics.quantiles(xs, n=100) if len(xs) >= 2 else [float("nan")] * 99
            out[path] = (len(xs), q[49], q[98])
        return out


def wait_ready(probe_base: str) -> None:
    for _ in range(600):
        try:
            urllib.request.urlopen(probe_base + "/readyz", timeout=10).read()
            return
        except OSError:
            time.sleep(0.05)


def hung_redis(redis, standin: SlackStandin, url: str, probe_base: str, n: int) -> dict:
    """SIGSTOP Redis (connections hang rather than fail); time how long /readyz takes to
    say 503 and ``n`` signed `/ct status` acks one after another; SIGCONT."""
    port = urllib.parse.urlsplit(url).port
    os.kill(redis.proc.pid, signal.SIGSTOP)
    t0, to_503 = time.perf_counter(), None
    try:
        for _ in range(3000):      # every 10 ms, 30 s at most
            try:
                urllib.request.urlopen(probe_base + "/readyz", timeout=10).read()
            except urllib.error.HTTPError as e:
                if e.code == 503:
                    to_503 = time.perf_counter() - t0
                    break
            time.sleep(0.01)
        acks, specific = [], 0
        for _ in range(n):
            raw = build_request(standin, port, "status")[0]
            t = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(raw)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            acks.append((time.perf_counter() - t) * 1000)
            specific += b"can't reach its state store; nothing was changed" in out
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    return {"to_503": to_503, "acks": acks, "specific": specific}


def health(events_url: str) -> dict:
    with urllib.request.urlopen(events_url.replace("/slack/events", "/healthz"), timeout=5) as r:
        return json.loads(r.read())


def build_request(standin: SlackStandin, port: int, text: str) -> tuple[bytes, str]:
    """Raw HTTP bytes of a signed slash command, and its response id."""
    import hashlib
    import hmac
    rurl = standin.response_url("ct", "U0ALICE01")
    body = urllib.parse.urlencode({
        "token": "x", "team_id": "T0CTBOT00", "team_domain": "ctbot", "channel_id": standin.channel_id("ct"),
        "channel_name": "ct", "user_id": "U0ALICE01", "user_name": "alice", "command": "/ct", "text": text,
        "api_app_id": "A0CTBOT00", "response_url": rurl,
        "trigger_id": f"1.{next(TRIGGERS)}.bench"})   # each its own: a repeated trigger_id is a retry
    ts = str(int(time.time()))
    sig = "v0=" + hmac.new(SECRET.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    head = (f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
            f"X-Slack-Request-Timestamp: {ts}\r\nX-Slack-Signature: {sig}\r\nConnection: close\r\n\r\n")
    return head.encode() + body.encode(), rurl.rsplit("/", 1)[1]


def send(port: int, raw: bytes, timeout: float = 10.0) -> tuple[float, int]:
    """One request on a fresh connection; (seconds until the full response, HTTP status)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
            buf = b"".join(chunks)
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(rest) >= length:
                    break
    elapsed = time.perf_counter() - t0
    status = int(b"".join(chunks).split(b" ", 2)[1]) if chunks else 0
    return elapsed, status


def drive(port: int, plans: list[list[tuple[bytes, str, str]]]) -> tuple[list, list, float]:
    """Run in a separate process: one thread per client, each sending its plan back to
    back. Returns ([(latency ms, rid, text)], [error], wall seconds)."""
    sys.setswitchinterval(0.001)     # a measuring thread must not wait 5 ms for the GIL
    results, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(len(plans))

    def client(plan):
        start.wait()
        for raw, rid, text in plan:
            try:
                dt, status = send(port, raw)
                ok = status == 200
            except OSError as e:
                ok, status = False, type(e).__name__
            with lock:
                (results.append((dt * 1000, rid, text)) if ok else errors.append(status))

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - t0


def load(standin: SlackStandin, events_url: str, clients: int, per_client: int) -> dict:
    """Requests are built (signed, response_urls registered) here; a separate process
    sends them, so the stand-in's work doesn't slow the measuring clients."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    port = int(urllib.parse.urlsplit(events_url).port)
    plans = [[build_request(standin, port, MIX[(c + i) % len(MIX)]) + (MIX[(c + i) % len(MIX)],)
              for i in range(per_client)] for c in range(clients)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results, errors, wall = pool.submit(drive, port, plans).result()
    latencies = [r[0] for r in results]
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"n": clients * per_client, "ok": len(latencies), "errors": errors, "wall": wall,
            "p50": q[49], "p99": q[98], "max": max(latencies, default=float("nan")),
            "slow_rids": [rid for _, rid, text in results if text in SLOW]}


def lazy_delivered(standin: SlackStandin, rids: list[str], timeout: float = 60) -> int:
    """How many of the slow commands got their answer on the response_url (waits a bit)."""
    want = set(rids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = {c.args["rid"] for c in standin.calls("response")} & want
        if got == want:
            break
        time.sleep(0.2)
    return len({c.args["rid"] for c in standin.calls("response")} & want)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", type=int, default=200, help="requests from 1 client")
    ap.add_argument("--requests-per-client", type=int, default=30, help="requests per client at 20 clients")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--ack-threads", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also run the deployed server with these http.ack_threads, e.g. 2,8")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the 20-client rows, with and without slow clients")
    ap.add_argument("--slow", type=int, default=300, help="slow clients holding connections in the last row")
    ap.add_argument("--configs", default="threads,bolt-asgi,bolt-dev",
                    help="servers beside the deployed one: threads (jobs on threads), bolt-asgi, bolt-dev; '' none")
    ap.add_argument("--smoke", action="store_true", help="a few requests each, to see that it runs; nothing judged")
    a = ap.parse_args()
    if a.smoke:
        a.single, a.requests_per_client, a.clients, a.slow = 5, 3, 4, 10

    tmp = Path(tempfile.mkdtemp(prefix="ct-bench-"))
    redis = start_redis()
    standin = SlackStandin(bot_token=TOKEN, signing_secret=SECRET).start()
    run_id, training = seed_active_run(redis.url, tmp / "store")
    env = {**os.environ, "SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": standin.api_url,
           "REDIS_URL": redis.url, "CT_STORE": str(tmp / "store"), "CT_RUN_WORKDIR": str(tmp / "runs"),
           "CT_RUN_WATCH_SECONDS": "1", "TMPDIR": str(tmp), "CT_HTTP__PROBE_PORT": str(free_port()),
           "CT_HTTP__REQUEST_SECONDS": "900"}    # the slow clients are held for the whole run
    probe_base = f"http://127.0.0.1:{env['CT_HTTP__PROBE_PORT']}"
    rows, info, failed = [], {}, False
    try:
        others = {"threads": ("ctbot serve, job threads", "ours", ["--job-workers", "0"]),
                  "bolt-asgi": ("uvicorn + Bolt ASGI adapter", "bolt-asgi", []),
                  "bolt-dev": ("Bolt app.start(), job procs", "bolt-dev", [])}
        wanted = [] if a.smoke else [k for k in a.configs.split(",") if k in others]
        configs = [("ctbot serve, job processes", "ours", [])] + [others[k] for k in wanted]
        for n in a.ack_threads:    # the deployed server with other http.ack_threads, to choose the default
            configs.append((f"ctbot serve, {n} ack threads", "ours", [], {"CT_HTTP__ACK_THREADS": str(n)}))
        for i, (name, kind, extra, *env_extra) in enumerate(configs):
            proc, url, startup = start_bot({**env, **(env_extra[0] if env_extra else {})}, kind, extra)
            try:
                deployed = i == 0      # the figures judged and the process's own
                ours = kind == "ours" and not extra
                if deployed:
                    info["startup"] = startup
                    h = health(url)
                    info["imports"] = h["imports"]
                port = urllib.parse.urlsplit(url).port
                for _ in range(10):                          # warm-up: Bolt's auth.test, first imports
                    send(port, build_request(standin, port, "help")[0])
                plan = [(1, a.single, 0)]
                for _ in range(a.rounds):     # with and without slow clients, alternating
                    plan.append((a.clients, a.requests_per_client, 0))
                    if kind != "bolt-dev" and not extra:
                        plan.append((a.clients, a.requests_per_client, a.slow))
                for clients, per, slow_n in plan:
                    slow = SlowClients(port, slow_n) if slow_n else None
                    prober = None if kind == "bolt-dev" or extra else \
                        Prober(probe_base if ours else f"http://127.0.0.1:{port}")
                    cpu0 = cpu_seconds(proc.pid)
                    r = load(standin, url, clients, per)
                    r["delivered"] = lazy_delivered(standin, r["slow_rids"])
                    r["cpu_ms"] = (cpu_seconds(proc.pid) - cpu0) * 1000 / r["n"]      # acks + background work
                    r["probes"] = prober.result() if prober else None
                    if slow:
                        r["held"] = slow.held()
                        slow.close()
                    rows.append((name + (f" + {slow_n} slow" if slow_n else ""), clients, r))
                if deployed:
                    info["hung"] = hung_redis(redis, standin, url, probe_base, 5 if a.smoke else 20)
                    wait_ready(probe_base)
                    info["rss"], info["hwm"] = rss_mb(proc.pid)
                    info["children_rss"] = [rss_mb(int(p))[0] for p in children(proc.pid)]
                    info["children_torch"] = [maps_torch(int(p)) for p in children(proc.pid)]
                    info["imports_after"] = health(url)["imports"]
                    info["still_active"] = StateStore.from_url(redis.url).get_run(run_id).state
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)     # whatever of its group is left
    finally:
        training.terminate()
        standin.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nslash-command ack latency, new connection per request, mix: {', '.join(MIX)}")
    print(f"a training run ({run_id}) is active throughout: state={info.get('still_active')}\n")
    print(f"{'server':30} {'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'req/s':>7} {'lazy replies':>13} {'bot CPU ms/req':>14}")
    for name, clients, r in rows:
        slow = len(r["slow_rids"])
        print(f"{name:30} {clients:7d} {r['n']:8d} {len(r['errors']):6d} {r['p50']:8.1f} {r['p99']:8.1f} "
              f"{r['max']:8.1f} {r['ok'] / r['wall']:7.0f} {r['delivered']:>6d}/{slow:<6d} {r['cpu_ms']:14.2f}")
        if r.get("probes"):
            p = r["probes"]
            print(f"{'':30} probes meanwhile: /livez n={p['livez'][0]} p50 {p['livez'][1]:.1f} p99 "
                  f"{p['livez'][2]:.1f} ms; /readyz n={p['readyz'][0]} p50 {p['readyz'][1]:.1f} p99 "
                  f"{p['readyz'][2]:.1f} ms; errors {p['errors']}"
                  + (f"; slow clients still held at the end: {r['held']}" if "held" in r else ""))
        if r["errors"]:
            kinds = {}
            for e in r["errors"]:
                kinds[str(e)] = kinds.get(str(e), 0) + 1
            print(f"{'':30} errors: {kinds}")
    print(f"\nbot process: start-up to /healthz ready {info['startup']:.2f} s (job workers up), "
          f"RSS {info['rss']:.0f} MB (peak {info['hwm']:.0f} MB); its child processes (job workers and "
          f"multiprocessing's resource tracker) {' + '.join(f'{x:.0f}' for x in sorted(info['children_rss']))} MB; "
          f"torch imported: {info['imports_after']['torch']}, faiss imported: {info['imports_after']['faiss']} "
          f"(job workers: {any(info['children_torch'])})")
    print("bot CPU ms/req: CPU time of the bot process (not its job workers) per request")
    hung = info["hung"]
    print(f"Redis hung (SIGSTOP): /readyz said 503 after {hung['to_503']:.2f} s; {len(hung['acks'])} acks one after "
          f"another: p50 {statistics.median(hung['acks']):.0f} ms, max {max(hung['acks']):.0f} ms, "
          f"{hung['specific']} with the specific 'state store' answer")

    # The judged figures: the median round's (by p99) of the deployed server, with and without.
    def median_row(slow_rows: bool) -> dict:
        picked = sorted((r for name, c, r in rows if c == a.clients and name.startswith(configs[0][0])
                         and (" slow" in name) == slow_rows), key=lambda r: r["p99"])
        return picked[len(picked) // 2]
    ours, slowed = median_row(False), median_row(True)
    print(f"ack p99 with {a.slow} slow clients / without (median rounds): {slowed['p99'] / ours['p99']:.2f}x")
    if a.smoke:
        print("smoke run: nothing judged")
        return 0
    if hung["to_503"] is None or hung["to_503"] > 2 or max(hung["acks"]) > 1000 or hung["specific"] != len(hung["acks"]):
        print("FAIL: with Redis hung, /readyz must say 503 within 2 s and every ack the specific answer within 1 s")
        failed = True
    else:
        print("PASS: with Redis hung, /readyz 503 within 2 s, every ack specific within 1 s")
    if info["imports_after"]["torch"] or info["imports_after"]["faiss"] or any(info["children_torch"]):
        print("FAIL: torch/faiss imported in the bot process")
        failed = True
    for label, r in (("", ours), (f" with {a.slow} slow clients", slowed)):
        if r["errors"] or not r["p99"] <= BAR_P99_MS:
            print(f"FAIL: p99 {r['p99']:.1f} ms at {a.clients} clients{label} (bar {BAR_P99_MS:.0f} ms), "
                  f"{len(r['errors'])} errors")
            failed = True
        else:
            print(f"PASS: p99 {r['p99']:.1f} ms <= {BAR_P99_MS:.0f} ms at {a.clients} concurrent clients{label}")
        p = r["probes"]
        worst = max(p["livez"][2], p["readyz"][2])
        if p["errors"] or not worst <= BAR_PROBE_P99_MS:
            print(f"FAIL: probe p99 {worst:.1f} ms{label} (bar {BAR_PROBE_P99_MS:.0f} ms), {p['errors']} errors")
            failed = True
        else:
            print(f"PASS: probe p99 {worst:.1f} ms <= {BAR_PROBE_P99_MS:.0f} ms{label}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
