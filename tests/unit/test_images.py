"""The Dockerfile and the lock files, read statically (`./dev.sh images check` runs the
images): the bot image installs no torch, faiss, matplotlib or pillow, both install a
hashed lock that matches pyproject.toml, the trainer gets CPU torch, dependencies come
before sources, the base is pinned, nothing runs as root, and every container the
manifests run starts through its image's entrypoint."""
from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
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


LOCKS = ROOT / "requirements"
LOCK_OF = {"bot": "bot.txt", "trainer": "trainer.txt"}
STEPS_LIBRARIES = ("torch", "faiss-cpu", "pillow")
# matplotlib: no step draws with it any more (steps.heatmap), but the bot must not carry it either
NOT_IN_BOT = (*STEPS_LIBRARIES, "matplotlib")


def locked(name: str) -> dict[str, str]:
    """A lock file's pins: normalised name -> version, each checked to carry a hash."""
    text = re.sub(r"\\\n\s*", " ", (LOCKS / name).read_text())
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"{name}: not an exact pin with hashes: {line}"
        pins[re.sub(r"[-_.]+", "-", m[1].split("[")[0]).lower()] = m[2]
    return pins


def wanted(*extras: str) -> list:
    from packaging.requirements import Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]]


def test_pyproject_base_dependencies_exclude_the_steps_libraries():
    names = {re.sub(r"[-_.]+", "-", r.name).lower() for r in wanted()}
    assert not names & set(NOT_IN_BOT), names
    train = {re.sub(r"[-_.]+", "-", r.name).lower() for r in wanted("train")}
    assert set(STEPS_LIBRARIES) <= train and "matplotlib" not in train


@pytest.mark.parametrize("lock, extras", [("bot.txt", ()), ("trainer.txt", ("train",)),
                                          ("dev.txt", ("train", "demo", "test"))])
def test_lock_files_pin_every_requirement_of_pyproject_with_hashes(lock, extras):
    """A lock out of step with pyproject.toml fails here: run ./dev.sh lock."""
    pins = locked(lock)
    for req in wanted(*extras):
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{lock} lacks {req}: run ./dev.sh lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} ∉ {req}: ./dev.sh lock"
    assert "setuptools" in pins             # the build backend: installed without build isolation
    # resolved from today's dependency lists (dev.sh's deps_digest; ./dev.sh setup relocks when not)
    import hashlib
    import json
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    digest = hashlib.sha256(json.dumps([project["dependencies"], project["optional-dependencies"]],
                                       sort_keys=True).encode()).hexdigest()[:16]
    assert f"# resolved from pyproject.toml dependencies {digest}\n" in (LOCKS / lock).read_text(), "./dev.sh lock"


def test_bot_lock_has_none_of_the_steps_libraries_and_agrees_with_the_trainer():
    bot, trainer, dev = locked("bot.txt"), locked("trainer.txt"), locked("dev.txt")
    assert not set(bot) & set(NOT_IN_BOT), sorted(set(bot) & set(NOT_IN_BOT))
    assert trainer["torch"] == "2.13.0+cpu"          # the CPU wheel, not PyPI's CUDA build
    for other in (bot, dev):                          # one version of each package everywhere
        assert {k: v for k, v in other.items() if k in trainer} == {k: trainer[k] for k in other if k in trainer}


@pytest.mark.parametrize("target", ["bot", "trainer"])
def test_images_install_their_lock_with_hashes_and_nothing_unpinned(target):
    lines = chain(target)
    runs = [ln for ln in lines if ln.upper().startswith("RUN") and "pip install" in ln]
    [lock_install] = [r for r in runs if "-r requirements/" in r]
    assert "--require-hashes" in lock_install and f"-r requirements/{LOCK_OF[target]}" in lock_install
    # the project itself: no dependencies resolved, no build environment fetched
    [project] = [r for r in runs if r is not lock_install]
    assert "--no-deps" in project and "--no-build-isolation" in project
    if target == "bot":
        assert not [ln for ln in lines if re.match(r"COPY\s+(serving|devkit|tests)\b", ln)]


def test_trainer_takes_cpu_torch_from_its_index_or_a_mounted_wheel_directory():
    lines = chain("trainer")
    args = dict(re.match(r"ARG\s+(\w+)=(\S+)", ln).groups() for ln in lines if re.match(r"ARG\s+\w+=", ln))
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert "ARG PIP_FIND_LINKS" in lines
    install = next(ln for ln in lines if "requirements/trainer.txt" in ln and ln.startswith("RUN"))
    assert "${TORCH_INDEX:+--extra-index-url" in install
    assert any(re.match(r"COPY\s+serving\b", ln) for ln in lines)
    # KFP's launcher writes artifacts under these as the image's (non-root) user
    assert any(re.search(r"chown 10001:10001 /minio /s3 /gcs", ln) for ln in lines)


