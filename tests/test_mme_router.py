"""The local multi-model endpoint: real tritonserver + router, invoked through boto3."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from botocore.exceptions import ClientError
from loopback import on_loopback

from helpers.domain.archives import write_tar_gz
from helpers.domain.generation import invoke_model
from helpers.infra.local.endpoint import LocalEndpoint, remove_stale_runs
from helpers.infra.local.store import LocalArtifactStore
from helpers.infra.local.triton_server import SHM_DIR, SHM_PREFIX
from helpers.services.packaging import build_archive

pytestmark = pytest.mark.slow

BUCKET = "workshop-test"
PREFIX = f"s3://{BUCKET}/endpoints/test/models/"
USERS = ["demo-ada", "demo-bo", "demo-cy"]
FAST = {"num_inference_steps": 1}


@pytest.fixture(scope="module")
def store(tmp_path_factory, lora_weights, tiny_pipeline_dir) -> LocalArtifactStore:
    """A store with one packaged model per user under the endpoint prefix."""
    root = tmp_path_factory.mktemp("store")
    store = LocalArtifactStore(root / "store")
    store.create_bucket(BUCKET)
    for user in USERS:
        archive = build_archive(
            f"{user}--m1", lora_weights, str(tiny_pipeline_dir), root / f"{user}.tar.gz"
        )
        store.put_file(f"{PREFIX}{user}--m1.tar.gz", archive)
    return store


@pytest.fixture
def endpoint(store, tmp_path):
    with LocalEndpoint(store, PREFIX, tmp_path / "endpoint", max_loaded_models=2) as endpoint:
        yield endpoint
    assert not endpoint.triton.is_running()


def invoke(endpoint, user: str, **parameters):
    return invoke_model(
        endpoint.runtime_client(),
        endpoint.name,
        f"{user}--m1.tar.gz",
        "a photo of sks toy",
        **{**FAST, **parameters},
    )


def metric(endpoint, name: str) -> float:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{endpoint.url}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def error_of(call) -> ClientError:
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value


def test_every_socket_of_the_running_endpoint_is_on_loopback_and_triton_obeys_only_the_router(
    endpoint,
):
    invoke(endpoint, "demo-ada")  # a model loaded: its stub process runs too
    this = psutil.Process()
    processes = [this, *this.children(recursive=True)]
    listening = [
        (process.pid, connection.laddr)
        for process in processes
        for connection in process.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]
    ports = {address.port for _, address in listening}
    assert {endpoint.router_port, *endpoint.triton.ports.values()} <= ports
    assert all(on_loopback(address.ip) for _, address in listening), listening
    # Another local process, without the router's key: Triton refuses to load, unload or run.
    with httpx.Client(base_url=endpoint.triton.url, trust_env=False) as triton:
        assert triton.post("/v2/repository/models/demo-bo--m1/load").status_code == 403
        assert triton.post("/v2/repository/models/demo-ada--m1/unload").status_code == 403
        assert triton.post("/v2/models/demo-ada--m1/infer", json={"inputs": []}).status_code == 403
        assert triton.post("/v2/repository/index").status_code == 403
    assert endpoint.loaded_models() == ["demo-ada--m1"]


def test_boto3_invokes_a_user_model_and_the_second_call_is_a_cache_hit(endpoint):
    images = invoke(endpoint, "demo-ada", num_images=2)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    again = invoke(endpoint, "demo-ada", num_images=2)
    assert [image.tobytes() for image in again] == [image.tobytes() for image in images]
    assert metric(endpoint, "ModelCacheHit_count") == 2
    assert metric(endpoint, "ModelCacheHit_sum") == 1
    assert metric(endpoint, "LoadedModelCount") == 1
    assert metric(endpoint, "ModelDownloadingTime_count") == 1


def test_the_least_recently_used_model_is_unloaded_over_budget(endpoint):
    for user in ["demo-ada", "demo-bo", "demo-ada", "demo-cy"]:
        invoke(endpoint, user)
    assert list(endpoint.cache.evictions) == ["demo-bo--m1"]
    assert list(endpoint.cache.loaded) == ["demo-ada--m1", "demo-cy--m1"]
    assert metric(endpoint, "LoadedModelCount") == 2
    assert metric(endpoint, "ModelUnloadingTime_count") == 1
    # Triton's repository holds what is loaded; the evicted model's files are gone.
    assert sorted(path.name for path in endpoint.run_dir.iterdir() if path.name[0] != ".") == [
        "demo-ada--m1",
        "demo-cy--m1",
    ]
    assert not list((endpoint.run_dir / ".staging").iterdir())  # nothing left staged
    assert invoke(endpoint, "demo-bo")  # and it comes back on demand


def test_concurrent_first_requests_load_the_model_once(endpoint):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: invoke(endpoint, "demo-bo"), range(4)))
    assert all(len(images) == 1 for images in results)
    assert metric(endpoint, "ModelLoadingTime_count") == 1
    assert metric(endpoint, "ModelCacheHit_sum") == 0  # all four came before it was loaded


def test_a_warm_users_requests_are_answered_while_another_model_loads(endpoint):
    # Triton's HTTP front end holds inference that arrives during an HTTP load until the load
    # ends (upstream #8117, #8958): the router loads over gRPC, so a cold user's load (seconds)
    # no longer stalls the warm users.
    invoke(endpoint, "demo-ada")
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(invoke, endpoint, "demo-bo")
        answered_meanwhile = 0
        while not load.done():
            assert len(invoke(endpoint, "demo-ada")) == 1
            answered_meanwhile += not load.done()
        assert len(load.result()) == 1
    assert answered_meanwhile >= 3
    assert metric(endpoint, "ModelLoadingTime_count") == 2


def test_concurrent_first_requests_for_more_models_than_the_budget_stay_within_it(endpoint):
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda user: invoke(endpoint, user), USERS))
    assert all(len(images) == 1 for images in results)
    assert len(endpoint.cache.loaded) == 2 and len(endpoint.cache.evictions) == 1
    assert len(endpoint.triton.stub_pids()) <= 2


def test_unknown_or_malformed_targets_are_clear_400s(endpoint):
    runtime = endpoint.runtime_client()
    for target in ["demo-zed--m1.tar.gz", "../demo-ada--m1.tar.gz", "demo-ada--m1"]:
        error = error_of(
            lambda target=target: runtime.invoke_endpoint(
                EndpointName=endpoint.name, TargetModel=target, Body=b"{}"
            )
        )
        assert error.response["Error"]["Code"] == "ValidationError", target
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "demo-zed--m1.tar.gz" in str(error_of(lambda: invoke(endpoint, "demo-zed")))


def test_bad_parameters_are_a_model_error_naming_the_input(endpoint):
    error = error_of(lambda: invoke(endpoint, "demo-ada", num_inference_steps=1000))
    assert error.response["Error"]["Code"] == "ModelError"
    assert "num_inference_steps must be between 1 and 100" in str(error)
    assert invoke(endpoint, "demo-ada")  # the model is fine afterwards


def test_a_crashed_stub_is_detected_and_the_model_reloaded(endpoint):
    invoke(endpoint, "demo-ada")
    stubs = endpoint.triton.stub_pids()
    assert len(stubs) == 1
    os.kill(stubs[0], signal.SIGKILL)
    time.sleep(0.5)
    assert invoke(endpoint, "demo-ada")
    assert endpoint.triton.stub_pids() and endpoint.triton.stub_pids() != stubs
    assert list(endpoint.cache.reloads) == ["demo-ada--m1"]


def test_a_model_slower_than_the_deadline_is_not_ready_then_served(store, tmp_path):
    with LocalEndpoint(store, PREFIX, tmp_path / "endpoint", load_deadline_s=0.05) as endpoint:
        error = error_of(lambda: invoke(endpoint, "demo-cy"))
        assert error.response["Error"]["Code"] == "ModelNotReadyException"
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert "retry" in str(error)
        deadline = time.monotonic() + 60
        while "demo-cy--m1" not in endpoint.cache.loaded and time.monotonic() < deadline:
            time.sleep(0.1)  # the load went on in the background
        assert invoke(endpoint, "demo-cy")


def test_archives_that_escape_their_folder_are_refused(store, endpoint, tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as archive:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"bad"))
    store.put_file(f"{PREFIX}demo-evil--m1.tar.gz", evil)
    bare = write_tar_gz(tmp_path / "bare.tar.gz", {"demo-bare--m1/readme.txt": "no config"})
    store.put_file(f"{PREFIX}demo-bare--m1.tar.gz", bare)
    try:
        for user, reason in [("demo-evil", "'..' path"), ("demo-bare", "config.pbtxt")]:
            error = error_of(lambda user=user: invoke(endpoint, user))
            assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 500
            assert reason in str(error)
        assert not list(Path(endpoint.work_dir).rglob("escaped.txt"))
        assert not (endpoint.work_dir.parent / "escaped.txt").exists()
    finally:
        store.delete(f"{PREFIX}demo-evil--m1.tar.gz")
        store.delete(f"{PREFIX}demo-bare--m1.tar.gz")


def test_stopping_leaves_no_process_and_nothing_in_shm(store, tmp_path):
    before = {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*")}
    with LocalEndpoint(store, PREFIX, tmp_path / "endpoint") as endpoint:
        invoke(endpoint, "demo-ada")
        stubs = endpoint.triton.stub_pids()
        started = time.perf_counter()
    assert time.perf_counter() - started < 15  # no wait for idle connections
    assert not [pid for pid in stubs if Path(f"/proc/{pid}").exists()]
    assert {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*")} <= before


def test_stop_removes_the_unpacked_models_and_a_restart_serves_again(store, tmp_path):
    endpoint = LocalEndpoint(store, PREFIX, tmp_path / "endpoint")
    leftover = endpoint.models_dir / "demo-ada--m1-x1y2" / "model"  # an older run's, or layout's
    leftover.mkdir(parents=True)
    with endpoint:
        assert not leftover.parent.exists()
        invoke(endpoint, "demo-ada")
        assert list(endpoint.run_dir.rglob("demo-ada--m1/config.pbtxt"))
        first_run = endpoint.run_dir
    assert not first_run.exists() and endpoint.run_dir is None
    assert list(endpoint.models_dir.iterdir()) == []
    assert store.exists(f"{PREFIX}demo-ada--m1.tar.gz")  # the store keeps its archives
    with endpoint:  # as notebook 03's panel does after the clean-up
        assert invoke(endpoint, "demo-ada")
        assert endpoint.run_dir != first_run
    assert list(endpoint.models_dir.iterdir()) == []


def test_stale_runs_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    models = tmp_path / "models"
    live = models / f"run-{os.getpid()}-0a1b2c3d"
    dead = models / f"run-{gone.pid}-0a1b2c3d"
    old_layout = models / "demo-ada--m1-abc123"
    for folder in (live, dead, old_layout):
        (folder / "model").mkdir(parents=True)
    (models / "stray.txt").write_text("x")
    removed = remove_stale_runs(models)
    assert sorted(removed) == sorted([dead, old_layout, models / "stray.txt"])
    assert [p.name for p in models.iterdir()] == [live.name]
    assert remove_stale_runs(tmp_path / "missing") == []


def test_the_workshop_endpoint_command_serves_until_sigterm(tmp_path):
    import json
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from helpers.infra.local.triton_server import free_ports

    router, http, grpc, metrics = free_ports(4)
    env = dict(
        os.environ,
        WORKSHOP_WORK_DIR=str(tmp_path),
        WORKSHOP_ROUTER_PORT=str(router),
        WORKSHOP_TRITON_HTTP_PORT=str(http),
        WORKSHOP_TRITON_GRPC_PORT=str(grpc),
        WORKSHOP_TRITON_METRICS_PORT=str(metrics),
    )
    command = [sys.executable, "-m", "helpers.cli", "endpoint", "--max-loaded-models", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "ready" in process.stdout.readline()
        url = f"http://127.0.0.1:{router}/endpoints/workshop-mme/invocations"
        request = urllib.request.Request(url, data=b"{}", method="POST")
        request.add_header("X-Amzn-SageMaker-Target-Model", "nobody--m1.tar.gz")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)
        assert caught.value.code == 400
        assert caught.value.headers["x-amzn-ErrorType"] == "ValidationError"
        assert "nobody--m1.tar.gz" in json.loads(caught.value.read())["message"]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 128 + signal.SIGTERM


def test_a_zipf_load_test_records_cold_and_warm_requests_and_plots(store, tmp_path):
    import matplotlib

    from helpers.workshop.loadtest import plot_load_test, run_load_test

    matplotlib.use("Agg")
    targets = [f"{user}--m1.tar.gz" for user in USERS]
    # every model fits: the first request of each is cold, the rest warm
    with LocalEndpoint(store, PREFIX, tmp_path / "endpoint", max_loaded_models=3) as endpoint:
        result = run_load_test(
            endpoint.url, endpoint.name, targets, tmp_path / "load", users=2, duration_s=20
        )
    assert result.requests >= 5 and result.failures == 0, result
    assert result.cold_median_ms > result.warm_median_ms
    assert 0 < result.cache_hit_ratio < 1 and result.max_loaded_models <= 3
    for name in ("requests.csv", "metrics.csv", "locust_stats_history.csv"):
        assert (tmp_path / "load" / name).stat().st_size > 0
    figure = plot_load_test({"zipf": result})
    assert len(figure.axes) == 4


def test_a_model_server_that_is_gone_is_a_503_not_a_traceback(store, tmp_path):
    endpoint = LocalEndpoint(store, PREFIX, tmp_path / "endpoint", restart_triton=False)
    with endpoint:
        invoke(endpoint, "demo-ada")
        endpoint.triton.stop()
        error = error_of(lambda: invoke(endpoint, "demo-ada"))
        assert endpoint.describe().status == "Failed" and not endpoint.triton.is_running()
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert error.response["Error"]["Code"] == "ServiceUnavailable"
    assert "Traceback" not in str(error)


def triton_successes(endpoint, name: str) -> int:
    """How many inferences Triton has completed on model `name`."""
    with httpx.Client(base_url=endpoint.triton.url, trust_env=False) as triton:
        answer = triton.get(f"/v2/models/{name}/stats", headers=endpoint.triton.restricted_headers)
    return answer.json()["model_stats"][0]["inference_stats"]["success"]["count"]


def running(endpoint) -> int:
    async def total() -> int:
        return sum(endpoint.cache._running.values())

    return endpoint.run(total())


def test_over_budget_work_is_refused_by_the_model_itself(endpoint):
    error = error_of(lambda: invoke(endpoint, "demo-ada", width=1024, height=1024))
    assert error.response["Error"]["Code"] == "ModelError"
    assert "work_too_large: 1024x1024 x 1 steps" in error.response["OriginalMessage"]
    assert "at most 560x560" in error.response["OriginalMessage"]


def test_a_client_that_hangs_up_is_not_waited_for_and_nothing_is_sent_again(endpoint):
    from helpers.domain.generation import build_request

    name = "demo-ada--m1"
    invoke(endpoint, "demo-ada")
    done = triton_successes(endpoint, name)
    body, content_type = build_request("x", num_inference_steps=100, num_images=4)
    headers = {"Content-Type": content_type, "X-Amzn-SageMaker-Target-Model": f"{name}.tar.gz"}
    url = f"{endpoint.url}/endpoints/{endpoint.name}/invocations"
    with pytest.raises(httpx.ReadTimeout), httpx.Client(trust_env=False) as client:
        client.post(url, content=body, headers=headers, timeout=1)
    deadline = time.monotonic() + 5
    while running(endpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(endpoint) == 0  # the router stopped waiting for Triton
    # Triton's HTTP front end does not cancel it: it runs to its end, once, never twice.
    deadline = time.monotonic() + 120
    while triton_successes(endpoint, name) == done and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert triton_successes(endpoint, name) == done + 1
    # The runtime client never sends a generation twice either.
    assert endpoint.runtime_client().meta.config.retries["total_max_attempts"] == 1


def test_a_request_longer_than_the_routers_limit_fails_clearly(endpoint):
    invoke(endpoint, "demo-ada")
    endpoint.cache.infer_timeout_s = 0.5
    error = error_of(lambda: invoke(endpoint, "demo-ada", num_inference_steps=100, num_images=4))
    assert error.response["Error"]["Code"] == "ModelError"
    assert "timed out after 0.5 s" in str(error) and "not sent again" in str(error)


def test_reload_waits_for_the_running_request_and_holds_new_ones_until_it_is_back(endpoint):
    name = "demo-ada--m1"
    invoke(endpoint, "demo-ada")
    stubs = endpoint.triton.model_stub_pids(name)
    ended = {}

    def timed(label, call):
        call()
        ended[label] = time.monotonic()

    with ThreadPoolExecutor(3) as pool:
        long = pool.submit(
            timed,
            "long",
            lambda: invoke(endpoint, "demo-ada", num_inference_steps=60, num_images=2),
        )
        time.sleep(1)  # it runs on Triton now
        reload = pool.submit(timed, "reload", lambda: endpoint.run(endpoint.cache.reload(name)))
        time.sleep(0.3)
        late = pool.submit(timed, "late", lambda: invoke(endpoint, "demo-ada"))
        for future in (long, reload, late):
            future.result(timeout=300)
    assert ended["long"] <= ended["reload"] <= ended["late"]
    assert list(endpoint.cache.reloads) == [name]
    assert endpoint.triton.model_stub_pids(name) not in ([], stubs)  # a new process
