"""Onboarding: from a user's photos to an AVAILABLE personal model on the endpoint.

A model moves REQUESTED -> TRAINING -> PACKAGING -> AVAILABLE, or to FAILED with a reason the
user can read. The metadata store holds where each model is, so the driver can stop and start
again at any point without losing or repeating work:

* REQUESTED: submit the training job (its name is derived from the model, so a second submit
  after a restart finds the first one instead of training twice);
* TRAINING: wait for the job; COMPLETED moves on, FAILED or STOPPED fails the model;
* PACKAGING: write the Triton archive to the endpoint's prefix (an archive that exists already
  is the same one: names are never reused);
* AVAILABLE: the API can generate with it.

Two drivers (`helpers.ports.onboarding.Onboarding`) do this: `LocalOnboarding` here (threads of
this process, over either backend's training jobs) and `StepFunctionsOnboarding`
(`helpers.infra.aws.onboarding`: the state machine of `cdk/`, which runs the same steps on AWS).

Photos live in the store under `users/<user_id>/`: `photos/` holds validated, normalized PNG
files; `uploads/` holds files a client put with presigned URLs, validated and moved into
`photos/` when fine-tuning starts; `training/<model_id>/` is the snapshot a model trains on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from helpers.domain.paths import (
    ADAPTER_SUFFIX,
    adapter_prefix,
    code_prefix,
    endpoint_prefix,
    job_name_for,
    job_prefix,
    jobs_output_path,
    model_name,
    photos_prefix,
    retry_job_name,
    training_photos_prefix,
    uploads_prefix,
    user_prefix,
)
from helpers.domain.records import JobStatus, ModelRecord, ModelStatus
from helpers.ports.jobs import JobExists, TrainingJobRequest, model_artifact_uri
from helpers.ports.metadata import AlreadyExists
from helpers.ports.onboarding import Onboarding
from helpers.services.instance_images import ImageRules, normalize, validate_images
from helpers.services.serving import publish_user_model
from helpers.services.serving_runtime import serving_base_model

if TYPE_CHECKING:
    from helpers.ports.metadata import MetadataStore
    from helpers.ports.store import ArtifactStore
    from helpers.settings import Settings

logger = logging.getLogger(__name__)

#: Photos a user may keep; fewest a model trains on (DreamBooth wants a few views).
MAX_PHOTOS = 20
MIN_TRAINING_PHOTOS = 3
#: Each upload request: 1-10 files, the instance-image rules otherwise.
UPLOAD_RULES = ImageRules(min_images=1, max_images=10)
#: Hyperparameters every model trains with unless its request sets them.
TRAINING_DEFAULTS: Mapping[str, Any] = {"max_train_steps": 300, "num_validation_images": 0}
#: Training attempts of one model when its job is interrupted (a restart, a shutdown).
MAX_ATTEMPTS = 3
_MODEL_ID_RE = re.compile(r"^m(\d+)$")


class OnboardingError(ValueError):
    """A request that cannot start: `field` names what is wrong, `allowed` what would do."""

    def __init__(self, message: str, field: str | None = None, allowed: str | None = None):
        super().__init__(message)
        self.field = field
        self.allowed = allowed


# ---------------------------------------------------------------------------- photos


@dataclass(frozen=True)
class Photo:
    """One of a user's stored photos."""

    name: str
    uri: str


def list_photos(store: ArtifactStore, settings: Settings, user_id: str) -> list[Photo]:
    uris = store.list(photos_prefix(settings.bucket, user_id))
    return [Photo(uri.rsplit("/", 1)[-1], uri) for uri in sorted(uris)]