@pytest.mark.parametrize("target", ["bot", "trainer"])
def test_dependencies_before_sources_non_root_home_set(target):
    lines = chain(target)
    first_install = next(i for i, ln in enumerate(lines) if "pip install --require-hashes" in ln)
    first_source = next(i for i, ln in enumerate(lines) if re.match(r"COPY\s+(ctbot|core|steps)\b", ln))
    assert first_install < first_source
    copies_before = [ln for ln in lines[:first_install] if ln.startswith("COPY")]
    assert copies_before == [f"COPY requirements/{LOCK_OF[target]} requirements/"]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER")]
    assert users and re.fullmatch(r"[1-9]\d+(:[1-9]\d+)?", users[-1])   # numeric: runAsNonRoot can check it
    assert any("HOME=/home/ctbot" in ln for ln in lines if ln.startswith("ENV"))
    # an imported root file system has no ENV at all: PATH must be whole
    env = next(ln for ln in lines if ln.startswith("ENV") and "PATH=" in ln)
    assert re.search(r"PATH=/opt/venv/bin:\S*/usr/bin:\S*/bin\b", env) and "$PATH" not in env


def entrypoint(target: str) -> list[str]:
    import json
    [last] = [ln for ln in chain(target) if ln.startswith("ENTRYPOINT")][-1:]
    return json.loads(last.split(None, 1)[1])


@pytest.mark.parametrize("target", ["bot", "trainer"])
def test_both_images_run_ctbot(target):
    assert entrypoint(target) == ["ctbot"]


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
    copied = {w for c in copied for w in c.split()} - {"./", "requirements/"}
    assert all(any(fnmatch(w, a) for a in allowed) for w in copied), (copied, allowed)
    assert "requirements/*.txt" in allowed
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


def copied_packages(target: str) -> set[str]:
    return {ln.split()[1] for ln in chain(target) if re.match(r"COPY\s+\w+\s+\w+$", ln)}


def test_every_rendered_container_starts_through_its_images_entrypoint():
    """Kubernetes keeps an image's ENTRYPOINT when a container gives only ``args``: each of
    our containers must give no ``command``, and its args must parse as a ctbot command
    the image carries (the trainer's once had no ENTRYPOINT, so `serve-model` was run as
    an executable)."""
    from ctbot.cli import COMMANDS, NEEDS, build_parser
    from tests.unit.test_k8s import OVERLAYS, pod_specs, render

    targets = {"ctbot": "bot", "ctbot-trainer": "trainer"}
    seen = set()
    for overlay in OVERLAYS:
        for doc in render(overlay):
            for pod in pod_specs(doc):
                for c in (pod.get("initContainers") or []) + pod["containers"]:
                    repo = c["image"].rpartition(":")[0].rsplit("/", 1)[-1]
                    if repo not in targets:      # Redis: its own image
                        continue
                    target, where = targets[repo], f"{overlay}: {doc['metadata']['name']}/{c['name']}"
                    assert "command" not in c, f"{where} replaces the image's ENTRYPOINT"
                    assert entrypoint(target) == ["ctbot"], where
                    sub = c["args"][0]
                    assert sub in COMMANDS, f"{where}: ctbot has no command {sub!r}"
                    if sub in NEEDS:
                        assert NEEDS[sub][0] in copied_packages(target), f"{where}: the {target} image lacks {sub}"
                    build_parser(sub).parse_args(c["args"])       # exits (fails) on arguments it does not take
                    seen.add((target, sub))
    assert seen == {("bot", "serve"), ("trainer", "serve-model")}


def test_the_bot_process_imports_none_of_the_steps_libraries():
    """What the bot's image leaves out must not be imported by any module the bot process
    loads (each of bot/, core/, scheduler/, ctbot/, imported whole)."""
    import subprocess
    import sys
    code = """
import pkgutil, importlib, sys
for pkg in ("bot", "core", "scheduler", "ctbot"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name != "ctbot.serve_model":    # the trainer's command; the bot's image lacks serving/
            importlib.import_module(info.name)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not {"torch", "faiss", "matplotlib", "PIL", "serving", "devkit"} & set(out.stdout.split())


def test_a_command_whose_package_the_image_leaves_out_is_hidden_and_explained():
    """The bot's image has no devkit/ (nor serving/): `ctbot demo` there says why instead of
    an ImportError, and `ctbot --help` does not offer it. Absent here as it is there: the
    package made unimportable before ctbot starts."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['devkit'] = None; from ctbot.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    demo = subprocess.run([sys.executable, "-c", code, "demo"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert demo.returncode == 2 and "ImportError" not in demo.stderr
    assert "`demo` needs the devkit/ package" in demo.stderr and "./dev.sh demo" in demo.stderr
    shown = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert shown.returncode == 0 and "serve-model" in shown.stdout and "demo" not in shown.stdout
