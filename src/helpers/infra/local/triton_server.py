"""Run a real NVIDIA Triton Inference Server (CPU, Python backend) from the `nvidia-pytriton` wheel.

The wheel ships `tritonserver` 2.51 under ``pytriton/tritonserver/`` but leaves two steps to
its user: the Python-backend stub for the running interpreter must be copied into
``backends/python/``, and the stub (which embeds Python in isolated mode) finds its packages
through the first ``python3`` on ``PATH``, not through ``PYTHONPATH``. `TritonServer` does both,
starts the server in its own process group, waits until it is ready, and on `stop()` leaves no
stub process and no shared-memory region of its own behind.

```py
with TritonServer.from_settings(settings, model_repository) as server:
    server.client().load_model("echo")
```
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import filecmp
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tritonclient.http import InferenceServerClient

    from helpers.settings import Settings

from helpers.infra.local import processes

STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
#: The settings (environment variables) that choose each port, for error messages.
PORT_SETTINGS = {
    "http_port": "WORKSHOP_TRITON_HTTP_PORT",
    "grpc_port": "WORKSHOP_TRITON_GRPC_PORT",
    "metrics_port": "WORKSHOP_TRITON_METRICS_PORT",
}
#: The header that restricted APIs ask for (`restricted_key`), and the APIs it guards: all but
#: health and metadata, so only who knows the key loads, unloads or runs a model.
RESTRICTED_HEADER = "workshop-router-key"
RESTRICTED_APIS = (
    "model-repository",
    "inference",
    "model-config",
    "shared-memory",
    "statistics",
    "trace",
    "logging",
)
_REGION_RE = re.compile(re.escape(SHM_PREFIX) + r"[^\s/]+")
_INSTALL_FIX = 'pip install "nvidia-pytriton==0.7.0" (the pin in requirements.txt)'
_REINSTALL_FIX = 'pip install --force-reinstall "nvidia-pytriton==0.7.0"'


def dying_with_parent(command: Sequence[str], thread_lives: bool = False) -> list[str]:
    """`command`, started so that it ends when this process does: when the process that
    started the server dies, even by SIGKILL, the kernel sends the server SIGTERM and it shuts
    its stubs down (`helpers.infra.local.processes`).

    The kernel signals the child when the *thread* that started it ends, so this applies only
    from the main thread, or from a thread that lives as long as the server (`thread_lives`:
    a supervisor's); from another thread `command` runs as it is and `stop()` (or `atexit`)
    must end it.
    """
    if not thread_lives and threading.current_thread() is not threading.main_thread():
        return list(command)
    return processes.dying_with_parent(command)


class TritonServerError(RuntimeError):
    """Triton could not be prepared, started or stopped; the message says why and the fix."""


class PortInUseError(TritonServerError):
    """A port Triton needs is taken; the message names the port and the setting that moves it."""


# --------------------------------------------------------------------------- installation


def find_triton_home() -> Path:
    """The ``pytriton/tritonserver`` directory of the installed `nvidia-pytriton` wheel.

    Raises:
        TritonServerError: when the wheel (or its `tritonserver` binary) is missing, with the fix.
    """
    # find_spec locates the package without importing it (importing pytriton takes a second).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(f"nvidia-pytriton is not installed\nfix: {_INSTALL_FIX}")
    home = Path(next(iter(spec.submodule_search_locations))).resolve() / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise TritonServerError(
            f"{home / 'bin' / 'tritonserver'} is missing (an incomplete nvidia-pytriton "
            f"install)\nfix: {_REINSTALL_FIX}"
        )
    return home


def prepare_python_backend(home: Path | None = None) -> dict[str, str]:
    """Install the Python-backend stub for this interpreter and check that it can start.

    The wheel ships one stub per Python minor version under ``python_backend_stubs/<3.X>/``;
    Triton looks for it in ``backends/python/``. The copy is atomic (a server starting at the
    same time never sees half a file) and keeps the executable bit.

    Args:
        home (`Path`, *optional*): the `tritonserver` directory; defaults to `find_triton_home()`.

    Returns:
        `dict[str, str]`: environment variables the server needs so that the stub can load
        ``libpython3.X.so.1.0``; empty when the system's loader finds it on its own.

    Raises:
        TritonServerError: when there is no stub for this Python, it cannot be copied, or
            ``libpython3.X.so.1.0`` cannot be loaded (with the package that provides it).
    """
    home = home or find_triton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = home / "python_backend_stubs" / version / STUB_NAME
    if not source.is_file():
        shipped = sorted(p.name for p in (home / "python_backend_stubs").glob("3.*"))
        raise TritonServerError(
            f"nvidia-pytriton has no Python-backend stub for Python {version} (it ships "
            f"{', '.join(shipped) or 'none'})\nfix: create the venv with one of those versions"
        )
    target = home / "backends" / "python" / STUB_NAME
    if not (os.access(target, os.X_OK) and filecmp.cmp(source, target, shallow=False)):
        _atomic_copy(source, target)
    return _libpython_env(target, version)


def _atomic_copy(source: Path, target: Path) -> None:
    try:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(handle)
        try:
            shutil.copyfile(source, name)
            # Executable even when an installer dropped the bit from the wheel's copy.
            os.chmod(name, os.stat(source).st_mode | 0o755)
            os.replace(name, target)
        except OSError:
            Path(name).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise TritonServerError(
            f"cannot install the Python-backend stub into {target.parent} ({error})\nfix: "
            "make the venv writable, or install nvidia-pytriton into a venv you own"
        ) from None


def _stub_loads(stub: Path, env: dict[str, str]) -> str | None:
    """None if the dynamic loader can start `stub`, else the loader's message."""
    # Without arguments the stub only complains about them; a missing library fails earlier.
    result = subprocess.run([str(stub)], env=env, capture_output=True, text=True, timeout=30)
    if "error while loading shared libraries" in result.stderr:
        return result.stderr.strip()
    return None


def _libpython_env(stub: Path, version: str) -> dict[str, str]:
    # A shared-library build of Python (pyenv, uv) has its own libpython in its LIBDIR. The stub
    # must load that one, not the system's of the same minor version: it runs this Python's
    # standard library, whose extension modules may need symbols of a later patch release
    # (pyenv 3.11.7's _ssl against Debian's 3.11.2 library: "undefined symbol _PyModule_Add").
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / f"libpython{version}.so.1.0").is_file():
        extra = {
            "LD_LIBRARY_PATH": os.pathsep.join(
                filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")])
            )
        }
        if _stub_loads(stub, {**os.environ, **extra}) is None:
            return extra
    problem = _stub_loads(stub, dict(os.environ))
    if problem is None:
        return {}
    raise TritonServerError(
        f"the Python-backend stub cannot start: {problem}\nfix: {_loader_fix(problem)}"
    )


