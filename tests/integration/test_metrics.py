"""/metrics, /livez and /readyz of the bot process as `ctbot serve` builds it (real
Redis, the moto S3 store, the Slack stand-in), after a demo-sized run: a signed
/ct train, the run finished as a pipeline finishes it, a data-watch tick."""
from __future__ import annotations

import io
import json
import logging
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from core.config import Settings
from tests.helpers import metric_samples as samples
from tests.slack_helpers import ALICE, BOT_TOKEN, SIGNING_SECRET, command_body, post


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def value(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 28, 28), np.uint8), y=np.arange(4, dtype=np.uint8))
    return buf.getvalue()


@pytest.fixture
def bot(tmp_path, redis_url, bucket, s3_store):
    from ctbot.wiring import build_bot, build_deps
    from devkit.standin import SlackStandin
    from tests.recording import RecordingRunner

    standin = SlackStandin(bot_token=BOT_TOKEN, signing_secret=SIGNING_SECRET,
                           files_dir=tmp_path / "files").start()
    settings = Settings(slack_bot_token=BOT_TOKEN, slack_signing_secret=SIGNING_SECRET,
                        slack_api_url=standin.api_url, slack_channel="#ct", redis_url=redis_url,
                        store=f"s3://{bucket}/", slack_min_update_seconds=0)
    deps = build_deps(settings, runner=RecordingRunner())
    proc = build_bot(deps, with_scheduler=False, job_workers=0).start(host="127.0.0.1", port=0)
    yield proc, deps, standin
    proc.stop()
    standin.stop()


def test_metrics_after_a_demo_sized_run(bot, s3_store):
    from tests.recording import finish_run

    proc, deps, standin = bot
    before = samples(get(proc.server.url + "/metrics")[2])
    # the data watch: a baseline, then one new object
    deps.jobs.data_watcher.tick()
    s3_store.put_bytes("data/batch-0001.npz", npz_bytes())
    deps.jobs.data_watcher.tick()

    # /ct train, signed as Slack signs it; one chat.postMessage answered 429 first
    standin.fail_next("chat.postMessage", status=429, retry_after=0)
    channel = standin.channel_id("#ct")
    rurl = standin.response_url(channel, ALICE)
    status, _ = post(proc.server.events_url, command_body("train epochs=1", user=ALICE, channel_id=channel,
                                                          response_url=rurl))
    assert status == 200
    deadline = time.monotonic() + 20
    while not deps.runner.submits and time.monotonic() < deadline:
        time.sleep(0.1)
    run_id = deps.runner.launched()[0]
    finish_run(s3_store, deps.runner, run_id, decision="deploy", top1=0.985, version=1)
    run = deps.service.refresh(run_id)
    assert run.state == "succeeded"
    deadline = time.monotonic() + 20   # the report reaches Slack after the run is finished
    while not [m for m in standin.messages(channel) if "98.50%" in json.dumps(m.blocks)]:
        assert time.monotonic() < deadline, "the report was never posted"
        deps.delivery.drain()   # what the scheduler's outbox job does (this bot runs no scheduler)
        time.sleep(0.1)

    from slack_sdk.errors import SlackApiError
    with pytest.raises(SlackApiError):
        deps.client.chat_postMessage(channel="#no-such-channel", text="x")

    code, ctype, text = get(proc.server.url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    after = samples(text)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("ctbot_ack_seconds_count", kind="command") == 1
    assert value(after, "ctbot_ack_seconds_bucket", kind="command", le="3.0") >= 1   # acked within Slack's 3 s
    assert grew("ctbot_commands_total", command="train", outcome="ok") == 1
    assert grew("ctbot_slack_api_calls_total", method="chat.postMessage") >= 1
    assert grew("ctbot_slack_api_rate_limited_total", method="chat.postMessage") == 1
    assert grew("ctbot_slack_api_errors_total", method="chat.postMessage", error="channel_not_found") == 1
    assert grew("ctbot_runs_finished_total", outcome="succeeded") == 1
    assert grew("ctbot_run_duration_seconds_count", outcome="succeeded") == 1
    now = time.time()
    assert now - 60 < value(after, "ctbot_last_successful_retrain_timestamp_seconds") <= now
    assert now - 60 < value(after, "ctbot_last_deploy_timestamp_seconds") <= now
    assert value(after, "ctbot_production_top1") == pytest.approx(0.985)
    assert now - 60 < value(after, "ctbot_data_watch_last_tick_timestamp_seconds") <= now
    assert 0 <= value(after, "ctbot_data_watch_lag_seconds") < 60
    for dep in ("redis", "s3", "kfp"):
        assert ("ctbot_dependency_errors_total", (("dependency", dep),)) in after
    assert value(after, "process_resident_memory_bytes") > 0


def test_livez_and_readyz(bot, tmp_path, redis_url):
    from bot.runtime import BotProcess

    proc, deps, _ = bot
    assert get(proc.server.url + "/livez")[:2] == (200, "application/json")
    code, _, body = get(proc.server.url + "/readyz")
    assert code == 200 and json.loads(body)["ok"] is True
    assert get(proc.server.url + "/healthz")[0] == 200     # the old name still answers

    # a store whose bucket is gone: not ready (out of the Service), but alive (no restart)
    from steps.storage import open_store
    service = deps.service
    broken = BotProcess(deps.settings, deps.client, deps.notifier, service, proc.app)
    real_store, service.store = service.store, open_store("s3://no-such-bucket-ctbot/")
    try:
        status = broken.health()
    finally:
        service.store = real_store
    assert status["ok"] is False and status["store"] == "NoSuchBucket"


def test_socket_mode_still_serves_probes_and_metrics():
    from bot.server import Readiness, serve_http

    server = serve_http(None, "127.0.0.1", 0, health=Readiness(lambda: {"ok": True}))
    try:
        assert get(server.url + "/livez")[0] == 200
        assert get(server.url + "/readyz")[0] == 200
        assert "ctbot_ack_seconds" in get(server.url + "/metrics")[2]
        req = urllib.request.Request(server.url + "/slack/events", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 404       # no Slack route: Socket Mode delivers over its socket
    finally:
        server.shutdown()


def test_a_hanging_readiness_check_does_not_hold_the_request():
    from bot.server import READY_WAIT, Readiness

    release = __import__("threading").Event()
    ready = Readiness(lambda: release.wait(30) and {"ok": True})
    t0 = time.monotonic()
    status = __import__("asyncio").run(ready.status())
    assert time.monotonic() - t0 < READY_WAIT + 1 and status["ok"] is False
    release.set()


def test_json_logs_carry_the_run_id_and_apscheduler_is_quiet():
    from core.logs import JsonFormatter, configure_logging

    fmt = JsonFormatter()
    rec = logging.LogRecord("core.service", logging.INFO, __file__, 1, "refreshing %s failed",
                            ("r-20261130-0912-ab12",), None)
    doc = json.loads(fmt.format(rec))
    assert (doc["run_id"], doc["message"], doc["level"]) == ("r-20261130-0912-ab12", "refreshing r-20261130-0912-ab12 failed", "INFO")
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain", (), None)
    rec.run_id = "r-20261130-0913-cd34"
    assert json.loads(fmt.format(rec))["run_id"] == "r-20261130-0913-cd34"
    assert json.loads(JsonFormatter("worker").format(rec))["process"] == "worker"   # a job worker's line

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(Settings(log_format="json"), "INFO")
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert not logging.getLogger("apscheduler.executors.default").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