def add_photos(
    store: ArtifactStore,
    settings: Settings,
    user_id: str,
    files: Sequence[tuple[str, bytes]],
) -> list[Photo]:
    """Validate `files` (all or none), store them as PNG; return the photos added.

    A photo is named after its content's hash, so uploading the same photo twice keeps one.

    Raises:
        InstanceImageError: every problem with every file; nothing is stored.
        OnboardingError: when the user would hold more than `MAX_PHOTOS`.
    """
    validated = validate_images(list(files), UPLOAD_RULES)
    pngs = [data for _, data in normalize(validated)]
    existing = {photo.name for photo in list_photos(store, settings, user_id)}
    names = [f"{hashlib.sha256(data).hexdigest()[:16]}.png" for data in pngs]
    new = {name: data for name, data in zip(names, pngs, strict=True) if name not in existing}
    if len(existing) + len(new) > MAX_PHOTOS:
        raise OnboardingError(
            f"a user keeps at most {MAX_PHOTOS} photos; {len(existing)} are stored and "
            f"{len(new)} would be added",
            field="files",
            allowed=f"at most {MAX_PHOTOS - len(existing)} more photos",
        )
    prefix = photos_prefix(settings.bucket, user_id)
    for name, data in new.items():
        store.put_bytes(prefix + name, data)
    return [Photo(name, prefix + name) for name in dict.fromkeys(names)]


def collect_uploads(store: ArtifactStore, settings: Settings, user_id: str) -> list[Photo]:
    """Validate what the user put with presigned URLs and move it into their photos."""
    uploaded = sorted(store.list(uploads_prefix(settings.bucket, user_id)))
    if not uploaded:
        return []
    files = [(uri.rsplit("/", 1)[-1], store.get_bytes(uri)) for uri in uploaded]
    added = add_photos(store, settings, user_id, files)
    for uri in uploaded:
        store.delete(uri)
    return added


# ---------------------------------------------------------------------------- requests


def next_model_id(models: Sequence[ModelRecord]) -> str:
    """`m<n>` after the user's highest: model ids (and so endpoint names) are never reused."""
    numbers = [int(match.group(1)) for m in models if (match := _MODEL_ID_RE.match(m.model_id))]
    return f"m{max(numbers, default=0) + 1}"


