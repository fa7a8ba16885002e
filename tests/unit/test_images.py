"""The Dockerfile, read statically (no Docker engine runs here): the bot image installs
no torch or faiss, the trainer gets CPU torch unless told otherwise, dependencies come
before sources, the base is pinned, nothing runs as root."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "faiss")


def stages() -> dict[str, dict]:
    """name -> {"from": parent, "lines": [instructions]} of every stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = {"from": m[1], "lines": []}
            out[m[2] or f"stage{len(out)}"] = current
        elif current is not None:
            current["lines"].append(line)
    return out


def chain(name: str) -> list[str]:
    """Every instruction that builds stage ``name``, its ancestors' first."""
    all_stages = stages()
    lines = []
    while name in all_stages:
        lines = all_stages[name]["lines"] + lines
        name = all_stages[name]["from"]
    return lines


def requirements(*extras: str) -> list[str]:
    """What the Dockerfile's requirements helper prints for ``extras`` (it is the same code)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"]) + [d for e in extras for d in project["optional-dependencies"][e]]
    return [d for d in deps if not d.startswith("torch")]


def test_pyproject_base_dependencies_exclude_torch_and_faiss():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps]
    assert not [n for n in names if n.startswith(HEAVY)], names
    assert not [d for d in requirements() if d.lower().startswith(HEAVY)]


def test_bot_target_installs_no_torch_or_faiss():
    lines = chain("bot")
    runs = [line for line in lines if line.upper().startswith("RUN")]
    assert not [r for r in runs if re.search(r"\b(torch|faiss)", r) and "ctbot-requirements.py" not in r]
    # its requirements are pyproject's base list only, with no extra named
    [req] = [r for r in runs if "ctbot-requirements.py >" in r]
    assert re.search(r"ctbot-requirements\.py\s*>", req)
    assert "pip install ." in " ".join(runs)
    assert not [ln for ln in lines if re.match(r"COPY\s+(serving|devkit|tests)\b", ln)]


def test_trainer_gets_cpu_torch_by_default_and_a_cuda_build_arg():
    lines = chain("trainer")
    args = dict(re.match(r"ARG\s+(\w+)=(\S+)", ln).groups() for ln in lines if re.match(r"ARG\s+\w+=", ln))
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    install = next(ln for ln in lines if "torch==" in ln)
    assert "--index-url ${TORCH_INDEX}" in install and "ctbot-requirements.py train" in install
    assert any(re.match(r"COPY\s+serving\b", ln) for ln in lines)
    # KFP's launcher writes artifacts under these as the image's (non-root) user
    assert any(re.search(r"chown 10001:10001 /minio /s3 /gcs", ln) for ln in lines)


@pytest.mark.parametrize("target", ["bot", "trainer"])
def test_dependencies_before_sources_non_root_home_set(target):
    lines = chain(target)
    first_install = next(i for i, ln in enumerate(lines) if "pip install -r" in ln)
    first_source = next(i for i, ln in enumerate(lines) if re.match(r"COPY\s+(ctbot|core|steps)\b", ln))
    assert first_install < first_source
    copies_before = [ln for ln in lines[:first_install] if ln.startswith("COPY")]
    assert copies_before == ["COPY pyproject.toml README.md ./"]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER")]
    assert users and re.fullmatch(r"[1-9]\d+(:[1-9]\d+)?", users[-1])   # numeric: runAsNonRoot can check it
    assert any("HOME=/home/ctbot" in ln for ln in lines if ln.startswith("ENV"))


def test_base_image_is_pinned():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    for stage in stages().values():
        assert stage["from"] != "latest" and not stage["from"].endswith(":latest")


def test_dockerignore_lets_in_only_what_the_images_need():
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "**"                         # deny by default
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {ln.split()[1] for s in stages().values() for ln in s["lines"] if ln.startswith("COPY")}
    copied = {w for c in copied for w in c.split()} - {"./"}
    assert copied <= allowed | {"pyproject.toml", "README.md"}
    assert not allowed & {".venv", ".git", "tests", "devkit", ".env", "k8s"}
    assert "**/.env" in rules


def test_trainer_copies_every_package_serve_model_imports():
    import subprocess
    import sys
    code = ("import sys, ctbot.cli, ctbot.serve_model, serving.app, serving.model, ctbot.wiring; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    ours = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()} & set(out.stdout.split())
    copied = {ln.split()[1] for ln in chain("trainer") if re.match(r"COPY\s+\w+\s+\w+$", ln)}
    assert {"ctbot", "core", "steps", "serving"} <= ours <= copied, (ours, copied)
