"""Package a user's trained LoRA as a Triton model for the multi-model endpoint.

A training job leaves `model.tar.gz` with `pytorch_lora_weights.safetensors`. The endpoint
needs one archive per user model in the MME layout:

    <name>/config.pbtxt                          from model_code/triton_sd, base model filled in
    <name>/1/model.py                            the Python-backend model, unchanged
    <name>/1/pytorch_lora_weights.safetensors    the user's weights (never the base model)

uploaded as `<endpoint prefix>/<name>.tar.gz`, where `<name>` is the `TargetModel`. Names
carry the model id (`<user>--<model_id>`), model ids are never reused, and an archive that
exists is never replaced: SageMaker caches a model by name, so a changed archive under an old
name could be served stale on one instance and fresh on another.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from helpers.domain.archives import safe_extract, write_tar_gz
from helpers.domain.model_code import MODEL_CODE_DIR, load_model_code_file
from helpers.domain.paths import check_model_name, model_name
from helpers.ports.store import ArtifactStore

#: The Triton model every user archive is made from.
MODEL_CODE = MODEL_CODE_DIR / "triton_sd"
WEIGHTS = "pytorch_lora_weights.safetensors"
#: Guidance for a request that names none; 2 keeps the tiny models' colours (notebook 02).
DEFAULT_GUIDANCE = 2.0


class ModelExists(ValueError):
    """An archive of this name is already on the endpoint's prefix; names are never reused."""


@dataclass(frozen=True)
class PackagedModel:
    """What `package_user_model` uploaded.

    Args:
        name (`str`): the Triton model name and SageMaker `TargetModel` (without `.tar.gz`).
        uri (`str`): where the archive is, `<prefix>/<name>.tar.gz`.
        size_bytes (`int`): the archive's size.
    """

    name: str
    uri: str
    size_bytes: int

    @property
    def target_model(self) -> str:
        """The `TargetModel` of an invocation: the archive's key relative to the prefix."""
        return f"{self.name}.tar.gz"


def load_model_code(path: Path = MODEL_CODE / "1" / "model.py", name: str = "triton_sd_model"):
    """Import a Triton model's `model.py` (not a package) as module `name`: to test its parts
    or run its class outside Triton."""
    return load_model_code_file(path, name)


def render_config(
    base_model: str, gpu: bool = False, guidance: float = DEFAULT_GUIDANCE, runtime: str = ""
) -> str:
    """`config.pbtxt` for one user model: the base model's location, the serving runtime's
    folder on the instance (`helpers.services.serving_runtime`; "" for none) and the instance
    kind."""
    for key, value in (("base_model", base_model), ("runtime", runtime)):
        if '"' in value or "\n" in value:
            raise ValueError(f"{key} must not contain quotes or newlines, got {value!r}")
    text = (MODEL_CODE / "config.pbtxt").read_text()
    text = text.replace('string_value: "BASE_MODEL"', f'string_value: "{base_model}"')
    text = text.replace(
        'key: "runtime", value: { string_value: "" }',
        f'key: "runtime", value: {{ string_value: "{runtime}" }}',
    )
    text = text.replace(
        'key: "default_guidance_scale", value: { string_value: "2.0" }',
        f'key: "default_guidance_scale", value: {{ string_value: "{float(guidance)}" }}',
    )
    if gpu:
        text = text.replace("kind: KIND_CPU", "kind: KIND_GPU")
    return text


def build_archive(
    name: str,
    weights: Path,
    base_model: str,
    destination: Path,
    gpu: bool = False,
    guidance: float = DEFAULT_GUIDANCE,
    runtime: str = "",
) -> Path:
    """Write the MME archive of model `name` with `weights` to `destination` (atomically)."""
    check_model_name(name)
    return write_tar_gz(
        destination,
        {
            f"{name}/config.pbtxt": render_config(base_model, gpu, guidance, runtime),
            f"{name}/1/model.py": MODEL_CODE / "1" / "model.py",
            f"{name}/1/{WEIGHTS}": weights,
        },
    )


