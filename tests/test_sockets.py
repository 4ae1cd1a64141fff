"""Nothing of the local stack listens beyond loopback, and nothing of it outlives it.

`workshop api` runs as a user runs it (its own process: the API, the onboarding worker, training
jobs, Triton and one stub per loaded model). A user onboards and generates, so that a training
job has run and a model's stub is up; then every listening socket of the whole process tree
(psutil) must be on 127.0.0.1 or ::1. After SIGTERM, no process of the tree is left: no
tritonserver, no stub, no training job.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from helpers.infra.local.triton_server import free_ports
from helpers.workshop.demo_subjects import get_demo_subject, subject_images
from helpers.workshop.personalization import png_bytes

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-key-for-the-socket-test-0123456789"


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket."""
    found = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            tcp_listening = connection.status == psutil.CONN_LISTEN
            udp_bound = connection.type == 2 and not connection.raddr  # SOCK_DGRAM
            if tcp_listening or udp_bound:
                found.append((name, connection.laddr.ip, connection.laddr.port))
    return found


def on_loopback(address: str) -> bool:
    """127.0.0.1 or ::1, also as an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`, a
    dual-stack socket bound to 127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def workshop_api_env(tmp_path, tiny_pipeline_dir) -> dict[str, str]:
    """The environment of a `workshop api` on free loopback ports, working in `tmp_path`."""
    api_port, router, http, grpc, metrics = free_ports(5)
    return {
        **os.environ,
        "WORKSHOP_WORK_DIR": str(tmp_path / "work"),
        "WORKSHOP_BASE_MODEL": str(tiny_pipeline_dir),
        "WORKSHOP_API_PORT": str(api_port),
        "WORKSHOP_ROUTER_PORT": str(router),
        "WORKSHOP_TRITON_HTTP_PORT": str(http),
        "WORKSHOP_TRITON_GRPC_PORT": str(grpc),
        "WORKSHOP_TRITON_METRICS_PORT": str(metrics),
        "WORKSHOP_ADMIN_KEY": ADMIN_KEY,
    }


def start_workshop_api(env: dict[str, str], log) -> subprocess.Popen:
    """`workshop api` as a user runs it, its output appended to `log`."""
    workshop = os.path.join(os.path.dirname(sys.executable), "workshop")
    with open(log, "ab") as output:
        return subprocess.Popen([workshop, "api"], env=env, stdout=output, stderr=output)


def wait_healthy(url: str, server: subprocess.Popen, log, timeout: float = 120) -> None:
    def healthy():
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            assert server.poll() is None, Path(log).read_text()[-3000:]
            return False

    wait_for(healthy, timeout, "the API")


def test_every_socket_of_the_local_stack_is_on_loopback_and_nothing_outlives_it(
    tmp_path, tiny_pipeline_dir
):
    env = workshop_api_env(tmp_path, tiny_pipeline_dir)
    api_port = int(env["WORKSHOP_API_PORT"])
    router, http, grpc = (
        int(env[f"WORKSHOP_{name}_PORT"]) for name in ("ROUTER", "TRITON_HTTP", "TRITON_GRPC")
    )
    log = tmp_path / "workshop-api.log"
    server = start_workshop_api(env, log)
    root = psutil.Process(server.pid)
    seen: dict[int, psutil.Process] = {}
    try:
        url = f"http://127.0.0.1:{api_port}"
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

        wait_healthy(url, server, log)
        key = admin.post("/v1/users", json={"user_id": "ada"}).json()["api_key"]
        ada = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        images = subject_images(get_demo_subject("demo-ada"), count=3)
        files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
        assert ada.post("/v1/photos", files=files).status_code == 201
        assert ada.post("/v1/models", json={"max_train_steps": 10}).status_code == 202

        def trained():
            seen.update({p.pid: p for p in tree(root)})  # the training job, while it runs
            return ada.get("/v1/models/m1").json()["status"] in ("AVAILABLE", "FAILED")

        wait_for(trained, 300, "the model")
        generated = ada.post(
            "/v1/generations", json={"prompt": "a photo", "num_inference_steps": 2}
        )
        assert generated.status_code == 200, generated.text

        processes = tree(root)
        seen.update({p.pid: p for p in processes})
        names = " ".join(p.name() for p in processes)
        assert "tritonserver" in names and "triton_python_b" in names, names  # a model's stub
        sockets = listening(processes)
        ports = {port for _, _, port in sockets}
        assert {api_port, router, http, grpc} <= ports, sockets
        exposed = [s for s in sockets if not on_loopback(s[1])]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        deadline = time.monotonic() + 30  # a stub exits a moment after Triton unloads it
        while [p for p in seen.values() if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p in seen.values() if alive(p)]
        described = [f"{p.pid} {p.name()}" for p in left]
        for process in left:  # never leave them running for the rest of the suite
            process.kill()
    assert not left, f"outlived the stack: {described}"
    assert server.returncode == 0, log.read_text()[-3000:]
