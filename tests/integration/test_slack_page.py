"""The stand-in's Slack-like HTML page, rendered by a real browser.

A run's message goes through a real WebClient to the stand-in the way the notifier
sends it (posted, updated into the final report, details and the confusion matrix PNG
in its thread); headless Chromium then renders the page the stand-in wrote.
"""
from __future__ import annotations

import io
import re
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from slack_sdk import WebClient

from bot import blocks
from core.types import RunRecord
from devkit import picture
from devkit.standin import SlackStandin, mrkdwn_html
from tests.slack_helpers import ALICE, report

DIAGONAL = (8, 48, 107)          # the confusion PNG's diagonal: found in the screenshot only if it loaded
CELL = 28


def confusion_png() -> bytes:
    """A 10x10 heatmap like the evaluate step's, with a colour the page uses nowhere else."""
    img = Image.new("RGB", (10 * CELL, 10 * CELL), (247, 251, 255))
    for i in range(10):
        for j in range(10):
            colour = DIAGONAL if i == j else ((222, 235, 247) if (i + j) % 3 else (247, 251, 255))
            img.paste(colour, (j * CELL, i * CELL, (j + 1) * CELL, (i + 1) * CELL))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium as the README's picture is taken (devkit/picture.py), a fresh
    profile each time."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    try:
        return picture.browse(page, profile, *args)
    except SystemExit as e:   # chromium missing
        pytest.fail(str(e))


@pytest.fixture
def page(tmp_path):
    """The channel page after one finished run: returns (page path, final report message)."""
    with SlackStandin(files_dir=tmp_path / "uploads") as standin:
        client = WebClient(token=standin.bot_token, base_url=standin.api_url)
        now = time.time()
        run = RunRecord(run_id="r-20261117-0912-ab12", model="mnist-arcface", trigger="manual",
                        reason=f"/ct train by <@{ALICE}>", requested_by=ALICE, params={"epochs": 2},
                        data_uris=["s3://b/data/batch-0.npz"], state="running", created_at=now - 60,
                        started_at=now - 58)
        posted = client.chat_postMessage(channel="#ct", **blocks.run_progress(run, {}, now))
        channel, ts = posted["channel"], posted["ts"]
        client.chat_update(channel=channel, ts=ts, **blocks.run_progress(
            run, {"ingest": {"state": "done", "seconds": 0.4},
                  "train": {"state": "running", "summary": {"epoch": 1, "epochs": 2, "loss": 1.234}}}, now))
        run.state, run.finished_at = "succeeded", now
        final = blocks.final_report(run, report(run.run_id))
        client.chat_update(channel=channel, ts=ts, **final)
        client.chat_postMessage(channel=channel, thread_ts=ts, **blocks.thread_details(run, report(run.run_id)))
        client.files_upload_v2(channel=channel, thread_ts=ts, content=confusion_png(),
                               filename=f"confusion-{run.run_id}.png", title=f"Confusion matrix, run {run.run_id}")
        path = standin.save_html(tmp_path / "site" / "slack-channel.html")
    return path, final


def test_chromium_renders_the_final_report_and_its_confusion_matrix(page, tmp_path):
    path, final = page
    shot = tmp_path / "slack-channel.png"
    browse(path, tmp_path, f"--screenshot={shot}")
    dom = browse(path, tmp_path, "--dump-dom").stdout

    header = final["blocks"][0]["text"]["text"]
    assert header.startswith("✅ Run r-20261117-0912-ab12") and header in dom
    imgs = re.findall(r'<img[^>]*\bsrc="([^"]+)"', dom)
    assert len(imgs) == 1 and imgs[0].endswith("-confusion-r-20261117-0912-ab12.png")
    assert (path.parent / imgs[0]).is_file()        # beside the page, referenced relatively
    assert dom.index('class="thread"') < dom.index("<img")   # in the run's thread
    assert "(edited)" in dom and "2 earlier version(s)" in dom
    assert re.search(r'class="btn danger"[^>]*>Roll back<', dom)
    assert '<span class="mention">@alice</span>' in dom

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200, "the screenshot is (nearly) blank"
    assert max(ImageStat.Stat(img).stddev) > 20
    # the confusion PNG was loaded from its relative path: its diagonal cells are on screen
    diagonal = sum(n for n, c in colours if all(abs(a - b) <= 3 for a, b in zip(c, DIAGONAL, strict=True)))
    assert diagonal >= 10 * CELL * CELL * 0.9


def test_mrkdwn_becomes_html():
    users, channels = {"U0ALICE01": "alice"}, {"C0CT": "ct"}
    html = mrkdwn_html("*Decision*: _deploy_ ~old~ `a<b` x_y_z by <@U0ALICE01> in <#C0CT>\n"
                       "<https://kfp.example/r?a=1&amp;b=2|KFP run> :rocket: 1 &lt; 2\n"
                       "```step  time\ntrain 41s```\n&gt; quoted", users, channels)
    assert html == ("<b>Decision</b>: <i>deploy</i> <s>old</s> <code>a&lt;b</code> x_y_z by "
                    '<span class="mention">@alice</span> in <span class="mention">#ct</span><br>'
                    '<a href="https://kfp.example/r?a=1&amp;b=2">KFP run</a> 🚀 1 &lt; 2'
                    "<pre>step  time\ntrain 41s</pre><blockquote>quoted</blockquote>")
