"""Shared-base serving: one resident base pipeline, every user's LoRA as a hot-swapped adapter.

The second of the endpoint's two serving modes (the first is `helpers.services.packaging`'s one
Triton model per user). What this mode puts in the store, beside the per-user archives:

    <endpoint>/models/shared-base-<hash>.tar.gz      the one Triton model: config.pbtxt,
                                                     1/model.py (model_code/triton_sd_shared),
                                                     1/triton_sd_model.py (the per-user model's
                                                     code it reuses); no weights
    <endpoint>/adapters/<user_id>--<model_id>.safetensors   each user's LoRA, as trained

The shared model is served like any other model of the multi-model endpoint: an MME that holds
one model (`TargetModel="shared-base-<hash>.tar.gz"`), so the local router, boto3 and
`helpers.domain.generation.invoke_model` work unchanged, both modes can live on one endpoint
(a user moves between them by routing alone), and `SageMakerEndpoint.deploy` deploys it as it
is. The request names the user's adapter in one more input, `adapter`, which `Serving.route`
sets from the user's model name: a caller never chooses it.

The archive's name carries a hash of its files, so changed code or settings make a new name:
SageMaker caches a model by name, and a replaced archive under an old name could be served
stale (the rule `helpers.services.packaging` follows for user models). Adapters are never
replaced: a name carries a model id, and model ids are never reused, so the model may cache an
adapter by name for as long as it likes.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from helpers.domain.archives import content_name, write_tar_gz
from helpers.domain.paths import ADAPTER_SUFFIX, adapter_prefix, model_name
from helpers.domain.serving import (
    PerUserModels,
    Serving,
    SharedBase,
    check_serving_mode,
)
from helpers.ports.store import ArtifactStore, as_prefix
from helpers.services.packaging import (
    DEFAULT_GUIDANCE,
    MODEL_CODE,
    ModelExists,
    PackagedModel,
    archive_uri,
    extract_weights,
    latest_completed_jobs,
    load_model_code,
    packaged,
    upload_archive,
)

#: The shared model's code: config.pbtxt and 1/model.py (beside the per-user model's).
SHARED_MODEL_CODE = MODEL_CODE.parent / "triton_sd_shared"
SHARED_NAME_PREFIX = "shared-base-"
#: The longest queue delay or fetch grace a shared model may be packaged with, in ms.
MAX_WAIT_MS = 1000
#: The shared model's largest batch and Triton's queue delay for it, unless told otherwise
#: (measured: `render_shared_config`).
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_MS = 0.0
#: How the shared model's error for an adapter it cannot find begins.
UNKNOWN_ADAPTER = "unknown adapter"


@functools.cache
def lora_batching_paths() -> tuple[str, ...]:
    """How a batch of the shared model may apply its samples' LoRAs: its `LORA_PATHS`, read
    from its `model.py` (which imports numpy at its top, torch only when a model loads)."""
    model = load_model_code(SHARED_MODEL_CODE / "1" / "model.py", "helpers._shared_model_paths")
    return tuple(sorted(model.LORA_PATHS))


@dataclass(frozen=True)
class PublishedAdapter:
    """A user's LoRA in the endpoint's adapter store.

    Args:
        name (`str`): `<user_id>--<model_id>`, the `adapter` input of the user's requests.
        uri (`str`): `<adapters prefix>/<name>.safetensors`.
        size_bytes (`int`): the file's size.
    """

    name: str
    uri: str
    size_bytes: int


# --------------------------------------------------------------------------- adapters


def adapter_source(store: ArtifactStore, adapters_prefix_uri: str) -> str:
    """The shared model's `adapter_source`: where the endpoint reads the adapter store from
    (`ArtifactStore.serving_location`: a folder of this machine, or the `s3://` prefix)."""
    return store.serving_location(adapters_prefix_uri)


def publish_adapter(
    store: ArtifactStore, weights: Path, adapters_prefix_uri: str, user_id: str, model_id: str
) -> PublishedAdapter:
    """Put a user's `pytorch_lora_weights.safetensors` in the adapter store.

    Raises:
        ModelExists: the adapter is there already (names are never reused).
    """
    name = model_name(user_id, model_id)
    uri = adapter_uri(adapters_prefix_uri, name)
    if store.exists(uri):
        raise ModelExists(f"{uri} exists; model names are never reused, train a new model id")
    store.put_file(uri, weights)
    return PublishedAdapter(name=name, uri=uri, size_bytes=Path(weights).stat().st_size)


def adapter_uri(adapters_prefix_uri: str, name: str) -> str:
    """Where user model `name`'s adapter lives: `<adapters prefix>/<name>.safetensors`."""
    return f"{as_prefix(adapters_prefix_uri)!s}/{name}{ADAPTER_SUFFIX}"


