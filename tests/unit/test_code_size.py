"""Small modules: no module in core/ over 400 lines, and the service facade at most 350;
core/service.py's concerns live in one module each (docs/architecture.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMITS = {"core/service.py": 350}
DEFAULT = 400


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "core").glob("*.py")))
def test_core_modules_stay_small(path):
    n = len((ROOT / path).read_text().splitlines())
    assert n <= LIMITS.get(path, DEFAULT), f"{path} has {n} lines; split it by concern"


def test_the_service_facade_is_made_of_its_concerns():
    from core.commands import CommandEffects
    from core.registry_gate import RegistryGate
    from core.run_follow import RunFollow
    from core.run_start import RunStart
    from core.service import TrainingService
    assert {RunStart, RunFollow, RegistryGate, CommandEffects} <= set(TrainingService.__mro__)
