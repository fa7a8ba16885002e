"""Fixtures the bot's integration tests share."""
from __future__ import annotations

import pytest

from tests.slack_helpers import put_training_data, start_bot


@pytest.fixture
def bot(tmp_path, redis_url):
    """The bot over signed HTTP with training data in its store (a module may override it)."""
    b = start_bot(tmp_path, redis_url)
    put_training_data(b.store)
    yield b
    b.close()
