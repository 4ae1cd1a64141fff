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

Two drivers (`helpers.ports.onboarding.Onboarding`) do this: `LocalOnboarding`
(`helpers.services.local_onboarding`: threads of this process, over either backend's training
jobs) and `StepFunctionsOnboarding` (`helpers.infra.aws.onboarding`: the state machine of
`cdk/`, which runs the same steps on AWS). This module holds what both share: a model's
request, its training job, and deleting a user.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
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
    retry_job_name,
    training_photos_prefix,
    user_prefix,
)
from helpers.domain.records import ModelRecord, utc_now
from helpers.ports.jobs import TrainingJobRequest
from helpers.ports.metadata import AlreadyExists, NotFound, VersionConflict
from helpers.services.errors import OnboardingError
from helpers.services.photos import (
    MAX_PHOTOS,
    MIN_TRAINING_PHOTOS,
    collect_uploads,
    list_photos,
)

if TYPE_CHECKING:
    from helpers.ports.endpoint import Endpoint
    from helpers.ports.jobs import TrainingJobs
    from helpers.ports.metadata import MetadataStore
    from helpers.ports.onboarding import Onboarding
    from helpers.ports.store import ArtifactStore
    from helpers.settings import Settings

#: Hyperparameters every model trains with unless its request sets them.
TRAINING_DEFAULTS: Mapping[str, Any] = {"max_train_steps": 300, "num_validation_images": 0}
#: Training attempts of one model when its job is interrupted (a restart, a shutdown).
MAX_ATTEMPTS = 3
_MODEL_ID_RE = re.compile(r"^m(\d+)$")


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
    admit: Callable[[Sequence[ModelRecord], Mapping[str, Any]], None] | None = None,
) -> tuple[ModelRecord, bool]:
    """Record a new REQUESTED model of `user_id` trained on a snapshot of their photos.

    With an `idempotency_key` that an earlier request of this user carried, that request's
    model is returned instead. Returns the model and whether it was created now.

    `admit(models, hyperparameters)`, when given, is called once the photos are checked and
    before anything is written, with the user's models: it raises to refuse the model (a
    quota); a replayed request is not admitted again.

    Raises:
        OnboardingError: too few photos, or an idempotency key reused for other parameters.
        InstanceImageError: presigned uploads that are not usable photos.
        NotFound: the user is gone or being deleted (nothing of the request is left).
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
    if admit is not None:
        admit(metadata.list_models(user_id), hyperparameters)
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
        except NotFound:  # the user is being deleted: leave nothing of this request behind
            store.delete_prefix(snapshot)
            raise
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
    store: ArtifactStore,
    metadata: MetadataStore,
    onboarding: Onboarding,
    settings,
    user_id: str,
    *,
    jobs: TrainingJobs | None = None,
    endpoint: Endpoint | None = None,
) -> int:
    """Delete everything of `user_id`; return how many stored objects went.

    In this order, each step idempotent, so a deletion interrupted anywhere finishes when it
    runs again:

    1. mark the user `deleting_since` (a versioned write, once): no new model starts for them;
    2. stop their onboarding and training;
    3. delete their store objects: photos, uploads, training snapshots, every attempt's job
       outputs and code, endpoint archives and adapters;
    4. with `jobs`, their jobs' local leftovers (`TrainingJobs.forget`); with `endpoint`, its
       copies of their models (`Endpoint.forget`);
    5. their records, leaving a tombstone that retires the id. Last, so their key keeps
       working, for a rerun, until everything else is gone.

    Raises:
        Whatever a step raised; nothing is undone, and a rerun carries on.
    """
    _mark_deleting(metadata, user_id)
    models = metadata.list_models(user_id)
    for model in models:
        onboarding.cancel(model)
    job_names = _job_names(metadata, user_id, models)
    names = [model_name(user_id, model.model_id) for model in models]
    deleted = 0
    for job_name in job_names:
        deleted += store.delete_prefix(job_prefix(settings.bucket, job_name))
        deleted += store.delete_prefix(code_prefix(settings.bucket, job_name))
    for model, name in zip(models, names, strict=True):
        # The default endpoint's, and the one the model was published to (a deployment may
        # name its endpoint otherwise).
        prefixes = {endpoint_prefix(settings.bucket)}
        if model.model_artifact_uri:
            prefixes.add(model.model_artifact_uri.rpartition("/")[0] + "/")
        for prefix in sorted(prefixes):
            for uri in (
                f"{prefix}{name}.tar.gz",
                f"{adapter_prefix(prefix)}{name}{ADAPTER_SUFFIX}",
            ):
                if store.exists(uri):
                    store.delete(uri)
                    deleted += 1
    deleted += store.delete_prefix(user_prefix(settings.bucket, user_id))
    if jobs is not None:
        for job_name in job_names:
            jobs.forget(job_name, user_id)
    if endpoint is not None:
        endpoint.forget(names)
    metadata.delete_user(user_id)
    return deleted


def _mark_deleting(metadata: MetadataStore, user_id: str) -> None:
    """Set the user's `deleting_since` unless it is set (or the user is gone already)."""
    while True:
        user = metadata.get_user(user_id)
        if user is None or user.deleting_since is not None:
            return
        try:
            metadata.update_user(user_id, expected_version=user.version, deleting_since=utc_now())
            return
        except VersionConflict:
            continue  # a key rotation meanwhile: mark the record as it is now


def _job_names(metadata: MetadataStore, user_id: str, models: Sequence[ModelRecord]) -> list[str]:
    """Every job the user's models may have run: the recorded ones, and each attempt's name."""
    names = {job.job_name for job in metadata.list_jobs(user_id)}
    for model in models:
        base = job_name_for(user_id, model.model_id)
        names.update(retry_job_name(base, n) for n in range(1, MAX_ATTEMPTS + 1))
        if model.training_job_name:
            names.add(model.training_job_name)
    return sorted(names)