def published_adapter(
    store: ArtifactStore, adapters_prefix_uri: str, name: str
) -> PublishedAdapter | None:
    """Model `name`'s adapter if it is in the adapter store already, else None."""
    uri = adapter_uri(adapters_prefix_uri, name)
    if not store.exists(uri):
        return None
    return PublishedAdapter(name=name, uri=uri, size_bytes=store.size(uri))


def package_user_adapter(
    store: ArtifactStore,
    training_output_uri: str,
    adapters_prefix_uri: str,
    user_id: str,
    model_id: str,
) -> PublishedAdapter:
    """`publish_adapter` with the LoRA from a training job's `model.tar.gz`.

    Raises:
        ModelExists: the adapter is there already.
        ValueError: the training output holds no LoRA weights, or is not a safe archive.
    """
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        weights = extract_weights(store, training_output_uri, Path(tmp))
        return publish_adapter(store, weights, adapters_prefix_uri, user_id, model_id)


def publish_user_model(
    store: ArtifactStore,
    training_output_uri: str,
    endpoint_prefix_uri: str,
    user_id: str,
    model_id: str,
    base_model: str,
    gpu: bool = False,
    runtime: str = "",
) -> tuple[str, str]:
    """Put a trained model on the endpoint for both serving modes: its per-user Triton archive
    and its adapter for the shared base. Return the model's name and its archive's URI.

    Onboarding calls this (the local worker and the workflow's packaging Lambda). Either file
    may be there from an attempt before a restart or a retry: names are never reused, so it is
    the same one, and publishing again is harmless.
    """
    from helpers.services.packaging import package_user_model

    name = model_name(user_id, model_id)
    with contextlib.suppress(ModelExists):
        package_user_model(
            store,
            training_output_uri,
            endpoint_prefix_uri,
            user_id,
            model_id,
            base_model,
            gpu=gpu,
            runtime=runtime,
        )
    with contextlib.suppress(ModelExists):
        package_user_adapter(
            store, training_output_uri, adapter_prefix(endpoint_prefix_uri), user_id, model_id
        )
    return name, archive_uri(endpoint_prefix_uri, name)


def package_latest_adapters(
    jobs, store: ArtifactStore, adapters_prefix_uri: str
) -> dict[str, PublishedAdapter]:
    """Publish each user's most recent completed training job's LoRA (user -> adapter); one
    published before is reused as it is."""
    published = {}
    for user, job in latest_completed_jobs(jobs).items():
        name = model_name(user, job.model_id)
        published[user] = published_adapter(
            store, adapters_prefix_uri, name
        ) or package_user_adapter(store, job.output_uri, adapters_prefix_uri, user, job.model_id)
    return published


# --------------------------------------------------------------------------- the shared model


