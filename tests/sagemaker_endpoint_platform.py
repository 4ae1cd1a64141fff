"""An emulated SageMaker multi-model endpoint: moto's SageMaker API, served by real Triton.

    with install_endpoint_platform(tmp_path / "platform") as platform:
        endpoint = SageMakerEndpoint(region, role_arn, prefix_uri=prefix, poll_s=0.2)
        endpoint.deploy(runtime=runtime)          # CreateModel, CreateEndpointConfig, ...
        endpoint.wait()                           # Creating -> InService; loads the runtime
        serving.invoke(endpoint.runtime_client(), endpoint.name, "demo-ada--m1", "a photo")

`install_endpoint_platform` patches moto's SageMaker backend in this process (under `mock_aws`
and under a `ThreadedMotoServer` alike) so that an endpoint is more than a record:

* `CreateEndpoint` starts a `helpers.infra.local.endpoint.LocalEndpoint` (a real tritonserver
  and the router) for the endpoint's `MultiModel` container: its store is the emulated S3
  (`S3ArtifactStore`, which reaches moto), its prefix the container's `ModelDataUrl`, and the
  container's `Environment` is the environment of the Triton process and its models, as on an
  instance. The endpoint is `Creating` until the router serves, then `InService`, or `Failed`
  with the reason (a container that is not `MultiModel`, model data it cannot read, a Triton
  that does not start). A model that reads S3 itself (the shared base, for users' adapters)
  runs in Triton's processes, which reach moto only as a server (`AWS_ENDPOINT_URL`, inherited):
  under `mock_aws`, which lives in this process alone, serve models that do not.
* `UpdateEndpoint` (which moto lacks) starts the new config's endpoint beside the old one
  (`Updating`, the old one still serving), then swaps and stops the old one; if the new one
  fails, the old one stays, `InService`, with the failure's reason.
* `DeleteEndpoint` stops the endpoint's Triton and router before it answers.
* `sagemaker-runtime` reaches the endpoints through one front door on a loopback port, which
  forwards `POST /endpoints/<name>/invocations` unchanged to that endpoint's router, passes on
  only the answer headers SageMaker does (not the router's cache header), and answers
  SageMaker's `ValidationError` for an endpoint that is not in service. The platform sets
  `AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME` (botocore's per-service endpoint variable) for this
  process and the processes it starts (notebook kernels, locust), so that an unchanged
  `boto3.client("sagemaker-runtime").invoke_endpoint(...)` gets there.

What is not emulated, and why:

* The instance's GPU: the product packages models with `KIND_GPU` for the endpoint's
  `ml.g5` instances, which Triton refuses on a machine without one ("has kind KIND_GPU but no
  GPUs are available"), so the instance's view of S3 (`InstanceStore`) serves an archive's
  `config.pbtxt` with `KIND_CPU` instead (unless `gpu=True`).
* The serving runtime's packages (`emulate_serving_runtime`).
* The instance's own `/tmp`: a runtime installs itself under the host's
  `helpers.domain.runtime.RUNTIME_ROOT`; an endpoint's stop removes the runtime folder it
  installed, as an instance's end would.
* The execution role: the endpoint reads S3 with this process's credentials, unless
  `store_for` gives a store per role.

`DescribeEndpoint`'s other fields, CloudWatch's metrics and the instance count stay moto's.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# at module level: FastAPI resolves the handler's annotations in the module's namespace
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

#: botocore's endpoint variable for the `sagemaker-runtime` service alone.
RUNTIME_URL_ENV = "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"
#: Request headers of `InvokeEndpoint` that the front door passes on to a router.
_FORWARDED = (
    "content-type",
    "accept",
    "x-amzn-sagemaker-target-model",
    "x-amzn-sagemaker-custom-attributes",
    "x-amzn-sagemaker-inference-id",
)
#: The answer headers SageMaker's runtime passes on (not the router's own, such as its cache
#: header, which a SageMaker client never sees).
_ANSWER_HEADERS = (
    "content-type",
    "x-amzn-invoked-production-variant",
    "x-amzn-sagemaker-custom-attributes",
    "x-amzn-errortype",
)


def emulate_serving_runtime(work_dir: str | Path) -> Path:
    """Create `<work_dir>/serving-runtime/site-packages` as `runtime_for` would find it built.

    The one part of the endpoint's software not emulated: on SageMaker it holds torch,
    diffusers, peft and the rest, installed by pip for the Triton image's Python 3.12 (several
    GB to download), and users' models put it first on `sys.path`. Here Triton's models run on
    this venv's Python, which has those packages already (Triton's Python stub finds the venv
    through `PATH`), so the folder must shadow none of them (a cp312 torch, or numpy 2, would
    break every model): it holds one note and no package. The runtime still goes the whole
    way: packaged on the prefix, installed by its model on the "instance", named by every
    user's model.
    """
    site_packages = Path(work_dir) / "serving-runtime" / "site-packages"
    site_packages.mkdir(parents=True, exist_ok=True)
    (site_packages / "EMULATED.txt").write_text(
        "Empty on purpose: the emulated endpoint's models import torch and diffusers from the "
        "venv that runs Triton (tests/sagemaker_endpoint_platform.py).\n"
    )
    return site_packages


class InstanceStore:
    """The emulated instance's view of the endpoint's S3 prefix: `get_file` as the store's,
    with the models' `KIND_GPU` served as `KIND_CPU` when the instance has no GPU.

    Args:
        store (`ArtifactStore`): the emulated S3.
        gpu (`bool`, defaults to `False`): whether Triton here can run `KIND_GPU` models.
    """

    def __init__(self, store, gpu: bool = False) -> None:
        self.store = store
        self.gpu = gpu

    def get_file(self, uri, path) -> None:
        self.store.get_file(uri, path)
        if not self.gpu:
            _models_on_cpu(Path(path))

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def _models_on_cpu(archive: Path) -> None:
    """Rewrite the MME archive `archive` in place with each `config.pbtxt`'s `KIND_GPU` as
    `KIND_CPU` (left as it is when it has none)."""
    with tarfile.open(archive) as source:
        configs = {
            member.name: source.extractfile(member).read()
            for member in source.getmembers()
            if member.isfile() and member.name.endswith("config.pbtxt")
        }
        if not any(b"KIND_GPU" in data for data in configs.values()):
            return
        rewritten = archive.with_name(archive.name + ".cpu")
        with tarfile.open(rewritten, "w:gz") as target:
            for member in source.getmembers():
                if member.name in configs:
                    data = configs[member.name].replace(b"KIND_GPU", b"KIND_CPU")
                    member.size = len(data)
                    target.addfile(member, io.BytesIO(data))
                else:
                    target.addfile(member, source.extractfile(member) if member.isfile() else None)
    rewritten.replace(archive)


@dataclass
class EmulatedEndpoint:
    """One SageMaker endpoint of the platform and the local endpoint that serves it.

    Args:
        name (`str`): the SageMaker endpoint's name.
        config_name (`str`): the endpoint config it serves.
        local (`LocalEndpoint`, *optional*): its Triton and router, once started.
        runtime_folder (`Path`, *optional*): where the serving runtime its container names
            installs itself.
    """

    name: str
    config_name: str
    local: object | None = None
    runtime_folder: Path | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.ready.wait(120)  # a start in progress ends first
        if self.local is not None:
            self.local.stop()


class EndpointPlatform:
    """The emulated endpoints (`install_endpoint_platform` makes and installs one).

    Args:
        work_dir (`Path`): each endpoint's Triton log and unpacked models, under
            `<work_dir>/<endpoint>-<n>/`.
        max_loaded_models (`int`, defaults to 4): each endpoint's budget (SageMaker's is the
            instance's memory).
        gpu (`bool`, defaults to `False`): whether this machine's Triton runs `KIND_GPU` models.
        synchronous (`bool`, defaults to `False`): whether `CreateEndpoint` and
            `UpdateEndpoint` answer only once the endpoint serves (or failed), so that a
            caller's first `DescribeEndpoint` sees the outcome instead of waiting one polling
            interval (`SageMakerEndpoint`'s default is 30 s); SageMaker answers at once.
        start_timeout_s (`float`, defaults to 120): the longest an endpoint takes to start.
        store_for (`Callable[[str, str], ArtifactStore]`, *optional*): the store an endpoint
            reads its model data with, given its region and its model's execution role ARN
            (e.g. one whose client runs under that role's policy); `S3ArtifactStore(region)`,
            with this process's credentials, by default.
    """

    def __init__(
        self,
        work_dir: str | Path,
        max_loaded_models: int = 4,
        gpu: bool = False,
        synchronous: bool = False,
        start_timeout_s: float = 120,
        store_for: Callable[[str, str], object] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.store_for = store_for or _process_store
        self.max_loaded_models = max_loaded_models
        self.gpu = gpu
        self.synchronous = synchronous
        self.start_timeout_s = start_timeout_s
        #: The endpoints serving now, by name (one that is updating: the one serving).
        self.endpoints: dict[str, EmulatedEndpoint] = {}
        #: Every endpoint started and not yet stopped: serving, starting or failed.
        self._records: list[EmulatedEndpoint] = []
        #: The runtime folders this platform's endpoints installed (not there before).
        self._installed_runtimes: set[Path] = set()
        #: `(endpoint, target model, HTTP status)` of each invocation through the front door.
        self.invocations: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()
        self._counter = itertools.count(1)
        self._front_door = None

    @property
    def url(self) -> str:
        """The front door: what `sagemaker-runtime` clients reach."""
        return self._front_door.url

    def local(self, name: str):
        """The `LocalEndpoint` serving endpoint `name` (`KeyError` if none)."""
        return self.endpoints[name].local

    def router_url(self, name: str) -> str | None:
        """The router of endpoint `name` while it serves, else None."""
        record = self.endpoints.get(name)
        if record is None or record.local is None or not record.ready.is_set():
            return None
        return record.local.url

    def tritonserver_pids(self) -> list[int]:
        """The tritonserver processes of this process's endpoints that live."""
        import psutil

        pids = []
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # one that ends meanwhile
                if child.status() != psutil.STATUS_ZOMBIE and child.name() == "tritonserver":
                    pids.append(child.pid)
        return pids

    # ----------------------------------------------------------------- starting endpoints

    def start(self) -> EndpointPlatform:
        from helpers.infra.local.asgi_thread import ThreadedServer
        from helpers.infra.local.triton_server import free_port

        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._front_door = ThreadedServer(_front_door_app(self), free_port(), "sagemaker-runtime")
        self._front_door.start()
        return self

    def _serve(self, backend, endpoint, config_name: str, on_ready) -> None:
        """Start a local endpoint for `config_name` in a thread; call `on_ready(record, error)`
        when it serves (error None) or failed."""
        record = EmulatedEndpoint(endpoint.endpoint_name, config_name)
        with self._lock:
            self._records.append(record)

        def start() -> None:
            try:
                self._start_local(backend, record)
            except Exception as error:  # the endpoint's FailureReason
                on_ready(record, f"{type(error).__name__}: {error}"[:1024])
            else:
                on_ready(record, None)
            finally:
                record.ready.set()

        threading.Thread(target=start, name=f"endpoint-{record.name}", daemon=True).start()
        if self.synchronous:
            record.ready.wait(self.start_timeout_s)

    def _start_local(self, backend, record: EmulatedEndpoint) -> None:
        from helpers.domain.runtime import RUNTIME_ROOT
        from helpers.infra.aws.endpoint import RUNTIME_MODEL_ENV
        from helpers.infra.local.endpoint import LocalEndpoint

        config = backend.endpoint_configs[record.config_name]
        model = backend._models[config.production_variants[0]["ModelName"]]
        container = model.primary_container or {}
        if container.get("Mode") != "MultiModel":
            raise ValueError(
                f"model {model.model_name}: the emulation serves MultiModel containers only, "
                f"got Mode={container.get('Mode')!r}"
            )
        prefix = container.get("ModelDataUrl") or ""
        store = self.store_for(backend.region_name, model.execution_role_arn)
        if not prefix.startswith("s3://") or not prefix.endswith("/"):
            raise ValueError(f"ModelDataUrl must be an s3:// folder ending in '/', got {prefix!r}")
        try:  # SageMaker checks that the execution role can read the prefix
            store.list(prefix)
        except Exception as error:
            raise ValueError(f"Could not access model data at {prefix}: {error}") from None
        environment = dict(container.get("Environment") or {})
        runtime_model = environment.get(RUNTIME_MODEL_ENV, "").removesuffix(".tar.gz")
        if runtime_model:
            record.runtime_folder = Path(RUNTIME_ROOT) / runtime_model
            with self._lock:
                if not record.runtime_folder.exists():
                    self._installed_runtimes.add(record.runtime_folder)
        local = LocalEndpoint(
            InstanceStore(store, self.gpu),
            prefix,
            self.work_dir / f"{record.name}-{next(self._counter)}",
            max_loaded_models=self.max_loaded_models,
            name=record.name,
        )
        process_environment = local.triton.environment

        def with_container_environment(extra=None):
            return {**process_environment(extra), **environment}

        # The container's environment is the environment of Triton and its models.
        local.triton.environment = with_container_environment
        record.local = local
        local.start(self.start_timeout_s)

    # ----------------------------------------------------------- the patched backend calls

    def create_endpoint(self, original, backend, endpoint_name, endpoint_config_name, tags):
        from moto.sagemaker.exceptions import ValidationError

        if endpoint_name in backend.endpoints:  # moto would replace it
            arn = backend.endpoints[endpoint_name].arn
            raise ValidationError(message=f'Cannot create already existing endpoint "{arn}".')
        endpoint = original(backend, endpoint_name, endpoint_config_name, tags)
        endpoint.endpoint_status = "Creating"

        def on_ready(record: EmulatedEndpoint, error: str | None) -> None:
            with self._lock:
                if backend.endpoints.get(endpoint_name) is not endpoint:
                    return  # deleted meanwhile: the deletion stops it
                if error is None:
                    self.endpoints[endpoint_name] = record
                    endpoint.endpoint_status = "InService"
                else:
                    endpoint.endpoint_status, endpoint.failure_reason = "Failed", error

        self._serve(backend, endpoint, endpoint_config_name, on_ready)
        return endpoint

    def update_endpoint(self, backend, endpoint_name: str, endpoint_config_name: str):
        from moto.sagemaker.exceptions import ValidationError

        endpoint = backend.endpoints.get(endpoint_name)
        if endpoint is None:
            raise ValidationError(message=f"Could not find endpoint '{endpoint_name}'.")
        if endpoint.endpoint_status != "InService":
            raise ValidationError(
                message=f"Cannot update in-progress endpoint {endpoint.arn!r} "
                f"({endpoint.endpoint_status})."
            )
        config = backend.describe_endpoint_config(endpoint_config_name)  # raises if missing
        endpoint.endpoint_status, endpoint.failure_reason = "Updating", None

        def on_ready(record: EmulatedEndpoint, error: str | None) -> None:
            with self._lock:
                if backend.endpoints.get(endpoint_name) is not endpoint:
                    return  # deleted meanwhile: the deletion stops it
                if error is not None:  # SageMaker rolls back to the config that serves
                    endpoint.endpoint_status = "InService"
                    endpoint.failure_reason = f"update to {endpoint_config_name} failed: {error}"
                    self._records.remove(record)  # a failed start stopped what it started
                    return
                old = self.endpoints.get(endpoint_name)
                self.endpoints[endpoint_name] = record  # traffic moves to the new one
                if old is not None:
                    self._records.remove(old)
            if old is not None:  # then the old one goes, before the update is reported done
                self._stop(old)
            endpoint.endpoint_config_name = endpoint_config_name
            endpoint.production_variants = endpoint._process_production_variants(
                config["ProductionVariants"]
            )
            endpoint.endpoint_status = "InService"

        self._serve(backend, endpoint, endpoint_config_name, on_ready)
        return endpoint

    def delete_endpoint(self, original, backend, endpoint_name) -> None:
        original(backend, endpoint_name)
        with self._lock:
            self.endpoints.pop(endpoint_name, None)
            records = [record for record in self._records if record.name == endpoint_name]
            self._records = [record for record in self._records if record.name != endpoint_name]
        for record in records:  # serving, failed, or still starting (waited for)
            self._stop(record)

    def _stop(self, record: EmulatedEndpoint) -> None:
        """Stop `record`'s endpoint; remove the runtime folder it installed once no endpoint
        still running names it (as the end of its instance, with its `/tmp`, would)."""
        record.stop()
        folder = record.runtime_folder
        with self._lock:
            if folder not in self._installed_runtimes or any(
                other.runtime_folder == folder for other in self._records
            ):
                return
            self._installed_runtimes.discard(folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.with_name(f".{folder.name}.lock").unlink(missing_ok=True)

    # ------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop every endpoint (after any start in progress), then the front door."""
        with self._lock:
            records, self._records = self._records, []
            self.endpoints.clear()
        for record in records:
            self._stop(record)
        if self._front_door is not None:
            self._front_door.stop()
            self._front_door = None


def _process_store(region: str, role_arn: str):
    """The emulated S3 with this process's credentials (the execution role is not assumed)."""
    from helpers.infra.aws.store import S3ArtifactStore

    return S3ArtifactStore(region)


def _front_door_app(platform: EndpointPlatform):
    """SageMaker runtime's `InvokeEndpoint` for every endpoint of `platform`: each request
    forwarded unchanged to the router of the endpoint it names."""
    client = httpx.AsyncClient(timeout=None, trust_env=False)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    app = FastAPI(title="Emulated SageMaker runtime", docs_url=None, lifespan=lifespan)

    @app.post("/endpoints/{endpoint_name}/invocations")
    async def invoke(endpoint_name: str, request: Request):
        router = platform.router_url(endpoint_name)
        if router is None:
            return JSONResponse(
                {"message": f"Endpoint {endpoint_name} not found or not in service."},
                status_code=400,
                headers={"x-amzn-ErrorType": "ValidationError"},
            )
        headers = {key: request.headers[key] for key in _FORWARDED if key in request.headers}
        answer = await client.post(
            f"{router}/endpoints/{endpoint_name}/invocations",
            content=await request.body(),
            headers=headers,
        )
        target = headers.get("x-amzn-sagemaker-target-model", "")
        platform.invocations.append((endpoint_name, target, answer.status_code))
        passed = {key: answer.headers[key] for key in _ANSWER_HEADERS if key in answer.headers}
        passed["x-amzn-RequestId"] = str(uuid.uuid4())
        return Response(answer.content, status_code=answer.status_code, headers=passed)

    return app


@contextlib.contextmanager
def install_endpoint_platform(work_dir: str | Path, **options) -> Iterator[EndpointPlatform]:
    """Patch moto's SageMaker backend so that its endpoints are served by real Triton; set
    `AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME` to the front door. On exit every endpoint it started is
    stopped (no tritonserver is left) and moto and the environment are as they were.

    Args:
        work_dir (`Path`): the endpoints' state (`EndpointPlatform`).
        options: `EndpointPlatform`'s (`max_loaded_models`, `gpu`, `synchronous`, ...).

    Raises:
        RuntimeError: a platform is installed already (moto's backend is one per process).
    """
    from moto.sagemaker.models import FakeEndpointConfig, SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse

    if getattr(SageMakerModelBackend, "_emulated_platform", None) is not None:
        raise RuntimeError("an endpoint platform is installed already in this process")
    platform = EndpointPlatform(work_dir, **options)
    original_create = SageMakerModelBackend.create_endpoint
    original_delete = SageMakerModelBackend.delete_endpoint

    def create_endpoint(backend, endpoint_name, endpoint_config_name, tags):
        return platform.create_endpoint(
            original_create, backend, endpoint_name, endpoint_config_name, tags
        )

    def delete_endpoint(backend, endpoint_name):
        platform.delete_endpoint(original_delete, backend, endpoint_name)

    def update_endpoint(response):  # moto has no UpdateEndpoint
        from moto.core.responses import ActionResult

        endpoint = platform.update_endpoint(
            response.sagemaker_backend,
            response._get_param("EndpointName"),
            response._get_param("EndpointConfigName"),
        )
        return ActionResult({"EndpointArn": endpoint.arn})

    patches = [
        (SageMakerModelBackend, "create_endpoint", create_endpoint),
        (SageMakerModelBackend, "delete_endpoint", delete_endpoint),
        (SageMakerModelBackend, "_emulated_platform", platform),
        (SageMakerResponse, "update_endpoint", update_endpoint),
        # moto's allow-list of instance types stops before the g5 family
        (FakeEndpointConfig, "validate_instance_type", lambda self, instance_type: None),
    ]
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in patches]
    previous_url = os.environ.get(RUNTIME_URL_ENV)
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        platform.start()
        os.environ[RUNTIME_URL_ENV] = platform.url
        yield platform
    finally:
        try:
            platform.close()
        finally:
            for owner, name, value in saved:
                if value is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)
            if previous_url is None:
                os.environ.pop(RUNTIME_URL_ENV, None)
            else:
                os.environ[RUNTIME_URL_ENV] = previous_url


_MISSING = object()


def training_output(store, uri: str, weights: Path) -> str:
    """Put a training job's `model.tar.gz` holding LoRA `weights` at `uri` (what a SageMaker
    training job leaves under its output path); return `uri`."""
    from helpers.domain.archives import write_tar_gz
    from helpers.services.packaging import WEIGHTS

    with tempfile.TemporaryDirectory(prefix="training-output-") as tmp:
        archive = write_tar_gz(Path(tmp) / "model.tar.gz", {WEIGHTS: Path(weights)})
        store.put_file(uri, archive)
    return uri
