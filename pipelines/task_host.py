"""A warm start for a local run's task processes.

kfp.local starts every task as a fresh ``python -m kfp.dsl.executor_main`` process, which
then imports numpy, botocore and the steps (about 0.45 s), and torch in embed and train
(about 1 s more), before its step computes: most of a refresh's wall
(docs/continuous-training.md). For a local run, ``task_host()`` starts a host that has
all of that imported and forks each task from itself (docs/pipeline.md):

- two host processes: the first imports the light modules (about half a second) and
  serves; the second, forked from it, imports torch and faiss, then takes over. A task
  that needs them (HEAVY_TASKS) and comes meanwhile waits for the second, and is relayed.
- the run points kfp.local at a launcher (``LAUNCHER``, written beside the run) in place
  of the Python executable; the launcher hands its argv, working directory, environment
  and stdin/stdout/stderr to the host over a Unix socket, waits, and exits with the task's
  status. Anything it can't hand over (no host yet, another command) it runs with the
  real Python, as before.
- the host forks; the child takes the task's descriptors, directory and environment and
  runs ``kfp.dsl.executor_main`` as ``python -m`` would. A host never runs a step itself,
  so no thread pool of torch's or OpenMP's exists when it forks.

The hosts and their tasks stay in the run's process group, so cancelling a run (which
kills the group) ends them; they end when the run closes a pipe (or dies). They serve
only their own user (SO_PEERCRED) and only ``-m kfp.dsl.executor_main``. A cluster runs
each step in its own pod and never sees any of this.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import socket
import struct
import subprocess
import sys
from pathlib import Path

ENV = "CTBOT_TASK_HOST"
MODULE = "kfp.dsl.executor_main"
# The host listens once these are imported (half a second); a launcher that finds no host
# yet runs its task as a fresh process. (kfp's executor, not executor_main itself: runpy
# runs that afresh in every task.)
PRELOAD = ("numpy", "botocore.session", "botocore.client", "botocore.parsers", "kfp.dsl.executor",
           "pipelines.status", "pipelines.report", "steps.storage", "steps.layout", "steps.ingest",
           "steps.validate", "steps.dataset", "steps.reuse", "steps.deploy", "steps.results",
           "steps.eval_cache", "steps.laps", "steps.params")
# These a second host, forked from the first, imports while the first serves; then it
# takes over the listening socket, so no task waits on an import.
PRELOAD_HEAVY = ("faiss", "steps.index", "steps.evaluate", "steps.heatmap", "PIL.ImageDraw",
                 "PIL.ImageFont", "torch", "steps.model", "steps.embed", "steps.train")
# The components that need torch or faiss: while the second host imports them, these wait
# for it rather than import them a second time.
HEAVY_TASKS = {"train", "train_trial", "embed", "index", "evaluate"}
_HEADER = struct.Struct(">I")
_STATUS = struct.Struct(">i")

# The launcher runs with -S (no site: nothing but the standard library) and only forwards.
LAUNCHER = '''#!{python} -S
# ctbot's task launcher (pipelines/task_host.py): hands this task to the run's task host.
import json, os, socket, struct, sys
REAL, ENV, MODULE = {python!r}, {env!r}, {module!r}
argv = sys.argv[1:]
def alone():
    os.execv(REAL, [REAL, *argv])
addr = os.environ.get(ENV, "")
if not addr or argv[:2] != ["-m", MODULE]:
    alone()
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\\0" + addr[1:] if addr.startswith("@") else addr)
except OSError:
    alone()
body = json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(s, [struct.pack(">I", len(body))], [0, 1, 2])
s.sendall(body)
got = b""
while len(got) < 4:
    try:
        chunk = s.recv(4 - len(got))
    except OSError:
        chunk = b""
    if not chunk:
        sys.exit(1)   # the host went away mid-task
    got += chunk
code = struct.unpack(">i", got)[0]
if code < 0:   # the task died of a signal: so does this process, for whoever waits on it
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


class Running:
    """A started host: its ``address`` (the launcher finds it in ENV) and the ``launcher``
    to give kfp.local as its Python."""

    def __init__(self, address: str, launcher: Path, ready: int):
        self.address, self.launcher, self._ready, self._seen = address, launcher, ready, b""

    def wait_ready(self, which: bytes = b"B", timeout: float = 60.0) -> bool:
        """Block until the second host has its imports and serves (True; ``which=b"A"``:
        until the first serves), or the hosts ended first (False). Runs never wait: their
        first tasks run as fresh processes."""
        import select
        while which not in self._seen:
            if not select.select([self._ready], [], [], timeout)[0]:
                raise TimeoutError(f"the task host was not ready within {timeout} s")
            got = os.read(self._ready, 16)
            if not got:
                return False
            self._seen += got
        return True


@contextlib.contextmanager
def task_host(launcher_dir: Path, log_path: Path):
    """While inside: a started host (``Running``) serving this run's tasks. The host's own
    errors go to ``log_path``."""
    address = f"@ctbot-task-host-{os.getpid()}-{secrets.token_hex(8)}"
    launcher = Path(launcher_dir) / "python3"
    launcher.write_text(LAUNCHER.format(python=sys.executable, env=ENV, module=MODULE))
    launcher.chmod(0o700)
    env = {**os.environ, "_KFP_RUNTIME": "true"}   # what kfp.local gives every task
    # The hosts run until ``stop`` closes: when the run leaves this block, or dies; they
    # say on ``ready`` when each serves ("A": the first, "B": the second, with torch).
    stop_r, stop_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        with open(log_path, "ab") as log:
            host = subprocess.Popen([sys.executable, "-m", "pipelines.task_host", address, str(stop_r),
                                     str(ready_w)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, pass_fds=(stop_r, ready_w))
    finally:
        os.close(stop_r)
        os.close(ready_w)
    try:
        yield Running(address, launcher, ready_r)
    finally:
        os.close(stop_w)
        host.wait()
        os.close(ready_r)


def serve(address: str, stop: int, ready: int) -> None:
    """The host: import, listen, fork a child per task, send back its status. A second
    host forked from this one imports PRELOAD_HEAVY and then serves in its place; each
    ends when ``stop`` (a pipe's read end) closes, or (the first) once it handed over and
    its own tasks are done."""
    import signal
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # its tasks' statuses are waited for here
    _import(PRELOAD)
    with contextlib.suppress(Exception):   # a task then loads it itself
        from steps.storage import preload_s3
        preload_s3()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(_sockaddr(address))
    listener.listen(64)
    listener.setblocking(False)   # both hosts wait on it for a while: the one that loses an accept goes on
    _say(ready, b"A")
    hand_r, hand_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:   # the second host
        os.close(hand_r)
        _import(PRELOAD_HEAVY)
        from steps.crashpoints import pause_point
        pause_point("task_host_imported")   # tests hold it here, to send it a waiting task
        _say(hand_w, b"1")
        os.close(hand_w)
        _say(ready, b"B")
        os.close(ready)
        Host(address, listener, stop, handover=None).run()
        os._exit(0)
    os.close(hand_w)
    os.close(ready)
    Host(address, listener, stop, handover=hand_r).run()


def _say(fd: int, what: bytes) -> None:
    with contextlib.suppress(OSError):   # nobody listening is no reason to stop serving
        os.write(fd, what)


def _sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


def _import(names) -> None:
    import importlib
    for name in names:
        with contextlib.suppress(ImportError):   # a task will then import (and fail) itself
            importlib.import_module(name)


class Host:
    """One host's loop. ``handover`` (the first host's): a pipe that says b"1" when the
    second host has its imports and serves, or closes when it died. Until then a task
    that needs torch or faiss waits here, and is then relayed to the second host."""

    def __init__(self, address: str, listener: socket.socket, stop: int, handover: int | None):
        self.address, self.listener, self.handover = address, listener, handover
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, ("accept",))
        self.sel.register(stop, selectors.EVENT_READ, ("stop",))
        if handover is not None:
            self.sel.register(handover, selectors.EVENT_READ, ("handover",))
        self.accepting = True
        self.waiting: list[tuple[socket.socket, dict, list[int], bytes]] = []

    def busy(self) -> bool:
        return bool(self.waiting) or any(k.data[0] in ("task", "relay") for k in self.sel.get_map().values())

    def run(self) -> None:
        while self.accepting or self.busy():   # after a handover: until its own tasks end
            for key, _ in self.sel.select():
                what = key.data[0]
                if what == "stop":
                    return
                if what == "handover":
                    self._handed_over(os.read(self.handover, 1) == b"1")
                elif what == "accept" and self.accepting:
                    try:
                        conn, _ = self.listener.accept()
                    except BlockingIOError:   # the other host took it
                        continue
                    conn.setblocking(True)
                    self._take(conn)
                elif what == "task":
                    self._finish(key)
                elif what == "relay":
                    self._relayed(key)

    def _take(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                raise PermissionError("a task from another user")
            header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            if len(header) != _HEADER.size or len(fds) != 3:
                raise ValueError("a task came without its header and three descriptors")
            body = _read_exactly(conn, _HEADER.unpack(header)[0])
            request = json.loads(body)
            if request["argv"][:2] != ["-m", MODULE]:
                raise ValueError(f"refused: {request['argv'][:2]}")
        except (OSError, ValueError, KeyError) as e:
            sys.stderr.write(f"task host: {e}\n")
            sys.stderr.flush()
            for fd in fds:
                os.close(fd)
            conn.close()   # the launcher exits 1: the task fails, and says so in kfp's log
            return
        if self.handover is not None and _function(request) in HEAVY_TASKS:
            sys.stderr.write(f"task host: {_function(request)} waits for torch and faiss's import\n")
            sys.stderr.flush()
            self.waiting.append((conn, request, fds, body))
        else:
            self._fork(conn, request, fds)

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:   # the task: none of the host's sockets or other tasks' descriptors
            for key in list(self.sel.get_map().values()):
                if key.data[0] == "task":
                    os.close(key.fd)
                if key.data[0] in ("task", "relay"):
                    key.data[1].close()
                if key.data[0] == "relay":
                    key.data[2].close()
            for other, _, other_fds, _ in self.waiting:
                other.close()
                for fd in other_fds:
                    os.close(fd)
            self.sel.close()
            self.listener.close()
            conn.close()
            os._exit(_run_task(request, fds))
        for fd in fds:
            os.close(fd)
        self.sel.register(os.pidfd_open(pid), selectors.EVENT_READ, ("task", conn, pid))

    def _finish(self, key) -> None:
        _, conn, pid = key.data
        self.sel.unregister(key.fd)
        os.close(key.fd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:   # reaped by someone else: its status is lost, so not a success
            code = 1
        _reply(conn, code)

    def _handed_over(self, ready: bool) -> None:
        self.sel.unregister(self.handover)
        os.close(self.handover)
        self.handover = None
        if ready:   # the second host serves from now on: relay what waited to it
            self.sel.unregister(self.listener)
            self.listener.close()
            self.accepting = False
        waiting, self.waiting = self.waiting, []
        for conn, request, fds, body in waiting:
            if ready:
                self._relay(conn, fds, body)
            else:   # it died: run them here, importing what they need themselves
                self._fork(conn, request, fds)

    def _relay(self, conn: socket.socket, fds: list[int], body: bytes) -> None:
        try:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(_sockaddr(self.address))
            socket.send_fds(upstream, [_HEADER.pack(len(body))], fds)
            upstream.sendall(body)
        except OSError as e:
            sys.stderr.write(f"task host: relaying a task failed: {e}\n")
            _reply(conn, 1)
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.sel.register(upstream, selectors.EVENT_READ, ("relay", conn, upstream))

    def _relayed(self, key) -> None:
        _, conn, upstream = key.data
        self.sel.unregister(upstream)
        status = b""
        with contextlib.suppress(OSError):
            status = _read_exactly(upstream, _STATUS.size)
        upstream.close()
        _reply(conn, _STATUS.unpack(status)[0] if len(status) == _STATUS.size else 1)


def _function(request: dict) -> str:
    argv = request["argv"]
    return argv[argv.index("--function_to_execute") + 1] if "--function_to_execute" in argv[:-1] else ""


def _reply(conn: socket.socket, code: int) -> None:
    with contextlib.suppress(OSError):   # the launcher may be gone (a cancelled run)
        conn.sendall(_STATUS.pack(code))
    conn.close()


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ValueError("the peer closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _run_task(request: dict, fds: list[int]) -> int:
    """In the forked child: become the task kfp.local started, run it, return its status."""
    import atexit
    import runpy
    import tempfile
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None   # TMPDIR as the task's environment says
    import numpy as np
    np.random.seed()          # a fresh process's global generator is seeded from the OS
    sys.argv = [MODULE, *request["argv"][2:]]
    code = 0
    try:
        runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            sys.stderr.write(f"{e.code}\n")
    except BaseException:   # noqa: BLE001 - reported as python -m would, then the status
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()   # logging's flush and the like, as at a normal exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