def package_user_model(
    store: ArtifactStore,
    training_output_uri: str,
    endpoint_prefix_uri: str,
    user_id: str,
    model_id: str,
    base_model: str,
    gpu: bool = False,
    guidance: float = DEFAULT_GUIDANCE,
    runtime: str = "",
) -> PackagedModel:
    """Turn a training job's `model.tar.gz` into the user's Triton model on the endpoint prefix.

    Args:
        store: where both archives live.
        training_output_uri: the job's `.../output/model.tar.gz`.
        endpoint_prefix_uri: the MME's model prefix (`s3://bucket/endpoint/models/`).
        user_id, model_id: whose model; they make its name.
        base_model: where the endpoint finds the base pipeline (a directory on the serving
            machine, or a hub id).
        gpu: `KIND_GPU` instances (a GPU endpoint) instead of `KIND_CPU`.
        guidance: the guidance scale of requests that name none.
        runtime: the serving runtime's folder on the endpoint's instances
            (`ServingRuntime.path`), where a SageMaker endpoint finds torch and diffusers.

    Raises:
        ModelExists: an archive of this name is already there.
        ValueError: the training output holds no LoRA weights, or is not a safe archive.
    """
    name = model_name(user_id, model_id)
    uri = archive_uri(endpoint_prefix_uri, name)
    if store.exists(uri):
        raise ModelExists(f"{uri} exists; model names are never reused, train a new model id")
    with tempfile.TemporaryDirectory(prefix="package-") as tmp:
        weights = extract_weights(store, training_output_uri, Path(tmp))
        return upload_archive(store, uri, name, weights, base_model, gpu, guidance, runtime)


def archive_uri(endpoint_prefix_uri: str, name: str) -> str:
    """Where user model `name`'s archive lives: `<prefix>/<name>.tar.gz`."""
    return f"{endpoint_prefix_uri.rstrip('/')}/{name}.tar.gz"


def upload_archive(
    store: ArtifactStore,
    uri: str,
    name: str,
    weights: Path,
    base_model: str,
    gpu: bool = False,
    guidance: float = DEFAULT_GUIDANCE,
    runtime: str = "",
) -> PackagedModel:
    """Build model `name`'s archive from its LoRA `weights` and store it at `uri`."""
    with tempfile.TemporaryDirectory(prefix="archive-") as tmp:
        archive = build_archive(
            name, weights, base_model, Path(tmp) / "model.tar.gz", gpu, guidance, runtime
        )
        store.put_file(uri, archive)
        return PackagedModel(name=name, uri=uri, size_bytes=archive.stat().st_size)


def packaged(store: ArtifactStore, endpoint_prefix_uri: str, name: str) -> PackagedModel | None:
    """Model `name`'s archive if it is on the prefix already (names are never reused, so it
    is the same model), else None."""
    uri = archive_uri(endpoint_prefix_uri, name)
    if not store.exists(uri):
        return None
    return PackagedModel(name=name, uri=uri, size_bytes=store.size(uri))


def extract_weights(store: ArtifactStore, training_output_uri: str, directory: Path) -> Path:
    """Fetch a training job's `model.tar.gz` into `directory`; return its LoRA weights file.

    Raises:
        ValueError: the archive holds no LoRA weights, or is not a safe archive.
    """
    store.get_file(training_output_uri, directory / "training.tar.gz")
    unpacked = safe_extract(directory / "training.tar.gz", directory / "training")
    found = sorted(unpacked.rglob(WEIGHTS))
    if not found:
        raise ValueError(f"{training_output_uri} holds no {WEIGHTS}")
    return found[0]


def latest_completed_jobs(jobs) -> dict:
    """Each user's most recent completed training job with an output (user -> job)."""
    latest = {}
    for job in jobs.list():
        if job.status.value != "COMPLETED" or not job.user_id or not job.output_uri:
            continue
        if job.user_id not in latest or (job.ended_at or "") > (latest[job.user_id].ended_at or ""):
            latest[job.user_id] = job
    return dict(sorted(latest.items()))


def package_latest_models(
    jobs, store: ArtifactStore, endpoint_prefix_uri: str, base_model: str, **kwargs
) -> dict[str, PackagedModel]:
    """Package each user's most recent completed training job (user -> its packaged model).

    A model packaged before is reused as it is (names are never reused, so it is the same).
    `kwargs` go to `package_user_model` (`gpu`, `guidance`, `runtime`).
    """
    models = {}
    for user, job in latest_completed_jobs(jobs).items():
        name = model_name(user, job.model_id)
        models[user] = packaged(store, endpoint_prefix_uri, name) or package_user_model(
            store, job.output_uri, endpoint_prefix_uri, user, job.model_id, base_model, **kwargs
        )
    return models
