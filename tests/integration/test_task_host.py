"""pipelines.task_host: kfp.local's tasks forked from a host that has their imports done,
run through the real kfp.local runner and the real launcher; and the launcher running a
task itself when no host can take it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kfp import dsl, local

from pipelines.local_run import _kfp_local_env, _warm_tasks
from pipelines.task_host import ENV, HEAVY_TASKS


def _component(fn):
    return dsl.component(fn, base_image="python:3.11", install_kfp_package=False)


# Named like the pipeline's own components: the host sends "embed" to the second host
# (torch imported), "ingest" to whichever serves first.
@_component
def embed(tag: str) -> str:
    import json
    import os
    import sys
    print(f"embed says {tag} on stdout")   # noqa: T201 - what kfp's log must show
    print(f"embed says {tag} on stderr", file=sys.stderr)   # noqa: T201
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        parent = f.read().replace(b"\0", b" ").decode()
    return json.dumps({"torch_before_import": "torch" in sys.modules, "parent": parent,
                       "tmpdir": os.environ.get("TMPDIR"), "cwd": os.getcwd(), "tag": tag})


@_component
def ingest(code: int) -> str:
    if code:
        raise RuntimeError(f"ingest failed on purpose with {code}")
    return "fine"


@_component
def evaluate(signal_number: int) -> str:
    import os
    os.kill(os.getpid(), signal_number)
    return "never"


@pytest.fixture
def warm(tmp_path, monkeypatch):
    """kfp.local inside a task host, as run_local sets it up."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with _kfp_local_env(tmp), _warm_tasks(tmp, tmp_path / "host.log", True) as host:
        assert host.wait_ready()   # a run never waits; here every task must meet the host
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   raise_on_error=False)
        yield host.address


def _hosts(address: str) -> list[int]:
    """Pids of the processes serving ``address``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"pipelines.task_host" in cmd and address.encode() in cmd:
                found.append(int(d.name))
    return found


def test_a_task_forks_from_the_host_with_torch_imported_and_keeps_its_own_output(warm, capfd):
    assert "embed" in HEAVY_TASKS and "ingest" not in HEAVY_TASKS
    task = embed(tag="t1")
    got = json.loads(task.output)
    assert got["torch_before_import"] is True           # forked from the host that imported it
    assert "pipelines.task_host" in got["parent"]       # the task's parent is the host, not kfp's sh
    assert got["tmpdir"] == os.environ["TMPDIR"] and got["tag"] == "t1"
    out = capfd.readouterr()
    assert "embed says t1 on stdout" in out.out + out.err and "embed says t1 on stderr" in out.out + out.err
    assert _hosts(warm)                                  # serving while the block lasts


def test_every_task_is_a_fresh_fork(warm):
    first, second = json.loads(embed(tag="a").output), json.loads(embed(tag="b").output)
    assert (first["tag"], second["tag"]) == ("a", "b")
    assert first["torch_before_import"] and second["torch_before_import"]


def _raising(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)


def test_a_failing_task_fails_with_its_traceback(warm, capfd, tmp_path):
    _raising(tmp_path)
    assert ingest(code=0).output == "fine"
    with pytest.raises(RuntimeError, match="ingest.*finished with status.*FAILURE"):
        ingest(code=3)
    out = capfd.readouterr()
    assert "ingest failed on purpose with 3" in out.out + out.err


def test_a_task_killed_by_a_signal_fails(warm, tmp_path):
    _raising(tmp_path)
    with pytest.raises(RuntimeError, match="evaluate.*finished with status.*FAILURE"):
        evaluate(signal_number=9)


def test_the_hosts_end_with_the_run(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with _kfp_local_env(tmp), _warm_tasks(tmp, tmp_path / "host.log", True) as host:
        assert host.wait_ready()
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
        address = host.address
        assert json.loads(embed(tag="x").output)["torch_before_import"]
        assert _hosts(address)
    assert ENV not in os.environ and sys.executable.endswith(("python", "python3", "python3.11"))
    assert _hosts(address) == []


def test_the_launcher_runs_anything_else_itself(tmp_path):
    """Not `-m kfp.dsl.executor_main`, or no host at the address: the real Python runs it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with _kfp_local_env(tmp), _warm_tasks(tmp, tmp_path / "host.log", True):
        launcher = sys.executable
        other = subprocess.run([launcher, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, check=True)
        assert other.stdout.strip() == str(tuple(sys.version_info[:2]))
        nobody = subprocess.run([launcher, "-m", "kfp.dsl.executor_main", "--help"], capture_output=True,
                                text=True, env={**os.environ, ENV: "@ctbot-task-host-nobody-here"})
        assert nobody.returncode == 0 and "--function_to_execute" in nobody.stdout


def test_a_task_that_needs_torch_waits_for_the_second_host_and_runs_there(tmp_path, monkeypatch):
    """The second host held after its imports (CT_PAUSE_AT): embed, sent meanwhile, waits in
    the first host, which has no torch, and is relayed once the second serves."""
    from concurrent.futures import ThreadPoolExecutor
    flag = tmp_path / "go"
    monkeypatch.setenv("CT_PAUSE_AT", f"task_host_imported:{flag}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "host.log"
    with _kfp_local_env(tmp), _warm_tasks(tmp, log, True) as host:
        assert host.wait_ready(b"A")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
        with ThreadPoolExecutor(1) as pool:
            task = pool.submit(embed, tag="held")
            _wait_for(lambda: "embed waits for torch" in log.read_text())
            assert not task.done()
            flag.touch()                     # the second host goes on, and takes the relay
            got = json.loads(task.result(timeout=120).output)
        assert host.wait_ready()
    assert got["torch_before_import"] is True and "pipelines.task_host" in got["parent"]


def _wait_for(condition, timeout: float = 60.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