def _loader_fix(problem: str) -> str:
    missing = re.search(r"shared libraries: (lib[\w.+-]+?)\.so", problem)
    if missing and missing.group(1).startswith("libpython"):
        return (
            f"install the shared Python library, e.g. `apt-get install {missing.group(1)}` on "
            "Debian/Ubuntu (or use a Python built with --enable-shared)"
        )
    return f"the nvidia-pytriton install is incomplete: {_REINSTALL_FIX}"


# --------------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for tests and throwaway servers)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that are free on `host` right now."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            # Hold each socket until all are chosen so the kernel never hands out one twice.
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too; without it a port in TIME_WAIT would look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def is_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for pid in _pids():
        stat = _proc_stat(pid)
        if stat and stat[1] == pgid and stat[0] != "Z":
            members.append(pid)
    return members


def _mapped_shm_regions(pids: Iterable[int]) -> set[str]:
    """Names of Python-backend shared-memory regions that `pids` map or hold open."""
    names: set[str] = set()
    marker = str(SHM_DIR / SHM_PREFIX)
    for pid in pids:
        with contextlib.suppress(OSError):
            names.update(_REGION_RE.findall(Path(f"/proc/{pid}/maps").read_text()))
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(fd.path)
                    if link.startswith(marker):
                        names.add(Path(link).name)
    return names


def _shm_regions() -> dict[str, os.stat_result]:
    regions = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM_DIR):
            if entry.name.startswith(SHM_PREFIX):
                with contextlib.suppress(OSError):
                    regions[entry.name] = entry.stat()
    return regions


# --------------------------------------------------------------------------- the server