def render_shared_config(
    base_model: str,
    adapter_source: str,
    gpu: bool = False,
    guidance: float = DEFAULT_GUIDANCE,
    region: str = "",
    cache_max_count: int = 1024,
    cache_max_bytes: int = 1 << 30,
    hotswap_rank: int = 16,
    runtime: str = "",
    max_batch: int = DEFAULT_MAX_BATCH,
    queue_delay_ms: float = DEFAULT_QUEUE_DELAY_MS,
    lora_batching: str = "grouped",
    fetch_grace_ms: float = 10.0,
    cpu_threads: int | None = None,
) -> str:
    """`config.pbtxt` of the shared model (see `model_code/triton_sd_shared/config.pbtxt`).

    Args:
        base_model (`str`): the base pipeline on the serving machine (a directory or hub id).
        adapter_source (`str`): where the model reads adapters (`adapter_source()`).
        gpu (`bool`, defaults to `False`): a `KIND_GPU` instance instead of `KIND_CPU`.
        guidance (`float`): the guidance scale of requests that name none.
        region (`str`, defaults to `""`): the region of an `s3://` adapter source.
        cache_max_count, cache_max_bytes (`int`): the adapter cache's bounds.
        hotswap_rank (`int`, defaults to 16): the rank the LoRA slot is padded to.
        runtime (`str`, defaults to `""`): the serving runtime's folder on the endpoint's
            instances (`helpers.services.serving_runtime`), where SageMaker finds torch and
            diffusers.
        max_batch (`int`, defaults to 8): above 1, Triton's dynamic batcher hands the model up
            to this many requests at once, which it denoises in one batch, each sample with
            its own user's adapter; 1 serves requests one at a time, each hot-swapping its
            user's adapter into the one LoRA slot. (On 2 CPU cores, 16 clients: 8 served 2.2x
            the requests per second of 16 at 1 step, and the same at 20 steps.)
        queue_delay_ms (`float`, defaults to 0): with `max_batch` > 1, the longest a request
            waits in Triton's queue for others to batch with (the batcher's
            `max_queue_delay_microseconds`). A busy model batches the requests that queued
            while it worked in any case; on 2 CPU cores a 10 ms wait cost one client 25 ms a
            request and gained nothing at 16 clients.
        lora_batching (`str`, defaults to `"grouped"`): with `max_batch` > 1, how a batch
            applies its samples' LoRAs: `"grouped"` (batched matmuls) or `"peft"` (peft's
            mixed-batch forward).
        fetch_grace_ms (`float`, defaults to 10): with `max_batch` > 1, how long a batch waits
            for cold users' adapters before it starts without them.
        cpu_threads (`int`, *optional*): torch threads of the model's process on a CPU; 0: every
            core, the default: the model is the machine's one model process. On 2 cores a
            second thread denoised a batch of 4 about 1.4x faster, and served one request at
            a time 6-15% faster under load. Lower it when other work shares the cores.
    """
    allowed = lora_batching_paths()
    if lora_batching not in allowed:
        raise ValueError(f"lora_batching must be one of {allowed}, got {lora_batching!r}")
    for name, value in (("queue_delay_ms", queue_delay_ms), ("fetch_grace_ms", fetch_grace_ms)):
        if not isinstance(value, int | float) or not 0 <= value <= MAX_WAIT_MS:
            raise ValueError(f"{name} must be between 0 and {MAX_WAIT_MS} ms, got {value!r}")
    values = {
        "base_model": base_model,
        "adapter_source": adapter_source,
        "default_guidance_scale": str(float(guidance)),
        "aws_region": region,
        "adapter_cache_max_count": str(_at_least_one("cache_max_count", cache_max_count)),
        "adapter_cache_max_bytes": str(_at_least_one("cache_max_bytes", cache_max_bytes)),
        "hotswap_rank": str(_at_least_one("hotswap_rank", hotswap_rank)),
        "runtime": runtime,
        "lora_batching": lora_batching,
        "fetch_grace_ms": f"{float(fetch_grace_ms):g}",
        "cpu_threads": str(_threads(cpu_threads)),
    }
    text = (SHARED_MODEL_CODE / "config.pbtxt").read_text()
    for key, value in values.items():
        if '"' in value or "\n" in value or "\\" in value:
            raise ValueError(f"{key} must not contain quotes, backslashes or newlines: {value!r}")
        pattern = re.compile(rf'(key: "{key}", value: {{ string_value: )"[^"]*"')
        text, found = pattern.subn(lambda match, v=value: f'{match.group(1)}"{v}"', text)
        if found != 1:
            raise AssertionError(f"{SHARED_MODEL_CODE / 'config.pbtxt'} lacks parameter {key}")
    if gpu:
        text = text.replace("kind: KIND_CPU", "kind: KIND_GPU")
    if _at_least_one("max_batch", max_batch) > 1:
        delay = round(queue_delay_ms * 1000)
        batching = f"max_batch_size: {max_batch}\n"
        batching += f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}\n"
        text, found = re.subn(r"^max_batch_size: 1\n", batching, text, flags=re.MULTILINE)
        if found != 1:
            raise AssertionError(f"{SHARED_MODEL_CODE / 'config.pbtxt'} lacks max_batch_size: 1")
    return text


