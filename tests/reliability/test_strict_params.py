"""Lenient parameters were a finding: `/ct train epochs=1 epochs=2` ran with the last
value, and `epochs=３` (full-width), `٣`, `3_0` and `1e1` were read as integers. Signed
slash commands at a real `ctbot serve` now get an error in the ack that names the key or
quotes the value, and nothing is started."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(300)

BAD = [
    ("train epochs=1 epochs=2", "`epochs` is given twice (`epochs=1`, `epochs=2`)"),
    ("train preset=fast preset=v0", "two presets given (`preset=fast`, `preset=v0`)"),
    ("train epochs=３", "`epochs` must be an int, got `３`"),
    ("train epochs=٣", "`epochs` must be an int, got `٣`"),
    ("train epochs=3_0", "`epochs` must be an int, got `3_0`"),
    ("train epochs=1e1", "`epochs` must be an int, got `1e1`"),
    ("train lr=０.01", "`lr` must be a float, got `０.01`"),
]


def test_repeated_keys_and_non_ascii_numbers_are_refused_in_the_ack(world, ledger):
    bot = world.bot()
    state = world.state()
    for text, needle in BAD:
        status, raw, _, _ = bot.slash(text)
        ack = json.dumps(json.loads(raw), ensure_ascii=False)   # the text as Slack shows it
        assert status == 200 and needle in ack, (text, ack)
        assert ":warning:" in ack and "Traceback" not in ack
        ledger.bad_inputs += 1
    assert state.list_runs(5) == []
    assert all(e["action"] != "train_requested" for e in state.read_audit(50))