class TritonServer:
    """A `tritonserver` process serving `model_repository` on loopback ports.

    Args:
        model_repository (`Path`): the model repository (``<name>/config.pbtxt``, ``<name>/1/``).
        http_port, grpc_port, metrics_port (`int`): ports for the HTTP/REST, gRPC and metrics
            endpoints (`free_ports(3)` for throwaway servers).
        log_path (`Path`): the log file (appended to; a directory means ``tritonserver.log``
            in it). The server's stdout and stderr, and print() in models, go there.
        model_control (`str`, defaults to `"explicit"`): Triton's ``--model-control-mode``;
            `"explicit"` loads nothing until asked (`client().load_model(name)`).
        restricted_key (`str`, *optional*): when given, every API but health and metadata
            answers only requests with the header ``workshop-router-key: <restricted_key>``
            (`restricted_headers`), on HTTP and gRPC alike. The local endpoint gives one that
            only its router knows. (Triton takes it on its command line, which local users can
            read: it keeps out other processes' requests, not another user who reads `ps`.)
        extra_args (`Sequence[str]`, defaults to `()`): more ``tritonserver`` flags.
        host (`str`, defaults to `"127.0.0.1"`): address of the HTTP, gRPC and metrics endpoints.
        exit_timeout (`int`, defaults to 10): seconds Triton waits, when stopping, for open HTTP
            connections and in-flight requests. An idle keep-alive connection holds shutdown
            this long, so close clients first (`stop()` closes those made by `client()`).
        python_bin (`Path`, *optional*): the folder whose ``python3`` the stubs embed, so whose
            packages the models import; defaults to this venv's ``bin``. (Another Python
            environment of the same minor version, e.g. one laid out as a serving image is.)

    `startup_seconds` and `shutdown_seconds` hold how long the last start and stop took.
    """

    def __init__(
        self,
        model_repository: Path,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        log_path: Path,
        model_control: str = "explicit",
        restricted_key: str | None = None,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        exit_timeout: int = 10,
        python_bin: Path | None = None,
    ) -> None:
        self.model_repository = Path(model_repository)
        self.python_bin = python_bin
        self.ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
        self.restricted_key = restricted_key
        log_path = Path(log_path)
        self.log_path = log_path / "tritonserver.log" if log_path.is_dir() else log_path
        self.model_control = model_control
        self.extra_args = tuple(extra_args)
        self.host = host
        self.exit_timeout = exit_timeout
        self.check_inputs()
        self.startup_seconds: float | None = None
        self.shutdown_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._log_offset = 0
        self._started_at = 0.0
        self._regions_before: set[str] = set()
        self._clients: weakref.WeakSet = weakref.WeakSet()

    def check_inputs(self) -> None:
        """Raise `ValueError` naming the argument when ports or the control mode are invalid."""
        for name, port in self.ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"`{name}` must be a port number in 1..65535, got {port!r}")
        if len(set(self.ports.values())) != len(self.ports):
            raise ValueError(f"the ports must all differ, got {self.ports}")
        if not isinstance(self.exit_timeout, int) or self.exit_timeout < 0:
            raise ValueError(f"`exit_timeout` must be seconds >= 0, got {self.exit_timeout!r}")
        if self.model_control not in ("none", "poll", "explicit"):
            raise ValueError(
                f"`model_control` must be 'none', 'poll' or 'explicit', got {self.model_control!r}"
            )

    @classmethod
    def from_settings(
        cls, settings: Settings, model_repository: Path, **kwargs: Any
    ) -> TritonServer:
        """A server on the ports of `settings`, logging to ``<work_dir>/logs/tritonserver.log``.

        Args:
            settings (`Settings`): the workshop's settings (`triton_*_port`, `work_dir`).
            model_repository (`Path`): the model repository.
            kwargs: any other `TritonServer` argument, e.g. `restricted_key` or `log_path`.
        """
        kwargs.setdefault("log_path", settings.work_dir / "logs" / "tritonserver.log")
        return cls(
            model_repository,
            http_port=settings.triton_http_port,
            grpc_port=settings.triton_grpc_port,
            metrics_port=settings.triton_metrics_port,
            **kwargs,
        )

    # ------------------------------------------------------------------ what it looks like

    @property
    def url(self) -> str:
        """The HTTP/REST endpoint, e.g. ``http://127.0.0.1:8100``."""
        return f"http://{self.host}:{self.ports['http_port']}"

    @property
    def restricted_headers(self) -> dict[str, str]:
        """The header a request to a restricted API must carry ({} when none is restricted)."""
        return {RESTRICTED_HEADER: self.restricted_key} if self.restricted_key else {}

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id) while it runs."""
        return self._process.pid if self.is_running() else None

    def is_running(self) -> bool:
        """Whether the server process is alive (ready or not)."""
        return self._process is not None and self._process.poll() is None

    def is_ready(self, timeout: float = 1) -> bool:
        """Whether the server runs and ``GET /v2/health/ready`` answers 200 within `timeout`."""
        if not self.is_running():
            return False
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return _answers_ok(opener, f"{self.url}/v2/health/ready", timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the server exits (at most `timeout` seconds) and return its exit code.

        Raises:
            subprocess.TimeoutExpired: still running after `timeout` seconds.
        """
        if self._process is None:
            raise TritonServerError("this server was never started or is already stopped")
        return self._process.wait(timeout)

    def client(self, **kwargs: Any) -> InferenceServerClient:
        """A `tritonclient.http.InferenceServerClient` for this server (`kwargs` passed on)."""
        from tritonclient.http import InferenceServerClient

        client = InferenceServerClient(url=f"{self.host}:{self.ports['http_port']}", **kwargs)
        self._clients.add(client)
        return client

    def stub_pids(self) -> list[int]:
        """Process ids of the Python-backend stubs (one per loaded model instance)."""
        if self._process is None:
            return []
        return [
            pid
            for pid in _group_members(self._process.pid)
            if pid != self._process.pid and _is_stub(pid)
        ]

    def model_stub_pids(self, model: str) -> list[int]:
        """The live stubs of model `model` (their command line names its folder)."""
        marker = f"/{model}/".encode()
        pids = []
        for pid in self.stub_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(marker in arg for arg in argv[1:3]):
                pids.append(pid)
        return pids

    def log_tail(self, lines: int = 25) -> str:
        """The last `lines` lines this server wrote to its log (tables squeezed)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        kept = []
        for line in text.splitlines():
            line = re.sub(r" {2,}", " ", line.rstrip())  # Triton pads its tables to 200+ chars
            if line and not re.fullmatch(r"[+-]+", line):
                kept.append(line[:400])
        return "\n".join(kept[-lines:]) or "(empty log)"

    # ------------------------------------------------------------------ start

    def command(self) -> list[str]:
        """The ``tritonserver`` command line this server runs."""
        home = find_triton_home()
        args = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--model-control-mode={self.model_control}",
            f"--backend-directory={home / 'backends'}",
            f"--cache-directory={home / 'caches'}",
            # Configs are complete; auto-completing them makes each load about 10x slower.
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout}",
            # Shutdown waits for the metrics thread's sleep (default 2 s); 250 ms keeps stop()
            # fast, and reading CPU and GPU counters 4 times a second costs next to nothing.
            "--metrics-interval-ms=250",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--http-port={self.ports['http_port']}",
            f"--grpc-port={self.ports['grpc_port']}",
            f"--metrics-port={self.ports['metrics_port']}",
        ]
        if self.restricted_key:
            restriction = f"{','.join(RESTRICTED_APIS)}:{RESTRICTED_HEADER}={self.restricted_key}"
            args += [
                f"--http-restricted-api={restriction}",
                f"--grpc-restricted-protocol={restriction}",
            ]
        return args + list(self.extra_args)

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: this venv's ``bin`` (or `python_bin`) first on ``PATH``,
        so the stub's embedded Python (which ignores ``PYTHONPATH``) finds its packages."""
        env = {**os.environ, **(extra or {})}
        python_bin = str(self.python_bin or sysconfig.get_path("scripts"))
        env["PATH"] = os.pathsep.join(filter(None, [python_bin, env.get("PATH")]))
        return env

    def check_ports(self) -> None:
        """Raise `PortInUseError` naming the port and its setting when one is taken."""
        for name, port in self.ports.items():
            host = self.host
            if not _port_is_free(host, port):
                raise PortInUseError(
                    f"port {port} ({name}) is already in use on {host}\nfix: stop what "
                    f"listens there (`ss -ltnp 'sport = :{port}'` shows it; maybe another "
                    f"Triton server) or choose a free port with {PORT_SETTINGS[name]}"
                )

    def start(self, timeout: float = 60, thread_lives: bool = False) -> TritonServer:
        """Start the server and wait until ``GET /v2/health/ready`` answers 200.

        Args:
            timeout (`float`, defaults to 60): seconds to wait for readiness.
            thread_lives (`bool`, defaults to False): the calling thread lives until the
                server stops (a supervisor's), so the server may die with it (`dying_with_parent`).

        Raises:
            PortInUseError: a port is taken (names the setting that moves it).
            TritonServerError: the server exited while starting (with the end of its log).
            TimeoutError: not ready within `timeout` (the server is stopped; with its log).
        """
        if self.is_running():
            raise TritonServerError(f"this server already runs (pid {self._process.pid})")
        extra_env = prepare_python_backend(find_triton_home())
        self.check_ports()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._regions_before = set(_shm_regions())
        self._started_at = time.time()
        begin = time.perf_counter()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                dying_with_parent(self.command(), thread_lives),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(extra_env),
                # Its own process group: stop() signals server and stubs together, and Ctrl-C
                # in a terminal reaches only us, so we shut it down in order.
                start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - begin
        return self

    def health_urls(self) -> list[str]:
        """What must answer 200 before the server counts as ready: Triton's readiness, then the
        metrics endpoint, which starts a few tens of milliseconds later."""
        return [
            f"{self.url}/v2/health/ready",
            f"http://{self.host}:{self.ports['metrics_port']}/metrics",
        ]

    def _wait_ready(self, timeout: float) -> None:
        # No proxies: a corporate HTTP_PROXY must not swallow requests to loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        pending = self.health_urls()
        deadline = time.monotonic() + timeout
        while pending:
            code = self._process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} while starting; the end of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            if _answers_ok(opener, pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tritonserver was not ready after {timeout:g} s ({pending[0]} did not "
                    f"answer 200); the end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = 30) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL after `timeout` seconds.

        Then no stub of this server survives, and the shared-memory regions that it (or its
        stubs) still held are removed from ``/dev/shm`` when no process uses them any more.
        Safe to call twice, or after a failed start.
        """
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None:
            return
        begin = time.perf_counter()
        pgid = process.pid
        alive = process.poll() is None
        # Remember what our processes hold now; once they are gone /proc cannot tell.
        held = _mapped_shm_regions(_group_members(pgid)) if alive else None
        if alive:
            self._close_clients()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)  # stubs ignore it; the server stops them
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                process.wait()
        else:
            process.wait()
        _kill_group(pgid)
        self._remove_orphan_regions(held)
        self.shutdown_seconds = time.perf_counter() - begin

    def _close_clients(self) -> None:
        # Triton waits up to exit_timeout for every open HTTP connection, idle ones included.
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                client.close()
        self._clients = weakref.WeakSet()

    def _remove_orphan_regions(self, held: set[str] | None) -> None:
        """Remove our server's leftover regions that no live process maps or holds open."""
        scan_started = time.time()
        regions = _shm_regions()
        if held is None:
            # The server had died before stop(): only regions created while it ran can be its.
            held = {
                name
                for name, stat in regions.items()
                if name not in self._regions_before and stat.st_ctime >= self._started_at
            }
        candidates = {
            name
            for name in held & set(regions)
            if regions[name].st_uid == os.getuid() and regions[name].st_ctime < scan_started
        }
        if not candidates:
            return
        in_use = _mapped_shm_regions(_pids())
        for name in candidates - in_use:
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / name).unlink()

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> TritonServer:
        return self if self.is_running() else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self._process.pid}" if self.is_running() else "stopped"
        return f"TritonServer({self.url}, repository={self.model_repository}, {state})"


