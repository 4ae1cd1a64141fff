"""The local multi-model endpoint: a real tritonserver plus the SageMaker-API router, as one.

    with LocalEndpoint.from_settings(settings, store) as endpoint:
        runtime = endpoint.runtime_client()        # boto3 "sagemaker-runtime"
        runtime.invoke_endpoint(EndpointName=endpoint.name, TargetModel="demo-ada--m1.tar.gz",
                                ContentType="application/json", Body=request_json)

`LocalEndpoint` is the `helpers.ports.endpoint.Endpoint` of the local backend: `deploy()`
starts it (as `start()` does), `wait()` checks it runs, `loaded_models()`, `evictions()`,
`metrics()` and `unload_all()` read and drive the router's cache, `stop()` stops it.

Triton starts with an empty model repository in explicit model-control mode and its SageMaker
container API on a loopback port; the router (uvicorn, in a thread of this process) serves
`POST /endpoints/<name>/invocations` and loads models from the store's endpoint prefix on
demand. `stop()` closes the router's connections first (Triton waits for open ones), then
stops Triton: no process is left and nothing stays in /dev/shm.

A supervisor thread checks every `SUPERVISE_S` that tritonserver lives. When it has died (an
abort, a kill), the supervisor cleans up after it (its stubs, its shared memory), starts it
again on the same ports and has the router forget what was loaded: each model loads again on
its next request. Meanwhile `describe()` says `RESTARTING` and requests answer 503.

Each run unpacks its models into a folder of its own, `<work_dir>/models/run-<pid>-<id>/`,
removed when the endpoint stops; `start()` also removes the folders of earlier runs whose
process is gone (a crash, a killed kernel). The store's archives are never touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import secrets
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.domain.paths import ENDPOINT_NAME, endpoint_prefix
from helpers.domain.runtime import read_status, status_request
from helpers.infra.local.asgi_thread import ThreadedServer
from helpers.infra.local.mme_router import ModelCache, RouterMetrics, create_app
from helpers.infra.local.triton_server import TritonServer, free_port, free_ports, is_alive
from helpers.ports.endpoint import IN_SERVICE, NOT_DEPLOYED, Endpoint, EndpointDescription
from helpers.ports.store import ArtifactStore
from helpers.settings import Settings

if TYPE_CHECKING:
    from helpers.domain.runtime import ServingRuntime
    from helpers.domain.serving import Serving

_RUN_FOLDER = re.compile(r"run-(\d+)-[0-9a-f]+")
#: How often the supervisor checks that tritonserver lives, in seconds.
SUPERVISE_S = 0.5
#: `describe()`'s status while a dead tritonserver is being started again.
RESTARTING = "Restarting"
#: `describe()`'s status when tritonserver died and is not started again (SageMaker's word).
FAILED = "Failed"
logger = logging.getLogger(__name__)


def remove_stale_runs(models_dir: Path) -> list[Path]:
    """Remove from `models_dir` the unpacked models of runs whose process is gone; return them.

    A run's folder is `run-<pid>-<id>`: kept while process `<pid>` lives (an endpoint of
    another process may be using it). Anything else there is from an earlier layout: removed.
    """
    removed = []
    for entry in sorted(Path(models_dir).glob("*")):
        match = _RUN_FOLDER.fullmatch(entry.name)
        if match and is_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class LocalEndpoint(Endpoint):
    """Triton + router on loopback ports (the local `helpers.ports.endpoint.Endpoint`).

    Args:
        store (`ArtifactStore`): where the model archives are.
        prefix_uri (`str`): the endpoint's model prefix (`s3://bucket/endpoints/<name>/models/`).
        work_dir (`Path`): the Triton log, its empty repository and the unpacked models
            (`models/`, each run's removed when it stops).
        router_port (`int`, *optional*): a free port when not given.
        max_loaded_models (`int`, defaults to 4): models loaded at once; more evicts the LRU.
        load_deadline_s (`float`, defaults to 60): a request's wait for its model before 429.
        name (`str`, defaults to `ENDPOINT_NAME`): the endpoint name in invocation URLs.
        restart_triton (`bool`, defaults to True): start tritonserver again when it dies;
            False leaves it dead (requests answer 503) for a supervisor of your own.
    """

    can_unload = True  # the router unloads through Triton's repository API

    def __init__(
        self,
        store: ArtifactStore,
        prefix_uri: str,
        work_dir: Path,
        router_port: int | None = None,
        max_loaded_models: int = 4,
        load_deadline_s: float = 60.0,
        name: str = ENDPOINT_NAME,
        triton_ports: tuple[int, int, int] | None = None,
        restart_triton: bool = True,
    ) -> None:
        self.store = store
        self.prefix_uri = prefix_uri
        self.work_dir = Path(work_dir)
        self.name = name
        self.router_port = router_port or free_port()
        self.max_loaded_models = max_loaded_models
        self.load_deadline_s = load_deadline_s
        http, grpc, metrics = triton_ports or tuple(free_ports(3))
        self.models_dir = self.work_dir / "models"
        # Each start serves a model repository of its own (`run_dir`), which the router fills;
        # only the router knows the key to Triton's model control and inference APIs.
        self.triton = TritonServer(
            self.models_dir,
            http,
            grpc,
            metrics,
            self.work_dir / "triton.log",
            restricted_key=secrets.token_urlsafe(32),
        )
        self.run_dir: Path | None = None  # this run's unpacked models, while it runs
        self.cache: ModelCache | None = None
        self._stub_pids: dict[str, int] = {}
        self._server: ThreadedServer | None = None
        self._runtime_model: str | None = None  # the serving runtime `wait` loads, if any
        self.restart_triton = restart_triton
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._restarting = False
        #: How many times the supervisor started a dead tritonserver again since `start`.
        self.triton_restarts = 0

    @classmethod
    def from_settings(cls, settings: Settings, store: ArtifactStore, **kwargs) -> LocalEndpoint:
        """An endpoint on the settings' router and Triton ports, state under `work_dir`."""
        kwargs.setdefault("router_port", settings.router_port)
        kwargs.setdefault(
            "triton_ports",
            (settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port),
        )
        name = kwargs.pop("name", ENDPOINT_NAME)
        return cls(
            store,
            endpoint_prefix(settings.bucket, name),
            Path(settings.work_dir) / "endpoint",
            name=name,
            **kwargs,
        )

    @property
    def url(self) -> str:
        """The router: what `endpoint_url` of a sagemaker-runtime client points at."""
        return f"http://127.0.0.1:{self.router_port}"

    def runtime_client_options(self) -> dict[str, str]:
        """The router's URL and placeholder credentials (the router checks no signature):
        `runtime_client()` is a boto3 `sagemaker-runtime` client that talks to this endpoint."""
        return {
            "endpoint_url": self.url,
            "region_name": "us-east-1",
            "aws_access_key_id": "local",
            "aws_secret_access_key": "local",
        }

    def start(self, timeout: float = 60) -> LocalEndpoint:
        """Start Triton and the router (again after `stop()`: models are loaded anew)."""
        remove_stale_runs(self.models_dir)
        self.run_dir = self.models_dir / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.run_dir.mkdir(parents=True)
        self.triton.model_repository = self.run_dir
        try:
            self.triton.start(timeout)
            self.cache = ModelCache(
                self.store,
                self.prefix_uri,
                self.triton.url,
                self.run_dir,
                max_loaded_models=self.max_loaded_models,
                load_deadline_s=self.load_deadline_s,
                metrics=RouterMetrics(),
                is_healthy=self._stub_alive,
                triton_headers=self.triton.restricted_headers,
                triton_grpc_url=f"{self.triton.host}:{self.triton.ports['grpc_port']}",
            )
            self._server = ThreadedServer(create_app(self.cache), self.router_port, "mme-router")
            self._server.start(timeout)
        except BaseException:
            self.stop()
            raise
        self._stopping.clear()
        self.triton_restarts = 0
        if not self.restart_triton:
            return self
        self._supervisor = threading.Thread(
            target=self._supervise, args=(timeout,), name="triton-supervisor", daemon=True
        )
        self._supervisor.start()
        return self

    def _supervise(self, timeout: float) -> None:
        """Start tritonserver again whenever it has died, until `stop()`."""
        while not self._stopping.wait(SUPERVISE_S):
            if self.triton.is_running():
                continue
            self._restarting = True
            try:
                self._restart_triton(timeout)
            except Exception:  # retried on the next check; the log says why
                if self._stopping.is_set():
                    return
                logger.exception("tritonserver could not be started again; retrying")
            else:
                self._restarting = False

    def _restart_triton(self, timeout: float) -> None:
        logger.warning(
            "tritonserver died; the end of its log:\n%s\nstarting it again",
            self.triton.log_tail(10),
        )
        self.triton.stop()  # its orphaned stubs and shared memory
        self._stub_pids.clear()
        # bounded: a router stopping meanwhile would never run it
        forgotten = self.run(_server_restarted(self.cache), timeout=30)
        if self._stopping.is_set():
            return
        self.triton.start(timeout, thread_lives=True)
        self.triton_restarts += 1
        logger.warning("tritonserver started again; %d model(s) load on demand", len(forgotten))

    def _stub_alive(self, model: str) -> bool:
        """Whether `model`'s stub process lives (one /proc read while its known pid lives)."""
        pid = self._stub_pids.get(model)
        if pid is not None and is_alive(pid):
            return True
        pids = self.triton.model_stub_pids(model)
        if not pids:
            self._stub_pids.pop(model, None)
            return False
        self._stub_pids[model] = pids[0]
        return True

    def run(self, coroutine, timeout: float | None = None):
        """Run `coroutine` on the router's event loop (e.g. `endpoint.cache.unload(...)`),
        waiting at most `timeout` seconds (`TimeoutError`)."""
        if self._server is None:
            raise RuntimeError("the router is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._server.loop()).result(timeout)

    # ------------------------------------------------------------- the Endpoint interface

    def is_running(self) -> bool:
        """Whether the router and Triton both run (or Triton is being started again)."""
        return self._server is not None and (self._restarting or self.triton.is_running())

    def deploy(
        self,
        *,
        serving: Serving | None = None,
        runtime: ServingRuntime | None = None,
        timeout: float = 60,
    ) -> EndpointDescription:
        """Start Triton and the router unless both run (again after `stop()`, or after either
        died); ready when it returns.

        Args:
            serving (`Serving`, *optional*): unused: the router routes by `TargetModel` alone,
                and a shared base is one more archive under the prefix.
            runtime (`ServingRuntime`, *optional*): a serving runtime under the prefix, which
                `wait` loads (locally the models use the server's own environment, so
                `Backend.serving_runtime` gives None).
            timeout (`float`, defaults to 60): seconds for Triton and the router to start.
        """
        self._runtime_model = runtime.target_model if runtime is not None else None
        if not self.is_running():
            self.stop()  # whatever half of it still runs
            self.start(timeout)
        return self.describe()

    def wait(self, *, timeout: float | None = None) -> EndpointDescription:
        """Check that the endpoint runs (`deploy` returns once it does) and load the serving
        runtime `deploy` was given, if any; `timeout` is unused."""
        description = self.describe()
        if not description.in_service:
            raise RuntimeError(f"endpoint {self.name} does not run: deploy() starts it")
        if self._runtime_model is None:
            return description
        body, content_type = status_request()
        answer = self.runtime_client().invoke_endpoint(
            EndpointName=self.name,
            TargetModel=self._runtime_model,
            ContentType=content_type,
            Body=body,
        )
        return dataclasses.replace(description, runtime=read_status(answer["Body"].read()))

    def describe(self) -> EndpointDescription:
        """In service while the router runs and Triton answers that it is ready (one loopback
        request of at most a second); `RESTARTING` while Triton is not (yet) ready, or dead and
        being started again; `FAILED` when it died and `restart_triton` is off; else not
        deployed. At the router's URL."""
        if self._server is None:
            status = NOT_DEPLOYED
        elif self._restarting:
            status = RESTARTING
        elif not self.triton.is_running():
            status = RESTARTING if self.restart_triton else FAILED
        else:
            status = IN_SERVICE if self.triton.is_ready() else RESTARTING
        return EndpointDescription(self.name, status, url=self.url)

    def loaded_models(self) -> list[str]:
        """The models loaded now, least recently used first (none while stopped)."""
        if not self.is_running() or self.cache is None:
            return []
        return self.run(_copy(self.cache.loaded))

    def evictions(self) -> list[str]:
        """The models unloaded to make room since `start`, in order (the latest
        `mme_router.HISTORY`)."""
        if self.cache is None:
            return []
        if not self.is_running():
            return list(self.cache.evictions)
        return self.run(_copy(self.cache.evictions))

    def metrics(self) -> dict[str, float]:
        """The router's metrics now, as its `/metrics` has them, read in this process
        (histograms' buckets left out); empty while it is stopped."""
        if not self.is_running() or self.cache is None:
            return {}
        values = {}
        for family in self.cache.metrics.registry.collect():
            for sample in family.samples:
                if not sample.labels and not sample.name.endswith("_created"):
                    values[sample.name] = float(sample.value)
        return values

    def unload_all(self) -> list[str]:
        """Unload every loaded model and return their names (none while stopped)."""
        if not self.is_running() or self.cache is None:
            return []
        return self.run(self.cache.unload_all())

    def forget(self, model_names) -> list[str]:
        """Unload `model_names` and remove their unpacked folders, and unload a shared base
        whose adapter cache may hold theirs (the next request loads it afresh); return the
        models unloaded (none while stopped: a run's folder goes when it stops)."""
        if not self.is_running() or self.cache is None:
            return []
        return self.run(self.cache.forget(model_names))

    def stop(self) -> None:
        """Stop the supervisor and the router (closing its connections to Triton), then
        Triton; remove the models this run unpacked. Safe to call twice."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop()
        self._server = None
        if self._supervisor is not None:
            self._supervisor.join()
        self._supervisor = None
        self._restarting = False
        self.triton.stop()
        self._stub_pids.clear()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _copy(items) -> list[str]:
    """`items` as a list, taken on the router's loop, where the cache changes them."""
    return list(items)


async def _server_restarted(cache: ModelCache) -> list[str]:
    return cache.server_restarted()


def serve_endpoint(settings: Settings, store: ArtifactStore, **kwargs) -> None:
    """Run the local endpoint on the settings' ports until Ctrl-C or SIGTERM
    (``workshop endpoint``)."""
    import signal

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit) if in_main_thread else None
    try:
        with LocalEndpoint.from_settings(settings, store, **kwargs) as endpoint:
            print(f"Multi-model endpoint {endpoint.name!r} ready")
            print(f"  invocations  {endpoint.url}/endpoints/{endpoint.name}/invocations")
            print(f"  metrics      {endpoint.url}/metrics")
            print(f"  models from  {endpoint.prefix_uri}")
            print(f"  Triton log   {endpoint.triton.log_path}\nCtrl-C stops it.", flush=True)
            threading.Event().wait()  # a dead Triton is started again by the supervisor
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
