"""`LocalOnboarding`: the onboarding driver that runs in threads of this process, over either
backend's training jobs (the steps are `helpers.services.onboarding`'s).

A failed model gets a reason from `helpers.domain.failures`' vocabulary with a reference; the
details (the job's reason, an exception) are logged with that reference and kept in the
model's `params["failure"]`, never shown to its user. Two drivers may follow one model (two
processes on one work dir): a `VersionConflict` means the other moved it, so the model is
read again and followed from where it is now.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from helpers.domain import failures
from helpers.domain.paths import endpoint_prefix, job_name_for, jobs_output_path, retry_job_name
from helpers.domain.records import JobStatus, ModelRecord, ModelStatus
from helpers.ports.jobs import JobExists, model_artifact_uri
from helpers.ports.metadata import VersionConflict
from helpers.ports.onboarding import Onboarding
from helpers.services.onboarding import MAX_ATTEMPTS, training_request
from helpers.services.serving import publish_user_model
from helpers.services.serving_runtime import serving_base_model

logger = logging.getLogger(__name__)


def _interrupted(job) -> bool:
    """Whether a job ended because its process went away rather than by its own failure."""
    return job.status == JobStatus.STOPPED or (job.failure_reason or "").startswith("interrupted")


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
        key = (user_id, model_id)
        model = None
        try:
            while not self._stopping(key):
                model = self.metadata.get_model(user_id, model_id)
                if model is None or model.status in (ModelStatus.AVAILABLE, ModelStatus.FAILED):
                    return
                step = {
                    ModelStatus.REQUESTED: self._train,
                    ModelStatus.TRAINING: self._await_training,
                    ModelStatus.PACKAGING: self._package,
                }[model.status]
                try:
                    step(model)
                except VersionConflict:
                    logger.info("model %s/%s was moved by another driver: reading it again", *key)
        except Exception as error:  # the user must see a reason, not a model stuck forever
            if self._stopping(key):
                return
            reference = failures.new_reference()
            logger.exception("onboarding %s/%s failed (ref %s)", *key, reference)
            phrase = (
                failures.PACKAGING_FAILED
                if model is not None and model.status == ModelStatus.PACKAGING
                else failures.ONBOARDING_FAILED
            )
            self._fail(user_id, model_id, phrase, reference, f"{type(error).__name__}: {error}")

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
                detail = job.failure_reason or f"the training job ended {job.status.value}"
                self._fail_model(model, failures.TRAINING_FAILED, failures.new_reference(), detail)
            return

    def _retrain(self, model: ModelRecord) -> None:
        """The job died with a previous process (or was stopped at shutdown): train again
        under a new job name (job names are never reused)."""
        attempt = int(model.params.get("attempt", 1)) + 1
        if attempt > MAX_ATTEMPTS:
            detail = f"the processes running jobs {model.training_job_name} and before ended"
            self._fail_model(
                model, failures.interrupted(MAX_ATTEMPTS), failures.new_reference(), detail
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

    def _fail(self, user_id: str, model_id: str, phrase: str, reference: str, detail: str) -> None:
        model = self.metadata.get_model(user_id, model_id)
        if model is not None and model.status not in (ModelStatus.AVAILABLE, ModelStatus.FAILED):
            with contextlib.suppress(VersionConflict):  # another driver moved it: theirs stands
                self._fail_model(model, phrase, reference, detail)

    def _fail_model(self, model: ModelRecord, phrase: str, reference: str, detail: str) -> None:
        """FAILED with `phrase` and `reference` for its user; `detail` for operators only."""
        logger.warning(
            "model %s/%s failed (ref %s): %s", model.user_id, model.model_id, reference, detail
        )
        self._move(
            model,
            ModelStatus.FAILED,
            failure_reason=failures.user_reason(phrase, reference),
            params={
                **model.params,
                failures.FAILURE_PARAM: {"reference": reference, "detail": detail[:1000]},
            },
        )