def _answers_ok(opener: urllib.request.OpenerDirector, url: str, timeout: float = 2) -> bool:
    try:
        with opener.open(url, timeout=timeout) as answer:
            return answer.status == 200
    except OSError:  # refused, reset, or an HTTP error status while starting
        return False


def _is_stub(pid: int) -> bool:
    try:
        return STUB_NAME in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False


def _kill_group(pgid: int, timeout: float = 5) -> None:
    """SIGKILL whatever is left in process group `pgid` (orphaned stubs) and wait for it."""
    deadline = time.monotonic() + timeout
    while members := _group_members(pgid):
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TritonServerError(
                f"processes {members} of tritonserver group {pgid} survive SIGKILL"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- CLI hook


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def serve_forever(settings: Settings, model_repository: Path, **kwargs: Any) -> None:
    """Run a server on the settings' ports until Ctrl-C or SIGTERM (``workshop triton``).

    Args:
        settings (`Settings`): the workshop's settings.
        model_repository (`Path`): the model repository to serve.
        kwargs: passed to `TritonServer.from_settings` (e.g. `log_path`).

    Raises:
        TritonServerError: when the server cannot start or exits on its own.
    """
    server = TritonServer.from_settings(settings, model_repository, **kwargs)
    # SIGTERM (from a process manager) should stop Triton as cleanly as Ctrl-C does.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        with server:
            print(
                f"Triton {server.client().get_server_metadata()['version']} ready in "
                f"{server.startup_seconds:.2f} s"
            )
            print(f"  HTTP    {server.url}   (model repository {server.model_repository})")
            print(f"  gRPC    {server.host}:{server.ports['grpc_port']}")
            print(f"  metrics http://{server.host}:{server.ports['metrics_port']}/metrics")
            print(f"  log     {server.log_path}\nCtrl-C stops it.", flush=True)
            code = server.wait()
            raise TritonServerError(
                f"tritonserver exited on its own with code {code}; the end of "
                f"{server.log_path}:\n{server.log_tail()}"
            )
    except KeyboardInterrupt:
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"Triton stopped in {server.shutdown_seconds or 0:.2f} s.")