def request_model(
    metadata: MetadataStore,
    store: ArtifactStore,
    settings: Settings,
    user_id: str,
    hyperparameters: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> tuple[ModelRecord, bool]:
    """Record a new REQUESTED model of `user_id` trained on a snapshot of their photos.

    With an `idempotency_key` that an earlier request of this user carried, that request's
    model is returned instead. Returns the model and whether it was created now.

    Raises:
        OnboardingError: too few photos, or an idempotency key reused for other parameters.
        InstanceImageError: presigned uploads that are not usable photos.
    """
    hyperparameters = {**TRAINING_DEFAULTS, **(hyperparameters or {})}
    if idempotency_key is not None:
        earlier = _model_with_key(metadata.list_models(user_id), idempotency_key, hyperparameters)
        if earlier is not None:
            return earlier, False
    collect_uploads(store, settings, user_id)
    photos = list_photos(store, settings, user_id)
    if len(photos) < MIN_TRAINING_PHOTOS:
        raise OnboardingError(
            f"fine-tuning needs at least {MIN_TRAINING_PHOTOS} photos of the subject; "
            f"{len(photos)} uploaded",
            field="photos",
            allowed=f"{MIN_TRAINING_PHOTOS}-{MAX_PHOTOS} photos (POST /v1/photos)",
        )
    while True:  # another request may take the id first; then the next one is ours
        models = metadata.list_models(user_id)
        if idempotency_key is not None:
            earlier = _model_with_key(models, idempotency_key, hyperparameters)
            if earlier is not None:
                return earlier, False
        model_id = next_model_id(models)
        # The snapshot is written before the record, so a model never exists without its
        # photos (a concurrent request that wins the id wrote this user's same photos).
        snapshot = training_photos_prefix(settings.bucket, user_id, model_id)
        for photo in photos:
            store.put_bytes(snapshot + photo.name, store.get_bytes(photo.uri))
        record = ModelRecord(
            user_id,
            model_id,
            instance_data_uri=snapshot,
            training_job_name=job_name_for(user_id, model_id),
            endpoint_model_name=model_name(user_id, model_id),
            params={"hyperparameters": hyperparameters, "idempotency_key": idempotency_key},
        )
        try:
            metadata.create_model(record)
        except AlreadyExists:
            continue
        return record, True


def _model_with_key(
    models: Sequence[ModelRecord], key: str, hyperparameters: Mapping[str, Any]
) -> ModelRecord | None:
    """The model an earlier request with `key` made, if any; a key stands for one request, so
    reusing it with other parameters is refused rather than silently answered."""
    earlier = next((m for m in models if m.params.get("idempotency_key") == key), None)
    if earlier is not None and earlier.params.get("hyperparameters") != dict(hyperparameters):
        raise OnboardingError(
            f"Idempotency-Key {key!r} was used for model {earlier.model_id} with other "
            "parameters; a retry must repeat its request exactly",
            field="Idempotency-Key",
            allowed="a new key for a different request",
        )
    return earlier


def _interrupted(job) -> bool:
    """Whether a job ended because its process went away rather than by its own failure."""
    return job.status == JobStatus.STOPPED or (job.failure_reason or "").startswith("interrupted")


def training_request(settings: Settings, model: ModelRecord) -> TrainingJobRequest:
    """The training job of a REQUESTED model."""
    return TrainingJobRequest(
        model.training_job_name or job_name_for(model.user_id, model.model_id),
        model.user_id,
        model.model_id,
        model.instance_data_uri
        or training_photos_prefix(settings.bucket, model.user_id, model.model_id),
        settings.base_model,
        jobs_output_path(settings.bucket),
        dict(model.params.get("hyperparameters", {})),
    )


def delete_user_data(
    store: ArtifactStore, metadata: MetadataStore, onboarding: Onboarding, settings, user_id
) -> int:
    """Stop the user's onboarding, then delete their photos, training outputs, endpoint
    archives and adapters, and records; return how many stored objects went."""
    deleted = 0
    for model in metadata.list_models(user_id):
        onboarding.cancel(model)
        base = job_name_for(user_id, model.model_id)
        for job_name in [retry_job_name(base, n) for n in range(1, MAX_ATTEMPTS + 1)]:
            deleted += store.delete_prefix(job_prefix(settings.bucket, job_name))
            deleted += store.delete_prefix(code_prefix(settings.bucket, job_name))
        name = model_name(user_id, model.model_id)
        prefix = endpoint_prefix(settings.bucket)
        for uri in (f"{prefix}{name}.tar.gz", f"{adapter_prefix(prefix)}{name}{ADAPTER_SUFFIX}"):
            if store.exists(uri):
                store.delete(uri)
                deleted += 1
    deleted += store.delete_prefix(user_prefix(settings.bucket, user_id))
    metadata.delete_user(user_id)
    return deleted


# ---------------------------------------------------------------------------- drivers


class LocalOnboarding(Onboarding):
    """One thread of this process per model in flight, over either backend's training jobs.

    Args:
        settings (`Settings`), store (`ArtifactStore`), metadata (`MetadataStore`),
        jobs (`TrainingJobs`): where things are and who trains.
        gpu (`bool`, defaults to False): package models for GPU instances.
        runtime (`Callable[[], str]`, *optional*): the serving runtime's folder on the
            endpoint's instances (`helpers.services.serving_runtime`), asked for when the first
            model is packaged; none where the endpoint has the packages itself.
    """

    def __init__(
        self,
        settings,
        store,
        metadata,
        jobs,
        gpu: bool = False,
        runtime: Callable[[], str] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metadata = metadata
        self.jobs = jobs
        self.gpu = gpu
        self._runtime = runtime
        self._closed = threading.Event()
        self._cancelled: set[tuple[str, str]] = set()
        self._threads: dict[tuple[str, str], threading.Thread] = {}
        self._lock = threading.Lock()

    def start(self, model: ModelRecord) -> None:
        key = (model.user_id, model.model_id)
        with self._lock:
            if key in self._threads and self._threads[key].is_alive():
                return
            thread = threading.Thread(
                target=self._drive, args=key, name=f"onboarding-{model.user_id}", daemon=True
            )
            self._threads[key] = thread
        thread.start()

    def resume(self) -> int:
        unfinished = [
            model
            for user in self.metadata.list_users()
            for model in self.metadata.list_models(user.user_id)
            if model.status not in (ModelStatus.AVAILABLE, ModelStatus.FAILED)
        ]
        for model in unfinished:
            self.start(model)
        return len(unfinished)

    def cancel(self, model: ModelRecord) -> None:
        key = (model.user_id, model.model_id)
        with self._lock:
            self._cancelled.add(key)
            thread = self._threads.get(key)
        for job_name in {model.training_job_name, job_name_for(*key)} - {None}:
            with contextlib.suppress(KeyError):  # never submitted
                self.jobs.stop(job_name, model.user_id)
        if thread is not None:
            thread.join(timeout=60)

    def _stopping(self, key: tuple[str, str]) -> bool:
        return self._closed.is_set() or key in self._cancelled

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout=10)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until no model is in flight (for tests and notebooks)."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

    # -- the steps ------------------------------------------------------------------------

    def _drive(self, user_id: str, model_id: str) -> None:
        try:
            while not self._stopping((user_id, model_id)):
                model = self.metadata.get_model(user_id, model_id)
                if model is None or model.status in (ModelStatus.AVAILABLE, ModelStatus.FAILED):
                    return
                step = {
                    ModelStatus.REQUESTED: self._train,
                    ModelStatus.TRAINING: self._await_training,
                    ModelStatus.PACKAGING: self._package,
                }[model.status]
                step(model)
        except Exception as error:  # the user must see a reason, not a model stuck forever
            if self._stopping((user_id, model_id)):
                return
            logger.exception("onboarding %s/%s", user_id, model_id)
            self._fail(user_id, model_id, f"{type(error).__name__}: {error}")

    def _train(self, model: ModelRecord) -> None:
        request = training_request(self.settings, model)
        with contextlib.suppress(JobExists):  # submitted before a restart: follow that job
            self.jobs.submit(request)
        self._move(model, ModelStatus.TRAINING, training_job_name=request.job_name)

    def _await_training(self, model: ModelRecord) -> None:
        key = (model.user_id, model.model_id)
        while not self._stopping(key):
            try:
                job = self.jobs.wait(model.training_job_name, model.user_id, timeout=5, poll=0.5)
            except TimeoutError:
                continue
            if job.status == JobStatus.COMPLETED:
                self._move(model, ModelStatus.PACKAGING)
            elif self._stopping(key):
                pass  # shutting down (the model resumes) or cancelled (its user is deleted)
            elif _interrupted(job):
                self._retrain(model)
            else:
                reason = job.failure_reason or f"the training job ended {job.status.value}"
                self._move(model, ModelStatus.FAILED, failure_reason=f"training: {reason}")
            return

    def _retrain(self, model: ModelRecord) -> None:
        """The job died with a previous process (or was stopped at shutdown): train again
        under a new job name (job names are never reused)."""
        attempt = int(model.params.get("attempt", 1)) + 1
        if attempt > MAX_ATTEMPTS:
            self._move(
                model,
                ModelStatus.FAILED,
                failure_reason=f"training was interrupted {MAX_ATTEMPTS} times; request again",
            )
            return
        retry_name = retry_job_name(job_name_for(model.user_id, model.model_id), attempt)
        request = replace(training_request(self.settings, model), job_name=retry_name)
        with contextlib.suppress(JobExists):
            self.jobs.submit(request)
        self.metadata.update_model(
            model.user_id,
            model.model_id,
            expected_version=model.version,
            training_job_name=request.job_name,
            params={**model.params, "attempt": attempt},
        )

    @functools.cached_property
    def runtime(self) -> str:
        """The serving runtime's folder on the endpoint's instances ("" for none)."""
        return self._runtime() if self._runtime is not None else ""

    def _package(self, model: ModelRecord) -> None:
        name, uri = publish_user_model(
            self.store,
            model_artifact_uri(jobs_output_path(self.settings.bucket), model.training_job_name),
            endpoint_prefix(self.settings.bucket),
            model.user_id,
            model.model_id,
            serving_base_model(str(self.settings.base_model), self.runtime),
            gpu=self.gpu,
            runtime=self.runtime,
        )
        self._move(model, ModelStatus.AVAILABLE, endpoint_model_name=name, model_artifact_uri=uri)

    def _move(self, model: ModelRecord, status: ModelStatus, **changes: Any) -> None:
        self.metadata.update_model(
            model.user_id, model.model_id, expected_version=model.version, status=status, **changes
        )

    def _fail(self, user_id: str, model_id: str, reason: str) -> None:
        model = self.metadata.get_model(user_id, model_id)
        if model is not None and model.status not in (ModelStatus.AVAILABLE, ModelStatus.FAILED):
            self._move(model, ModelStatus.FAILED, failure_reason=reason[:1000])
