"""The Slack lines about the model server: what it answers, and a lag said plainly. The
reading is stdlib only (core.serving_client), so the bot never imports torch for it."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bot.blocks import final_report, status_message
from core.serving_client import served_versions, serving_status, serving_text
from tests.slack_helpers import message_text, report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("serving, production, expect", [
    ({"url": "u", "versions": [7], "error": ""}, 7, "model server answers v7"),
    ({"url": "u", "versions": [6], "error": ""}, 7, "production is v7, serving still answers v6"),
    ({"url": "u", "versions": [], "error": ""}, 7, "production is v7, the model server serves nothing yet"),
    ({"url": "u", "versions": [], "error": ""}, None, "model server not serving yet"),
    ({"url": "http://m:1", "versions": [], "error": "unreachable (refused)"}, 7,
     "model server http://m:1: unreachable (refused)"),
    (None, 7, ""),
])
def test_serving_text(serving, production, expect):
    assert serving_text(serving, production) == expect


def test_status_shows_the_server_field_and_warns_on_lag():
    base = {"production": {"version": 7, "top1": 0.98, "updated_at": 0}}
    ok = message_text(status_message({**base, "serving": {"url": "u", "versions": [7], "error": ""}}))
    assert "Model server" in ok and "model server answers v7" in ok and ":warning:" not in ok
    lag = message_text(status_message({**base, "serving": {"url": "u", "versions": [6], "error": ""}}))
    assert ":warning: production is v7, serving still answers v6" in lag
    assert "Model server" not in message_text(status_message({**base, "serving": None}))


def test_a_deployed_report_carries_one_serving_line_above_its_buttons():
    from core.types import RunRecord
    run = RunRecord(run_id="r-1", model="mnist-arcface", trigger="manual", reason="x", requested_by="U1",
                    params={}, data_uris=[], state="succeeded", created_at=0.0)
    rep = report("r-1", version=7)
    lag = final_report(run, {**rep, "serving": {"url": "u", "versions": [6], "error": ""}})
    lines = [b for b in lag["blocks"] if "serving still answers" in json.dumps(b)]
    assert len(lines) == 1 and lines[0]["type"] == "context"
    assert lag["blocks"].index(lines[0]) == len(lag["blocks"]) - 2 and lag["blocks"][-1]["type"] == "actions"
    assert "production is v7, serving still answers v6" in message_text(lag)
    held = final_report(run, {**report("r-1", decision="hold"), "serving": {"url": "u", "versions": [6], "error": ""}})
    assert "model server" not in message_text(held)
    assert final_report(run, rep) == final_report(run, {**rep, "serving": None})


class _Meta(BaseHTTPRequestHandler):
    body = b'{"name": "m", "versions": ["3"]}'

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/v2/models/m" else 404)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *a):
        pass


def test_reading_a_server_never_raises():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Meta)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        assert served_versions(url, "m") == ([3], "")
        assert served_versions(url, "other") == ([], "HTTP 404")
        # asked to wait for v4, gives up after the wait with what it saw
        assert serving_status(url, "m", expect=4, wait=0.3)["versions"] == [3]
    finally:
        srv.shutdown()
        srv.server_close()
    versions, error = served_versions(url, "m", timeout=1)
    assert versions == [] and error.startswith("unreachable")
    assert serving_status("", "m") is None


def test_the_bot_side_does_not_load_torch_or_faiss():
    code = ("import sys, core.serving_client, core.service, bot.blocks, bot.notifier; "
            "print(sorted(m for m in ('torch', 'faiss', 'serving') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_model_flags_default_to_the_serving_section_and_override_it():
    import argparse

    from core.config import load_settings
    from ctbot.serve_model import add_arguments, with_config_defaults

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    settings = load_settings(env={"CT_SERVING__PORT": "9090", "CT_SERVING__MAX_BATCH": "16"})
    args = with_config_defaults(ap.parse_args(["--port", "0"]), settings)
    assert (args.port, args.max_batch, args.poll_seconds, args.host, args.threads) == (0, 16, 2.0, "127.0.0.1", 1)
    assert with_config_defaults(ap.parse_args([]), settings).port == 9090
