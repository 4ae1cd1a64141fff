"""A real `tritonserver` from the nvidia-pytriton wheel: start, load a Python model, infer, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from loopback import on_loopback

from helpers.infra.local.triton_server import (
    RESTRICTED_HEADER,
    SHM_DIR,
    SHM_PREFIX,
    STUB_NAME,
    PortInUseError,
    TritonServer,
    TritonServerError,
    find_triton_home,
    free_ports,
    prepare_python_backend,
)
from helpers.settings import load_settings

# A complete config (the server runs with --disable-auto-complete-config). No `name:` line, so
# the same directory also loads under another name through SageMaker's multi-model API.
CONFIG = """\
backend: "python"
max_batch_size: 0
input [
  { name: "A", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "B", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] }
]
output [
  { name: "SUM", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "ECHO", data_type: TYPE_STRING, dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

MODEL_PY = """\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.sum_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, "SUM")["data_type"]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "B").as_numpy()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            echo = np.array([t.upper() for t in text], dtype=np.object_)
            outputs = [
                pb_utils.Tensor("SUM", (a + b).astype(self.sum_dtype)),
                pb_utils.Tensor("ECHO", echo),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
"""


def write_model(directory: Path) -> Path:
    """The add-and-echo model in `directory` (``config.pbtxt`` and ``1/model.py``)."""
    (directory / "1").mkdir(parents=True)
    (directory / "config.pbtxt").write_text(CONFIG)
    (directory / "1" / "model.py").write_text(MODEL_PY)
    return directory


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo" / "add")
    return tmp_path / "repo"


def make_server(tmp_path: Path, repository: Path, **kwargs) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    return TritonServer(repository, http, grpc, metrics, tmp_path / "triton.log", **kwargs)


def infer(client, a: list[float], b: list[float], text: str) -> tuple[np.ndarray, np.ndarray]:
    from tritonclient.http import InferInput

    inputs = [InferInput("A", [len(a)], "FP32"), InferInput("B", [len(b)], "FP32")]
    inputs[0].set_data_from_numpy(np.array(a, dtype=np.float32))
    inputs[1].set_data_from_numpy(np.array(b, dtype=np.float32))
    inputs.append(InferInput("TEXT", [1], "BYTES"))
    inputs[2].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    result = client.infer("add", inputs)
    return result.as_numpy("SUM"), result.as_numpy("ECHO")


def held_regions(pids: list[int]) -> set[str]:
    """Python-backend shared-memory regions that `pids` map."""
    names = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if SHM_PREFIX in line:
                names.add(Path(line.split()[-1]).name)
    return names


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stub_for_this_python_is_installed():
    home = find_triton_home()
    assert isinstance(prepare_python_backend(home), dict)
    stub = home / "backends" / "python" / STUB_NAME
    assert os.access(stub, os.X_OK)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert stub.read_bytes() == (home / "python_backend_stubs" / version / STUB_NAME).read_bytes()


def fake_home(tmp_path: Path, stub: Path | None) -> Path:
    """A copy of the wheel's layout that holds `stub` as the stub for this Python."""
    site = tmp_path / "site-packages"
    home = site / "pytriton" / "tritonserver"
    (home / "backends" / "python").mkdir(parents=True)
    # The stub finds libcudart through its RPATH, $ORIGIN/../../../../nvidia_pytriton.libs.
    (site / "nvidia_pytriton.libs").symlink_to(
        find_triton_home().parents[1] / "nvidia_pytriton.libs"
    )
    if stub is not None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        (home / "python_backend_stubs" / version).mkdir(parents=True)
        shutil.copy2(stub, home / "python_backend_stubs" / version / STUB_NAME)
    return home


def test_missing_stub_for_this_python_names_the_shipped_versions(tmp_path):
    with pytest.raises(TritonServerError, match="no Python-backend stub for Python 3"):
        prepare_python_backend(fake_home(tmp_path, stub=None))


def test_stub_that_cannot_load_libpython_names_the_package(tmp_path):
    # The stub of another Python version stands in for a machine without libpython3.X.
    for other in sorted((find_triton_home() / "python_backend_stubs").iterdir()):
        result = subprocess.run([other / STUB_NAME], capture_output=True, text=True)
        if f"libpython{other.name}.so" in result.stderr:
            break
    else:
        pytest.skip("every stub's libpython loads on this machine")
    home = fake_home(tmp_path, other / STUB_NAME)
    with pytest.raises(TritonServerError) as error:
        prepare_python_backend(home)
    assert f"libpython{other.name}.so.1.0: cannot open shared object file" in str(error.value)
    assert (
        f"fix: install the shared Python library, e.g. `apt-get install libpython{other.name}`"
        in str(error.value)
    )
    # The stub was still copied, with its executable bit.
    assert os.access(home / "backends" / "python" / STUB_NAME, os.X_OK)


def test_server_serves_a_python_model_and_stops_clean(tmp_path, repository):
    server = make_server(tmp_path, repository)
    with server:
        assert server.startup_seconds < 30
        client = server.client()
        assert client.is_server_ready()
        assert client.get_server_metadata()["version"].startswith("2.")
        client.load_model("add")
        total, echo = infer(client, [1.0, 2.5], [3.0, -0.5], "a photo of sks toy")
        np.testing.assert_allclose(total, [4.0, 2.0])  # empty outputs would mean numpy >= 2
        assert echo.tolist() == [b"A PHOTO OF SKS TOY"]
        stubs = server.stub_pids()
        assert len(stubs) == 1
        server_pid = server.pid
        regions = held_regions([server_pid, *stubs])
        assert regions
    assert server.shutdown_seconds < 10
    assert not server.is_running()
    assert not any(alive(pid) for pid in [server_pid, *stubs])
    left = {path.name for path in SHM_DIR.glob(f"{SHM_PREFIX}*")}
    assert not regions & left
    assert "Started HTTPService" in server.log_path.read_text()


def test_port_in_use_names_the_setting(tmp_path, repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc, metrics = free_ports(2)
        server = TritonServer(repository, port, grpc, metrics, tmp_path / "triton.log")
        with pytest.raises(PortInUseError, match=f"(?s)port {port} .*WORKSHOP_TRITON_HTTP_PORT"):
            server.start()
    assert not server.is_running()


def test_server_that_cannot_start_raises_with_its_log(tmp_path):
    server = make_server(tmp_path, tmp_path / "no-such-repository")
    with pytest.raises(TritonServerError, match="exited with code 1") as error:
        server.start()
    assert "failed to stat file" in str(error.value)
    assert not server.is_running()


def test_timeout_raises_with_the_log_and_stops_the_server(tmp_path, repository):
    server = make_server(tmp_path, repository)
    with pytest.raises(TimeoutError, match=r"not ready after 0\.001 s"):
        server.start(timeout=0.001)
    assert not server.is_running()


def test_stop_removes_regions_of_a_crashed_server_but_not_ones_in_use(tmp_path, repository):
    before, orphan, in_use = (SHM_DIR / f"{SHM_PREFIX}test-{uuid.uuid4()}" for _ in range(3))
    server = make_server(tmp_path, repository)
    try:
        before.write_bytes(b"\0")
        server.start()
        orphan.write_bytes(b"\0")
        with in_use.open("wb"):
            os.kill(server.pid, signal.SIGKILL)  # a crash: nobody cleans up after it
            server.wait(10)
            server.stop()
            assert in_use.exists()  # this test process still holds it open
        assert not orphan.exists()
        assert before.exists()  # it was there before our server started
    finally:
        server.stop()
        for path in (before, orphan, in_use):
            path.unlink(missing_ok=True)


def test_a_restricted_server_obeys_only_the_key_and_listens_on_loopback(tmp_path, repository):
    # The local endpoint's Triton: loading, unloading and inference need the router's key.
    server = make_server(tmp_path, repository, restricted_key="router-only-key")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(path: str, body: dict | None = None, key: str | None = None) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{server.url}{path}", data, method="POST")
        request.add_header("Content-Type", "application/json")
        if key is not None:
            request.add_header(RESTRICTED_HEADER, key)
        try:
            with opener.open(request, timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    request = {
        "inputs": [
            {"name": "A", "shape": [1], "datatype": "FP32", "data": [1]},
            {"name": "B", "shape": [1], "datatype": "FP32", "data": [2]},
            {"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        ]
    }
    with server:
        for key in (None, "a-guess"):
            assert call("/v2/repository/models/add/load", key=key)[0] == 403
            assert call("/v2/repository/index", key=key)[0] == 403
        assert call("/v2/repository/models/add/load", key="router-only-key")[0] == 200
        for key in (None, "a-guess"):
            assert call("/v2/models/add/infer", request, key=key)[0] == 403
            assert call("/v2/repository/models/add/unload", key=key)[0] == 403
        status, body = call("/v2/models/add/infer", request, key="router-only-key")
        assert status == 200, body
        outputs = {output["name"]: output["data"] for output in json.loads(body)["outputs"]}
        assert outputs == {"SUM": [3.0], "ECHO": ["HI"]}
        # Nothing of it listens beyond loopback, and no SageMaker front end runs.
        listening = [
            c.laddr
            for c in psutil.Process(server.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert sorted(address.port for address in listening) == sorted(server.ports.values())
        assert all(on_loopback(address.ip) for address in listening), listening


START_IN_MAIN_THREAD = "server.start()\nprint(server.pid, flush=True)\ntime.sleep(600)\n"
#: As the local endpoint's supervisor starts a Triton that died: from a thread that lives on.
START_IN_A_THREAD = (
    "import threading\n"
    "def supervise():\n"
    "    server.start(thread_lives=True)\n"
    "    print(server.pid, flush=True)\n"
    "    time.sleep(600)\n"
    "threading.Thread(target=supervise).start()\n"
)


@pytest.mark.parametrize("start", [START_IN_MAIN_THREAD, START_IN_A_THREAD])
def test_the_server_ends_when_the_process_that_started_it_is_killed(tmp_path, repository, start):
    # A notebook kernel or an API process killed with -9 must not leave tritonserver behind.
    http, grpc, metrics = free_ports(3)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from helpers.infra.local.triton_server import TritonServer\n"
        f"server = TritonServer(Path({str(repository)!r}), {http}, {grpc}, {metrics}, "
        f"Path({str(tmp_path / 'triton.log')!r}))\n"
        f"{start}"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    triton = None
    try:
        triton = int(parent.stdout.readline())
        assert psutil.Process(triton).name() == "tritonserver"
        parent.kill()
        parent.wait(10)
        assert psutil.wait_procs([psutil.Process(triton)], timeout=30)[1] == []
    finally:
        parent.kill()
        if triton is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(triton).kill()


def test_from_settings_uses_the_settings_ports_and_work_dir(tmp_path, repository):
    http, grpc, metrics = free_ports(3)
    settings = load_settings(
        work_dir=tmp_path,
        base_model=str(tmp_path),
        triton_http_port=http,
        triton_grpc_port=grpc,
        triton_metrics_port=metrics,
    )
    server = TritonServer.from_settings(settings, repository)
    assert server.url == f"http://127.0.0.1:{http}"
    assert server.log_path == tmp_path / "logs" / "tritonserver.log"
    assert f"--grpc-port={grpc}" in server.command()
    assert "--disable-auto-complete-config" in server.command()
    assert server.environment()["PATH"].startswith(str(Path(sys.executable).parent))


def test_invalid_arguments_name_the_argument(tmp_path, repository):
    with pytest.raises(ValueError, match="ports must all differ"):
        TritonServer(repository, 9000, 9000, 9001, tmp_path / "log")
    with pytest.raises(ValueError, match="`model_control`"):
        TritonServer(repository, 9000, 9001, 9002, tmp_path / "log", model_control="auto")


def test_time_to_ready_and_to_stop(tmp_path, repository, record_property):
    server = make_server(tmp_path, repository)
    begin = time.perf_counter()
    with server:
        pass
    record_property("startup_seconds", server.startup_seconds)
    record_property("shutdown_seconds", server.shutdown_seconds)
    assert server.startup_seconds + server.shutdown_seconds <= time.perf_counter() - begin


def test_serve_forever_stops_on_ctrl_c_and_sigterm(tmp_path, repository):
    http, grpc, metrics = free_ports(3)
    env = {
        **os.environ,
        "WORKSHOP_WORK_DIR": str(tmp_path),
        "WORKSHOP_BASE_MODEL": str(tmp_path),
        "WORKSHOP_TRITON_HTTP_PORT": str(http),
        "WORKSHOP_TRITON_GRPC_PORT": str(grpc),
        "WORKSHOP_TRITON_METRICS_PORT": str(metrics),
    }
    code = (
        "import sys; from pathlib import Path; from helpers.settings import load_settings; "
        "from helpers.infra.local.triton_server import serve_forever; "
        "serve_forever(load_settings(), Path(sys.argv[1]))"
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(repository)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # A terminal's Ctrl-C, even when the suite runs as a background job (which ignores
            # SIGINT, and Python keeps an ignored SIGINT ignored).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            lines = []
            while not lines or "Ctrl-C stops it" not in lines[-1]:
                line = process.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
            server_pid = int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text())
            process.send_signal(signum)
            output = process.communicate(timeout=30)[0]
        finally:
            process.kill()
        assert "Triton 2.51.0 ready" in "".join(lines)
        assert not alive(server_pid)
        if signum == signal.SIGINT:
            assert process.returncode == 0 and "Triton stopped in" in output
        else:
            assert process.returncode == 128 + signal.SIGTERM
