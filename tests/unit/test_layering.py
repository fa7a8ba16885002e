"""The layering in docs/architecture.md, enforced: every project import, deferred ones
inside functions included, points down the table; no module cycle anywhere."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("ctbot", "devkit", "bot", "scheduler", "pipelines", "serving", "core", "steps")
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "ctbot": {"devkit", "bot", "scheduler", "pipelines", "serving", "core", "steps"},
    "devkit": {"ctbot", "bot", "scheduler", "pipelines", "serving", "core", "steps"},
    "bot": {"core", "steps"},
    "scheduler": {"core", "steps"},
    "pipelines": {"core", "steps"},
    "serving": {"core", "steps"},
    "core": {"steps"},
    "steps": set(),
}
# Packages that must stay torch-free may only use these steps modules (the bot process
# never imports torch or faiss).
TORCH_FREE_STEPS = {"steps", "steps.layout", "steps.results", "steps.storage", "steps.params",
                    "steps.deploy", "steps.crashpoints", "steps.reuse"}
TORCH_FREE_USERS = {"bot", "scheduler", "core"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str) -> set[str]:
    """Every module ``source`` imports, at any depth (inside functions too)."""
    found = set()
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolved so the rule can't be dodged
                base = ".".join(package[:len(package) - node.level + 1])
                target = ".".join(x for x in (base, node.module) if x)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py")}


def violations(modules: dict[str, str]) -> list[str]:
    """``modules``: name -> source. Returns one line per forbidden import."""
    out = []
    for mod, source in modules.items():
        pkg = mod.split(".")[0]
        for target in sorted(imports_of(source, mod)):
            top = target.split(".")[0]
            if top in ("tests", "bench") or (top in PRODUCT and top != pkg and top not in ALLOWED[pkg]):
                out.append(f"{mod} imports {target}: {pkg}/ may import only {sorted(ALLOWED[pkg]) or 'nothing'}")
            elif (pkg in TORCH_FREE_USERS and top == "steps" and target in modules
                  and target not in TORCH_FREE_STEPS):
                out.append(f"{mod} imports {target}: {pkg}/ may use only torch-free steps modules")
    return out


def cycles(modules: dict[str, str]) -> list[list[str]]:
    """Import cycles between project modules (Tarjan's strongly connected components)."""
    graph = {m: {t for t in imports_of(src, m) if t in modules and t != m} for m, src in modules.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {m: p.read_text() for m, p in project_modules().items()}


def test_every_import_points_down_the_layers(sources):
    assert len(sources) > 50  # the walk really found the project
    assert violations(sources) == []


def test_no_import_cycle_between_modules(sources):
    assert cycles(sources) == []


def test_bot_and_scheduler_never_import_each_other(sources):
    assert "scheduler" not in ALLOWED["bot"] and "bot" not in ALLOWED["scheduler"]
    assert not [m for m, s in sources.items() if m.startswith("bot")
                and any(t.split(".")[0] == "scheduler" for t in imports_of(s, m))]


@pytest.mark.parametrize("module, source, why", [
    ("core.service", "def f():\n    from pipelines.results import read_report\n", "may import only"),
    ("bot.notifier", "import scheduler.jobs\n", "may import only"),
    ("steps.train", "from core import config\n", "nothing"),
    ("scheduler.jobs", "from devkit.standin import SlackStandin\n", "may import only"),
    ("bot.app", "from . import x\nfrom ..tests import helpers\n", "tests"),
    ("core.queries", "from steps.train import train\n", "torch-free"),
])
def test_the_check_catches_a_forbidden_import(sources, module, source, why):
    planted = {**sources, module: source}
    found = [v for v in violations(planted) if v.startswith(module + " ")]
    assert found and why in found[0]


def test_the_check_catches_a_cycle_through_a_deferred_import(sources):
    planted = {**sources, "bot.slack_client": sources["bot.slack_client"]
               + "\ndef later():\n    from bot.app import create_app\n"}
    assert ["bot.app", "bot.slack_client"] in cycles(planted)
