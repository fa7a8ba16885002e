"""docs/configuration.md is generated from the settings model and cannot drift from it,
nor from ctbot.example.yaml, whose comments give each key's meaning."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from core.config import Settings
from core.config_docs import example_comments, reference

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_page_is_what_the_model_generates():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference(), "regenerate it: ctbot config docs > docs/configuration.md"


def test_every_key_has_a_row_and_a_meaning():
    comments = example_comments()
    for key, _ in Settings().leaves():
        assert f"| `{key}` |" in reference()
        assert comments.get(key), f"{key}: no comment beside it in ctbot.example.yaml"


def test_the_cli_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "ctbot.cli", "config", "docs"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out == reference()
