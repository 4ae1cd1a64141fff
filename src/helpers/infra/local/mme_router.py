"""The local multi-model endpoint's front door: SageMaker's runtime API over a real Triton.

SageMaker runs a multi-model endpoint (MME) as a front end that, on each
`InvokeEndpoint(TargetModel=...)`, finds the model archive under the endpoint's S3 prefix,
downloads and unpacks it on first use, asks the Triton container to load it, evicts the least
recently used models when the instance runs short, and forwards the request. This router does
the same for one machine, so that

    boto3.client("sagemaker-runtime", endpoint_url=router_url).invoke_endpoint(
        EndpointName="workshop", TargetModel="demo-ada--m1.tar.gz", Body=..., ContentType=...)

works unchanged against both. The router drives Triton through its own loopback APIs: it
unpacks an archive into Triton's model repository, then loads it (gRPC `RepositoryModelLoad`),
runs it (HTTP `POST /v2/models/<name>/infer`) and unloads it (`RepositoryModelUnload`), each
with the header only the router knows (`TritonServer.restricted_key`). Loads go over gRPC
because Triton's HTTP front end holds every inference request that arrives while it serves a
load until that load ends (upstream issues triton-inference-server/server#8117 and #8958): a
per-user model's cold start (about 5 s here) then stalled every warm user's request. Triton's
own SageMaker front end is not used: it listens on every interface and ignores that
restriction.

Behaviour, as SageMaker documents it:

* concurrent first requests for one model download and load it once;
* at most `max_loaded_models` are loaded; loading one more unloads the least recently used;
* a request that waits longer than `load_deadline_s` for its model answers 429
  `ModelNotReadyException` (retryable; the load goes on in the background);
* a target that is not under the prefix answers 400 `ValidationError`; an error from the
  model answers 424 `ModelError` with the model's status and message;
* a request runs at most `infer_timeout_s` (424 `ModelError`, never sent again); a request
  whose client hangs up is abandoned (Triton's HTTP front end does not cancel it: the work per
  request is bounded instead, `helpers.domain.generation.work_budget`);
* a crashed Python-backend stub (Triton keeps such a model "ready" but every request fails) is
  seen within `STUB_WATCH_S`: the requests running on it fail at once with 503
  `ModelRestarting`, and the model is loaded again in place, once, however many requests saw
  it (the tiny model: 5 s on 2 idle cores, up to about 25 s on busy ones); requests that
  arrive meanwhile wait for it as for a first load. `reload()` does the same on demand, once
  the requests running on the model end;
* `GET /metrics` exposes SageMaker's MME metrics in Prometheus format, under CloudWatch's
  names and, for times, its unit (microseconds).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Gauge, Histogram, Summary, generate_latest

from helpers.domain.archives import safe_extract
from helpers.domain.generation import BINARY_JSON, HEADER_SIZE_RE
from helpers.ports.store import ArtifactStore, ObjectNotFound

TARGET_HEADER = "X-Amzn-SageMaker-Target-Model"
#: The router's own answer header: "hit" when the model was loaded already, else "miss".
CACHE_HEADER = "X-Workshop-Model-Cache"
#: Triton's message for a model whose stub process died.
STUB_UNHEALTHY = "is not healthy"
_TARGET_SUFFIX = ".tar.gz"
#: How many evictions and reloads the router remembers (for the notebook's demo and tests).
HISTORY = 1000
#: Where archives are unpacked before they move into the repository (not a model name).
STAGING = ".staging"
#: How often a running request checks that its model's stub lives, and that its client waits.
STUB_WATCH_S = 0.25
#: A request's limit on Triton: three requests at the work bound (about a minute each on 2 CPU
#: cores), one running and two queued on the model's one instance.
INFER_TIMEOUT_S = 180.0
#: The config parameter of a model that reads users' adapters (`triton_sd_shared`).
ADAPTER_SOURCE = '"adapter_source"'


class InvocationError(Exception):
    """An invocation that fails with one of SageMaker runtime's error types."""

    status = 500
    error_type = "InternalFailure"

    def __init__(self, message: str, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class TargetNotFound(InvocationError):
    status, error_type = 400, "ValidationError"


class ModelNotReady(InvocationError):
    status, error_type = 429, "ModelNotReadyException"


class ModelError(InvocationError):
    status, error_type = 424, "ModelError"


class LoadFailed(InvocationError):
    status, error_type = 500, "InternalFailure"


class ServiceUnavailable(InvocationError):
    status, error_type = 503, "ServiceUnavailable"


class ModelRestarting(InvocationError):
    """The model's process died under this request; the model is being loaded again."""

    status, error_type = 503, "ModelRestarting"


#: Bucket bounds of the time histograms, in microseconds: 1 ms to 10 minutes.
MICROSECOND_BUCKETS = (1e3, 1e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 3e7, 6e7, 1.2e8, 6e8)


class RouterMetrics:
    """SageMaker's MME metrics in a Prometheus registry of their own.

    The series carry CloudWatch's names exactly (`ModelLoadingTime_count`, `_sum`, `_bucket`;
    `ModelCacheHit_sum`; `LoadedModelCount`), and the times are in CloudWatch's unit,
    microseconds, not Prometheus's usual seconds: a figure reads the same here and on AWS.
    `observe_time(histogram, seconds)` converts.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(
                name,
                f"{doc} In microseconds, as CloudWatch reports {name}.",
                buckets=MICROSECOND_BUCKETS,
                registry=self.registry,
            )

        self.loading_wait = histogram(
            "ModelLoadingWaitTime", "Time an invocation waited for its model to be loaded."
        )
        self.downloading = histogram("ModelDownloadingTime", "Time to download a model archive.")
        self.loading = histogram("ModelLoadingTime", "Time to load an unpacked model.")
        self.unloading = histogram("ModelUnloadingTime", "Time to unload a model.")
        self.cache_hit = Summary(
            "ModelCacheHit",
            "1 for an invocation whose model was loaded already, else 0 (mean = hit ratio).",
            registry=self.registry,
        )
        self.loaded = Gauge("LoadedModelCount", "Models loaded now.", registry=self.registry)

    @staticmethod
    def observe_time(histogram: Histogram, seconds: float) -> None:
        """Record a duration measured in seconds, in microseconds."""
        histogram.observe(seconds * 1e6)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelCache:
    """Which models Triton holds, loading on demand and evicting the least recently used.

    Args:
        store (`ArtifactStore`): where the model archives are.
        prefix_uri (`str`): the endpoint's model prefix; a target is `<prefix>/<target>`.
        triton_url (`str`): Triton's HTTP API, e.g. `http://127.0.0.1:8100`.
        cache_dir (`Path`): Triton's model repository: each loaded model is unpacked into
            `<cache_dir>/<name>/` (archives are fetched into `<cache_dir>/.staging/` first).
        max_loaded_models (`int`, defaults to 4): the budget; one more unloads the LRU model.
        load_deadline_s (`float`, defaults to 60): how long a request waits for its model.
        metrics (`RouterMetrics`, *optional*): where timings go.
        is_healthy (`Callable[[str], bool]`, *optional*): whether a loaded model's process is
            alive; checked before each request, since Triton answers a request to a model whose
            stub died only after minutes. Without it, a crash is seen in Triton's answer.
        triton_headers (`Mapping[str, str]`, *optional*): sent with every request to Triton
            (its restricted APIs' key, `TritonServer.restricted_headers`).
        triton_grpc_url (`str`, *optional*): Triton's gRPC API (`host:port`), which loads and
            unloads models without holding up inference on HTTP; None sends them over HTTP
            (as a scripted Triton in tests expects).
        infer_timeout_s (`float`, defaults to `INFER_TIMEOUT_S`): the longest a request waits
            for Triton's answer, queueing included; then it fails, and is not sent again.
    """

    def __init__(
        self,
        store: ArtifactStore,
        prefix_uri: str,
        triton_url: str,
        cache_dir: Path,
        max_loaded_models: int = 4,
        load_deadline_s: float = 60.0,
        metrics: RouterMetrics | None = None,
        is_healthy: Callable[[str], bool] | None = None,
        triton_headers: Mapping[str, str] | None = None,
        infer_timeout_s: float = INFER_TIMEOUT_S,
        triton_grpc_url: str | None = None,
    ) -> None:
        if not isinstance(max_loaded_models, int) or max_loaded_models < 1:
            raise ValueError(f"max_loaded_models must be an integer >= 1, got {max_loaded_models}")
        if not load_deadline_s > 0:
            raise ValueError(f"load_deadline_s must be positive seconds, got {load_deadline_s}")
        self.store = store
        self.prefix_uri = prefix_uri.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.max_loaded_models = max_loaded_models
        self.load_deadline_s = float(load_deadline_s)
        self.metrics = metrics or RouterMetrics()
        self.is_healthy = is_healthy
        self.infer_timeout_s = float(infer_timeout_s)
        # No pool limits: an invocation may wait minutes on a model, others must still pass.
        self.triton = httpx.AsyncClient(
            base_url=triton_url,
            headers=dict(triton_headers or {}),
            timeout=None,
            limits=httpx.Limits(max_connections=None),
            trust_env=False,  # loopback: a proxy from the environment must not see the key
        )
        self.triton_grpc_url = triton_grpc_url
        # Triton expects a restricted protocol's header as `triton-grpc-protocol-<header>`.
        self._grpc_headers = {
            f"triton-grpc-protocol-{key}": value for key, value in (triton_headers or {}).items()
        }
        self._grpc = None  # made in the router's event loop, where gRPC's channel must live
        self.loaded: OrderedDict[str, Path] = OrderedDict()  # name -> folder, LRU first
        self._loading: dict[str, asyncio.Task] = {}
        self._reserved = 0  # places held by loads in flight
        self._in_use: Counter[str] = Counter()  # requests holding each loaded model
        self._running: Counter[str] = Counter()  # requests sent to Triton, per model
        self._unloading: dict[str, asyncio.Task] = {}
        self._lock = asyncio.Lock()  # guards `loaded`, `_loading` and eviction decisions
        # The latest evictions and reloads, oldest first; bounded, as the router runs for days.
        self.evictions: deque[str] = deque(maxlen=HISTORY)
        self.reloads: deque[str] = deque(maxlen=HISTORY)

    async def close(self) -> None:
        """Close the connections to Triton (Triton waits for idle ones when it stops)."""
        await self.triton.aclose()
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def _repository(self, action: str, name: str) -> str | None:
        """Ask Triton to `action` ("load" or "unload") model `name`: None when done, else
        Triton's error message."""
        if self.triton_grpc_url is None:
            answer = await self.triton.post(f"/v2/repository/models/{name}/{action}")
            return None if answer.status_code == 200 else _error_message(answer)
        import tritonclient.grpc.aio as grpc_client
        from tritonclient.utils import InferenceServerException

        if self._grpc is None:
            self._grpc = grpc_client.InferenceServerClient(self.triton_grpc_url)
        call = self._grpc.load_model if action == "load" else self._grpc.unload_model
        try:
            await call(name, headers=self._grpc_headers)
        except InferenceServerException as error:
            if error.status() == "StatusCode.UNAVAILABLE":  # no server there: as over HTTP
                raise ServiceUnavailable(
                    "the model server did not answer (UNAVAILABLE); retry later"
                ) from None
            return str(error.message() or error)[:2000]
        return None

    # ------------------------------------------------------------------ invoke

    async def invoke(
        self, target: str, body: bytes, content_type: str
    ) -> tuple[httpx.Response, bool]:
        """Run `body` on model `target`, loading it first if needed (and again, once, if its
        process is found dead before the request is sent).

        Returns Triton's answer and whether the model was loaded already (a cache hit).

        Raises:
            ModelRestarting: the model's process died while this request ran on it.
            ModelError: the model refused or failed the request, or it ran too long.
        """
        name = self.model_name(target)
        hit = await self.ensure_loaded(target, name)
        if self._stub_dead(name):  # it died idle: wait for it like any request that comes now
            self.release(name)
            self.restart(name)
            hit = await self.ensure_loaded(target, name)
        try:
            answer = await self._infer(name, body, content_type)
        finally:
            self.release(name)
        if answer.status_code == 200:
            return answer, hit
        message = _error_message(answer)
        if STUB_UNHEALTHY in message:
            self.restart(name)
            raise self._restarting(name)
        raise ModelError(
            f'Received client error ({answer.status_code}) from primary with message "{message}"',
            OriginalStatusCode=answer.status_code,
            OriginalMessage=message,
        )

    def _stub_dead(self, name: str) -> bool:
        return self.is_healthy is not None and not self.is_healthy(name)

    async def _infer(self, name: str, body: bytes, content_type: str) -> httpx.Response:
        """Triton's answer to `body`, watching the model's stub while it runs: if the stub dies
        the request is abandoned at once (Triton would answer it only after seconds or
        minutes) and the model restarted."""
        self._running[name] += 1
        call = asyncio.create_task(
            self.triton.post(
                f"/v2/models/{name}/infer",
                content=body,
                headers=infer_headers(content_type),
                timeout=self.infer_timeout_s,
            )
        )
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=STUB_WATCH_S)
                if done:
                    return call.result()
                if self._stub_dead(name):
                    self.restart(name)
                    raise self._restarting(name)
        except httpx.TimeoutException:
            raise ModelError(
                f"Your invocation timed out after {self.infer_timeout_s:g} s while waiting for "
                f"model {name}; it is not sent again",
                OriginalStatusCode=0,
                OriginalMessage="timed out",
            ) from None
        finally:
            call.cancel()
            self._running[name] -= 1
            if self._running[name] <= 0:
                del self._running[name]

    @staticmethod
    def _restarting(name: str) -> ModelRestarting:
        return ModelRestarting(
            f"The process of model {name} stopped while it served this request; the model is "
            "being loaded again: retry in a few seconds"
        )

    @staticmethod
    def model_name(target: str) -> str:
        """The Triton model name of a target (`demo-ada--m1.tar.gz` -> `demo-ada--m1`)."""
        if not target or not target.endswith(_TARGET_SUFFIX) or "/" in target or ".." in target:
            raise TargetNotFound(
                f"TargetModel must be the name of a model archive under the endpoint's prefix, "
                f"such as 'demo-ada--m1.tar.gz'; got {target!r}"
            )
        return target[: -len(_TARGET_SUFFIX)]

    # ------------------------------------------------------------------ loading

    async def ensure_loaded(self, target: str, name: str | None = None) -> bool:
        """Return once `target` is loaded and held for one request (True if it was loaded
        already); load it once if not. The caller must `release(name)` when done."""
        name = name or self.model_name(target)
        started = time.perf_counter()
        hit = True
        try:
            while True:
                async with self._lock:
                    if name in self.loaded:
                        self.loaded.move_to_end(name)
                        self._in_use[name] += 1  # not evictable while a request uses it
                        self.metrics.cache_hit.observe(1 if hit else 0)
                        return hit
                    hit = False
                    task = self._loading.get(name)
                    if task is None:
                        task = asyncio.create_task(self._load(target, name))
                        self._loading[name] = task
                    # Held while waiting too: once loaded, another load's eviction must not
                    # take it before this request has run on it.
                    self._in_use[name] += 1
                remaining = self.load_deadline_s - (time.perf_counter() - started)
                try:
                    await asyncio.wait_for(asyncio.shield(task), max(remaining, 0.001))
                except TimeoutError:
                    self.release(name)
                    self.metrics.cache_hit.observe(0)
                    raise ModelNotReady(
                        f"Model {target} is still loading after {self.load_deadline_s:g} s; "
                        "retry the request in a few seconds"
                    ) from None
                except BaseException:
                    self.release(name)
                    raise
                async with self._lock:
                    if name in self.loaded:
                        self.loaded.move_to_end(name)
                        self.metrics.cache_hit.observe(0)
                        return False  # the hold taken above is this request's
                    self.release(name)  # unloaded again in between (unload_all); retry
        finally:
            self.metrics.observe_time(self.metrics.loading_wait, time.perf_counter() - started)

    def release(self, name: str) -> None:
        """A request is done with `name` (see `ensure_loaded`)."""
        self._in_use[name] -= 1
        if self._in_use[name] <= 0:
            del self._in_use[name]

    async def _load(self, target: str, name: str) -> None:
        reserved = False
        staged = folder = None
        try:
            staged = await self._download(target, name)
            await self._make_room()
            reserved = True
            pending = self._unloading.get(name)
            if pending is not None:  # Triton must finish unloading it before it loads again
                await asyncio.gather(pending, return_exceptions=True)
            folder = await asyncio.to_thread(self._place, staged, name)
            started = time.perf_counter()
            error = await self._repository("load", name)
            if error is not None:
                raise LoadFailed(f"Triton could not load {target}: {error}")
            self.metrics.observe_time(self.metrics.loading, time.perf_counter() - started)
            async with self._lock:
                self.loaded[name] = folder
                self._reserved -= 1
                reserved = False
                self.metrics.loaded.set(len(self.loaded))
        except BaseException:
            # Nothing of a load that failed stays on disk: its staging folder, or its model
            # folder in the repository.
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            elif staged is not None:
                shutil.rmtree(staged.parent.parent, ignore_errors=True)
            raise
        finally:
            async with self._lock:
                self._loading.pop(name, None)
                if reserved:
                    self._reserved -= 1

    def _place(self, staged: Path, name: str) -> Path:
        """Move the unpacked model folder `staged` into the repository as `<name>/` (once its
        previous load's unload has finished) and drop the rest of its staging folder."""
        folder = self.cache_dir / name
        shutil.rmtree(folder, ignore_errors=True)  # left by a process that died
        staged.rename(folder)
        shutil.rmtree(staged.parent.parent, ignore_errors=True)
        return folder

    async def _download(self, target: str, name: str) -> Path:
        """Fetch and unpack the archive into a staging folder; return the model's folder."""
        uri = f"{self.prefix_uri}/{target}"
        started = time.perf_counter()
        # Staged outside the repository's model names (no model name starts with a dot), a
        # folder of its own per load: the same model's previous folder may still be in use.
        staging_root = self.cache_dir / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
        try:
            try:
                await asyncio.to_thread(self.store.get_file, uri, staging / "model.tar.gz")
            except ObjectNotFound:
                raise TargetNotFound(
                    f"Could not find model data at {uri}: is {target!r} one of the models "
                    "packaged for this endpoint?"
                ) from None
            self.metrics.observe_time(self.metrics.downloading, time.perf_counter() - started)
            try:
                unpacked = await asyncio.to_thread(
                    safe_extract, staging / "model.tar.gz", staging / "model"
                )
            except (ValueError, OSError, tarfile.TarError) as error:
                raise LoadFailed(f"{target} is not a usable model archive: {error}") from None
            if not (unpacked / name / "config.pbtxt").is_file():
                raise LoadFailed(f"{target} does not hold {name}/config.pbtxt")
            (staging / "model.tar.gz").unlink()
            return unpacked / name
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    async def _make_room(self) -> None:
        """Reserve a place for one more model, unloading least recently used ones to make it.

        Loads in flight and unloads not yet finished hold their place too, so concurrent first
        requests for different models never take the endpoint past its budget."""
        while True:
            task = None
            async with self._lock:
                held = len(self.loaded) + self._reserved + len(self._unloading)
                if held < self.max_loaded_models:
                    self._reserved += 1
                    return
                idle = [name for name in self.loaded if not self._in_use[name]]
                if idle:
                    victim = idle[0]  # the least recently used model no request holds
                    folder = self.loaded.pop(victim)
                    self.metrics.loaded.set(len(self.loaded))
                    self.evictions.append(victim)
                    task = self._start_unload(victim, folder)
            if task is None:
                await asyncio.sleep(0.05)  # every place is held by a load or a request
                continue
            await task

    def _start_unload(self, name: str, folder: Path) -> asyncio.Task:
        """Unload `name` in a task registered in `_unloading` until it ends, so that its place
        stays held and a new load of it waits for its folder. Call it holding `_lock`."""

        async def unload_then_forget() -> None:
            try:
                await self.unload(name, folder)
            finally:
                if self._unloading.get(name) is task:
                    del self._unloading[name]

        task = asyncio.create_task(unload_then_forget())
        self._unloading[name] = task
        return task

    async def unload(self, name: str, folder: Path | None = None) -> None:
        started = time.perf_counter()
        await self._repository("unload", name)
        self.metrics.observe_time(self.metrics.unloading, time.perf_counter() - started)
        if folder is not None:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    async def unload_all(self) -> list[str]:
        """Unload every loaded model (a cold start on purpose); return their names."""
        async with self._lock:
            victims = list(self.loaded.items())
            self.loaded.clear()
            self.metrics.loaded.set(0)
            tasks = [self._start_unload(name, folder) for name, folder in victims]
        await asyncio.gather(*tasks)
        return [name for name, _ in victims]

    async def forget(self, names) -> list[str]:
        """Unload models `names` (a deleted user's) and remove their folders, after any load
        of one in flight; unload too every model that reads users' adapters (a shared base),
        whose cache may hold theirs: the next request loads it afresh. Return those unloaded."""
        names = set(names)
        loads = [task for name, task in list(self._loading.items()) if name in names]
        await asyncio.gather(*loads, return_exceptions=True)
        async with self._lock:
            victims = [
                (name, folder)
                for name, folder in self.loaded.items()
                if name in names or ADAPTER_SOURCE in _config_text(folder)
            ]
            for name, _ in victims:
                del self.loaded[name]
            self.metrics.loaded.set(len(self.loaded))
            tasks = [self._start_unload(name, folder) for name, folder in victims]
        await asyncio.gather(*tasks)
        return [name for name, _ in victims]

    def restart(self, name: str) -> None:
        """Start loading loaded model `name` again in place, once: a no-op while it loads or
        reloads. Until it is back, new requests wait for it as for a first load."""
        if name in self._loading or name not in self.loaded:
            return
        folder = self.loaded.pop(name)
        self._reserved += 1  # its place stays held while it reloads
        self.metrics.loaded.set(len(self.loaded))
        self.reloads.append(name)
        self._loading[name] = asyncio.create_task(self._reload(name, folder))

    async def reload(self, name: str) -> None:
        """Load `name` again in place (after its stub died, or to pick up new files); return
        when it is back. Requests running on it finish first; new ones wait for it."""
        self.restart(name)
        task = self._loading.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def _reload(self, name: str, folder: Path) -> None:
        reserved = True
        try:
            deadline = time.monotonic() + self.infer_timeout_s
            while self._running[name] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # requests still on it (a dead stub's end at once)
            # Triton reloads a loaded model only when its files changed: the new instance
            # loads beside the old one, then replaces it (a dead stub's instance included).
            await asyncio.to_thread(os.utime, folder / "config.pbtxt")
            started = time.perf_counter()
            error = await self._repository("load", name)
            if error is not None:
                raise LoadFailed(f"Triton could not reload {name}: {error}")
            self.metrics.observe_time(self.metrics.loading, time.perf_counter() - started)
            async with self._lock:
                self.loaded[name] = folder
                self._reserved -= 1
                reserved = False
                self.metrics.loaded.set(len(self.loaded))
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        finally:
            async with self._lock:
                self._loading.pop(name, None)
                if reserved:
                    self._reserved -= 1

    def server_restarted(self) -> list[str]:
        """Forget every loaded model: Triton restarted empty. Each loads again on its next
        request; return their names. Call it on the router's loop."""
        forgotten = list(self.loaded)
        for folder in self.loaded.values():
            shutil.rmtree(folder, ignore_errors=True)
        self.loaded.clear()
        self.metrics.loaded.set(0)
        return forgotten


def _config_text(folder: Path) -> str:
    try:
        return (folder / "config.pbtxt").read_text(errors="replace")
    except OSError:
        return ""


def infer_headers(content_type: str) -> dict[str, str]:
    """SageMaker's binary content type (`...;json-header-size=N`) as Triton's own headers."""
    match = HEADER_SIZE_RE.search(content_type)
    if match is None:
        return {"Content-Type": content_type}
    return {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": match.group(1),
    }


def _error_message(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return answer.text[:500]
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)[:2000]
    return str(body)[:2000]


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def _unless_client_leaves(request: Request, coroutine):
    """Await `coroutine`, cancelling it (and so the request to Triton) if the client leaves."""
    task = asyncio.ensure_future(coroutine)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=STUB_WATCH_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        task.cancel()


def create_app(cache: ModelCache):
    """The router's ASGI app: SageMaker runtime's invocation route, ping and metrics."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        await cache.close()  # Triton waits for open connections when it stops

    app = FastAPI(
        title="Local multi-model endpoint (SageMaker runtime API)", docs_url=None, lifespan=lifespan
    )

    @app.post("/endpoints/{endpoint_name}/invocations")
    async def invoke(endpoint_name: str, request: Request):
        target = request.headers.get(TARGET_HEADER, "")
        try:
            try:
                answer, hit = await _unless_client_leaves(
                    request,
                    cache.invoke(
                        target,
                        await request.body(),
                        request.headers.get("Content-Type", "application/json"),
                    ),
                )
            except httpx.HTTPError as error:
                raise ServiceUnavailable(
                    f"the model server did not answer ({type(error).__name__}); retry later"
                ) from None
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except InvocationError as error:
            return JSONResponse(
                {"message": error.message, **error.extra},
                status_code=error.status,
                headers={"x-amzn-ErrorType": error.error_type},
            )
        headers = {
            "X-Amzn-Invoked-Production-Variant": "AllTraffic",
            CACHE_HEADER: "hit" if hit else "miss",
        }
        media_type = answer.headers.get("Content-Type", "application/json")
        header_size = answer.headers.get("Inference-Header-Content-Length")
        if header_size is not None:  # binary outputs: SageMaker's content type says so
            headers["Inference-Header-Content-Length"] = header_size
            media_type = f"{BINARY_JSON};json-header-size={header_size}"
        return Response(answer.content, media_type=media_type, headers=headers)

    @app.get("/ping")
    async def ping():
        """200 while Triton answers that it is ready, else 503 (SageMaker's container ping)."""
        try:
            ready = (await cache.triton.get("/v2/health/ready", timeout=2)).status_code == 200
        except httpx.HTTPError:
            ready = False
        body = {"status": "ok" if ready else "unavailable", "loaded_models": list(cache.loaded)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(cache.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