def _threads(cpu_threads: int | None) -> int:
    if cpu_threads is None:
        return 0
    if not isinstance(cpu_threads, int) or cpu_threads < 0:
        raise ValueError(f"cpu_threads must be an integer >= 0 (0: every core), got {cpu_threads}")
    return cpu_threads


def _at_least_one(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def shared_model_files(config: str) -> dict[str, bytes]:
    """The shared model's files (relative to its folder) for a rendered `config`."""
    return {
        "config.pbtxt": config.encode(),
        "1/model.py": (SHARED_MODEL_CODE / "1" / "model.py").read_bytes(),
        "1/triton_sd_model.py": (MODEL_CODE / "1" / "model.py").read_bytes(),
    }


def shared_model_name(files: dict[str, bytes]) -> str:
    """`shared-base-<first 12 hex of a SHA-256 over the files>`: new content, new name."""
    return content_name(SHARED_NAME_PREFIX, files)


def build_shared_archive(config: str, destination: Path) -> tuple[str, Path]:
    """Write the shared model's MME archive for `config`; return its name and path."""
    files = shared_model_files(config)
    name = shared_model_name(files)
    archive = write_tar_gz(destination, {f"{name}/{path}": data for path, data in files.items()})
    return name, archive


def package_shared_base(
    store: ArtifactStore, endpoint_prefix_uri: str, base_model: str, adapter_source: str, **kwargs
) -> PackagedModel:
    """Put the shared model's archive on the endpoint's model prefix (kept if it is there).

    `kwargs` go to `render_shared_config` (`gpu`, `guidance`, `region`, cache bounds,
    `hotswap_rank`, `runtime`). The same code and settings give the same name, so packaging again
    changes nothing; anything else gives a new name and archive.
    """
    config = render_shared_config(base_model, adapter_source, **kwargs)
    with tempfile.TemporaryDirectory(prefix="shared-base-") as tmp:
        name, archive = build_shared_archive(config, Path(tmp) / "model.tar.gz")
        uri = f"{as_prefix(endpoint_prefix_uri)!s}/{name}.tar.gz"
        if not store.exists(uri):
            store.put_file(uri, archive)
        return PackagedModel(name=name, uri=uri, size_bytes=archive.stat().st_size)


# --------------------------------------------------------------------------- per mode


class ModePackaging(abc.ABC):
    """What one serving mode puts under the endpoint's prefix, and the `Serving` it makes.

    `packaging_for(mode)` gives the one a mode names; nothing else compares modes.
    """

    mode: ClassVar[str]

    @abc.abstractmethod
    def location(self, endpoint_prefix_uri: str, name: str) -> str:
        """Where this mode keeps user model `name` (`<user_id>--<model_id>`)."""

    @abc.abstractmethod
    def publish(
        self,
        store: ArtifactStore,
        endpoint_prefix_uri: str,
        weights: Path,
        user_id: str,
        model_id: str,
        base_model: str,
        gpu: bool = False,
        runtime: str = "",
    ) -> PackagedModel | PublishedAdapter:
        """Put one user model (its LoRA file `weights`) where this mode serves it; one
        published before is kept as it is (names are never reused)."""

    @abc.abstractmethod
    def package_latest(
        self,
        jobs,
        store: ArtifactStore,
        endpoint_prefix_uri: str,
        base_model: str,
        gpu: bool = False,
        runtime: str = "",
    ) -> dict[str, PackagedModel | PublishedAdapter]:
        """Publish each user's newest completed training job (user -> what was published)."""

    @abc.abstractmethod
    def serving(
        self, store: ArtifactStore, endpoint_prefix_uri: str, base_model: str, **config
    ) -> Serving:
        """What the endpoint needs beside the users' models, put on the prefix; the
        `Serving` that routes to them. `config`: the shared model's (`render_shared_config`)."""


class PerUserPackaging(ModePackaging):
    """A Triton archive per user model (`helpers.services.packaging`)."""

    mode = PerUserModels.mode

    def location(self, endpoint_prefix_uri: str, name: str) -> str:
        return archive_uri(endpoint_prefix_uri, name)

    def publish(
        self,
        store,
        endpoint_prefix_uri,
        weights,
        user_id,
        model_id,
        base_model,
        gpu=False,
        runtime="",
    ):
        name = model_name(user_id, model_id)
        return packaged(store, endpoint_prefix_uri, name) or upload_archive(
            store,
            archive_uri(endpoint_prefix_uri, name),
            name,
            weights,
            base_model,
            gpu=gpu,
            runtime=runtime,
        )

    def package_latest(self, jobs, store, endpoint_prefix_uri, base_model, gpu=False, runtime=""):
        from helpers.services.packaging import package_latest_models

        return package_latest_models(
            jobs, store, endpoint_prefix_uri, base_model, gpu=gpu, runtime=runtime
        )

    def serving(self, store, endpoint_prefix_uri, base_model, **config) -> Serving:
        return PerUserModels()


class SharedBasePackaging(ModePackaging):
    """Each user's adapter in the adapter store, and one shared model that swaps them in."""

    mode = SharedBase.mode

    def location(self, endpoint_prefix_uri: str, name: str) -> str:
        return adapter_uri(adapter_prefix(endpoint_prefix_uri), name)

    def publish(
        self,
        store,
        endpoint_prefix_uri,
        weights,
        user_id,
        model_id,
        base_model,
        gpu=False,
        runtime="",
    ):
        adapters = adapter_prefix(endpoint_prefix_uri)
        name = model_name(user_id, model_id)
        return published_adapter(store, adapters, name) or publish_adapter(
            store, weights, adapters, user_id, model_id
        )

    def package_latest(self, jobs, store, endpoint_prefix_uri, base_model, gpu=False, runtime=""):
        return package_latest_adapters(jobs, store, adapter_prefix(endpoint_prefix_uri))

    def serving(self, store, endpoint_prefix_uri, base_model, **config) -> Serving:
        adapters = adapter_source(store, adapter_prefix(endpoint_prefix_uri))
        shared = package_shared_base(store, endpoint_prefix_uri, base_model, adapters, **config)
        return SharedBase(shared.name)


_PACKAGING = {
    packaging.mode: packaging for packaging in (PerUserPackaging(), SharedBasePackaging())
}


def packaging_for(mode: str) -> ModePackaging:
    """The packaging of serving `mode` (`ValueError` naming the modes for another)."""
    return _PACKAGING[check_serving_mode(mode)]


def package_for_mode(
    mode: str,
    jobs,
    store: ArtifactStore,
    endpoint_prefix_uri: str,
    base_model: str,
    region: str = "",
    gpu: bool = False,
    runtime: str = "",
) -> tuple[Serving, dict[str, PackagedModel | PublishedAdapter]]:
    """Package every user's newest model for serving `mode`; return the `Serving` and, per
    user, the per-user archive or the adapter (both have `name`, `uri` and `size_bytes`).
    `runtime`: the serving runtime's folder on the instances
    (`helpers.services.serving_runtime`)."""
    packaging = packaging_for(mode)
    models = packaging.package_latest(
        jobs, store, endpoint_prefix_uri, base_model, gpu=gpu, runtime=runtime
    )
    serving = packaging.serving(
        store, endpoint_prefix_uri, base_model, region=region, gpu=gpu, runtime=runtime
    )
    return serving, models
