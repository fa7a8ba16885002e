"""Small modules and functions: no module in core/ over 400 lines, the service facade at
most 350, no function in the product packages over 60 lines;
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


PRODUCT = ["ctbot", "devkit", "bot", "scheduler", "pipelines", "serving", "core", "steps"]
MAX_FUNCTION_LINES = 60


def test_no_product_function_is_longer_than_60_lines():
    import ast
    long = []
    for pkg in PRODUCT:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these by what they do:\n" + "\n".join(long)
