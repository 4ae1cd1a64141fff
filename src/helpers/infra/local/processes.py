"""Child processes that never outlive this one, and process ids that are checked before a kill.

- `dying_with_parent(command)` wraps a command in a small launcher that sets the parent-death
  signal (`PR_SET_PDEATHSIG`, Linux) and then execs it, or, given an `exit_status` file, runs
  it as its own child, waits and writes its exit status there: a later process can then tell a
  job that finished from one that was killed, though it could not wait for it.
- `spawn(command, ...)` starts such a command from a thread that lives as long as this
  process. The kernel signals the child when the *thread* that started it ends, not the
  process, so a child started from a short-lived or closable thread would die early.
- `start_time(pid)` and `kill_group(pid, started)` let a pid read from a file be killed only
  when it still names the process that was started: pids are reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

__all__ = ["dying_with_parent", "kill_group", "read_exit_status", "spawn", "start_time"]

#: Run before the command in its own process. The launcher is single-threaded, so its
#: `preexec_fn` is safe (one in a process with threads, such as this one, is not).
_LAUNCHER = """\
import ctypes, json, os, signal, subprocess, sys
parent, status_file, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
def die_with_parent(signum):
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
die_with_parent(signal.SIGTERM)
if os.getppid() != parent:
    sys.exit("the process that started this one is gone")
if not status_file:
    os.execv(command[0], command)
child = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(signal.SIGKILL))
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
code = child.wait()
temp = status_file + ".tmp"
with open(temp, "w") as file:
    json.dump({"returncode": code}, file)
os.replace(temp, status_file)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""

_requests: queue.SimpleQueue = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def dying_with_parent(
    command: Sequence[str], exit_status: str | os.PathLike | None = None
) -> list[str]:
    """`command`, started so that it ends when the thread that starts it does (Linux).

    Args:
        command (`Sequence[str]`): the program (a path) and its arguments.
        exit_status (`str` or `os.PathLike`, *optional*): a file that receives
            `{"returncode": n}` when the command ends (`n < 0`: killed by signal `-n`).
    """
    status = os.fspath(exit_status) if exit_status is not None else ""
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), status, *command]


def spawn(
    command: Sequence[str], exit_status: str | os.PathLike | None = None, **popen: Any
) -> subprocess.Popen:
    """`subprocess.Popen(dying_with_parent(command, exit_status), **popen)`, started from a
    thread that lives as long as this process, so the command ends when the process does."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_serve, name="process-spawner", daemon=True)
            _spawner.start()
    future: Future[subprocess.Popen] = Future()
    _requests.put((future, dying_with_parent(command, exit_status), popen))
    return future.result()


def _serve() -> None:
    while True:
        future, command, popen = _requests.get()
        try:
            future.set_result(subprocess.Popen(command, **popen))
        except BaseException as error:  # handed to the caller
            future.set_exception(error)


def read_exit_status(path: str | os.PathLike) -> int | None:
    """The return code that `dying_with_parent`'s launcher wrote to `path`, or None."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        code = json.loads(Path(path).read_text())["returncode"]
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    return None


def start_time(pid: Any) -> int | None:
    """When process `pid` started (clock ticks since boot, `/proc/<pid>/stat` field 22), or
    None when it is gone, a zombie, or the platform has no `/proc`."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])  # field 22 counts from 1 and includes pid and comm


def kill_group(pid: Any, started: Any, signum: int = signal.SIGKILL) -> bool:
    """Signal process group `pid` only if process `pid` still started at `started` (from
    `start_time` when it was launched); a reused pid is left alone. Whether it was signalled."""
    if started is None or start_time(pid) != started:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
        return True
    return False
