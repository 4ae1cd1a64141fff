"""The training jobs port: run `model_code/train_dreambooth_lora.py` as a job, watch it, stop it.

`helpers.backend.open_backend(settings).jobs` gives local subprocesses or SageMaker training
jobs. Both follow SageMaker's script-mode contract and its output layout, so a
finished job's model is at `<output_path>/<job_name>/output/model.tar.gz` on either backend.
Requests are checked (`TrainingJobRequest.check_inputs`) before anything is created.

Example:

    jobs = open_backend(settings).jobs
    jobs.submit(TrainingJobRequest("ada-m1-001", "ada", "m1", images_uri, settings.base_model,
                                   {"max_train_steps": 300}, settings.uri("jobs")))
    done = jobs.wait("ada-m1-001", "ada", on_progress=lambda d: print(d.last_step, d.last_loss))
"""

from __future__ import annotations

import abc
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from helpers.domain import hyperparameters as hyperparameter_rules
from helpers.domain.records import JobRecord, JobStatus, check_id, check_job_name
from helpers.domain.uris import S3Uri
from helpers.ports.metadata import NotFound

if TYPE_CHECKING:
    from helpers.ports.metadata import MetadataStore

__all__ = [
    "ENTRY_POINT",
    "HYPERPARAMETER_RULES",
    "METRIC_DEFINITIONS",
    "PROGRESS_RE",
    "RESERVED_HYPERPARAMETERS",
    "SCRIPT_DEFAULTS",
    "JobDescription",
    "JobExists",
    "JobStatus",
    "TrainingJobRequest",
    "TrainingJobs",
    "check_hyperparameters",
    "model_artifact_uri",
]

#: The entry script, relative to `model_code/` (SageMaker's `sagemaker_program`).
ENTRY_POINT = "train_dreambooth_lora.py"

#: SageMaker scrapes these from the job's log into CloudWatch metrics (`MetricDefinitions`);
#: they match the script's `step=12 loss=0.123456 lr=... seconds=...` lines.
METRIC_DEFINITIONS: tuple[dict[str, str], ...] = (
    {"Name": "train:loss", "Regex": r"step=\d+ loss=([0-9.eE+-]+)"},
    {"Name": "train:step", "Regex": r"step=(\d+) loss="},
)

#: The same line as one pattern, for local progress: groups step and loss.
PROGRESS_RE = re.compile(r"step=(\d+) loss=([0-9.eE+-]+|nan|inf)")

#: Hyperparameters a request may set: name -> `Hyperparameter` (kind, bounds, default), the
#: training script's own table (`model_code/hyperparameters.py`), not a copy of it.
HYPERPARAMETER_RULES = hyperparameter_rules.HYPERPARAMETERS

#: The script's value of each hyperparameter a request leaves out (the same table's defaults);
#: combinations are checked with these.
SCRIPT_DEFAULTS = hyperparameter_rules.DEFAULTS

#: Flags the job itself sets from the request and the script-mode contract.
RESERVED_HYPERPARAMETERS = frozenset(
    {
        "pretrained_model_name_or_path",
        "instance_data_dir",
        "class_data_dir",
        "output_dir",
        "validation_output_dir",
        "checkpoints_dir",
        "resume_from_checkpoint",
    }
)


class JobExists(ValueError):
    """A job of this name was already submitted; job names are never reused."""


def check_hyperparameters(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `hyperparameters` if every name is known and every value allowed.

    The rules are the training script's (`model_code/hyperparameters.py`): each value's type
    and range, and the combinations the script refuses, so a job never starts only to exit on
    its arguments: `lr_warmup_steps` below `max_train_steps`, `with_prior_preservation` with a
    `class_prompt`, and `checkpoints_total_limit` with `checkpointing_steps` > 0 (a value left
    out counts as the script's default). The job sets the paths itself
    (`RESERVED_HYPERPARAMETERS`).

    Raises:
        ValueError: naming the unknown or reserved keys, or the key, its value and its range,
            or the keys of a combination, why it cannot work and what would.
    """
    if not isinstance(hyperparameters, Mapping):
        raise ValueError(f"hyperparameters must be a dict, got {type(hyperparameters).__name__}")
    reserved = sorted(set(hyperparameters) & RESERVED_HYPERPARAMETERS)
    if reserved:
        raise ValueError(
            f"hyperparameters {reserved} are set by the job itself (from base_model, "
            "instance_data_uri and output_path); leave them out"
        )
    return hyperparameter_rules.check(hyperparameters)


def model_artifact_uri(output_path: str, job_name: str) -> str:
    """Where a job's `model.tar.gz` lands: SageMaker's `<output_path>/<job>/output/model.tar.gz`."""
    return str(S3Uri.parse_prefix(output_path).join(job_name, "output", "model.tar.gz"))


@dataclass(frozen=True)
class TrainingJobRequest:
    """What to train: one user's model from their photos.

    Args:
        job_name (`str`): 1-63 of `a-z0-9-`, unique; never reused.
        user_id (`str`): the owner, 1-64 of `a-z0-9-_`.
        model_id (`str`): the model being trained, 1-64 of `a-z0-9-_`.
        instance_data_uri (`str`): `s3://` folder holding the user's validated images.
        base_model (`str`): a diffusers pipeline directory (local), an `s3://` folder, or a
            hub model id (SageMaker only).
        output_path (`str`): `s3://` folder; the model goes to
            `<output_path>/<job_name>/output/model.tar.gz`.
        hyperparameters (`dict`, defaults to `{}`): see `HYPERPARAMETER_RULES`
            (`model_code/hyperparameters.py`).
    """

    job_name: str
    user_id: str
    model_id: str
    instance_data_uri: str
    base_model: str
    output_path: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check_inputs()

    def check_inputs(self) -> None:
        """Raise `ValueError` naming the first invalid argument."""
        check_job_name(self.job_name)
        check_id("user_id", self.user_id)
        check_id("model_id", self.model_id)
        for name in ("instance_data_uri", "output_path"):
            try:
                S3Uri.parse_prefix(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ValueError(
                f"base_model must be a path, s3:// URI or hub id, got {self.base_model!r}"
            )
        object.__setattr__(self, "hyperparameters", check_hyperparameters(self.hyperparameters))

    @property
    def output_uri(self) -> str:
        """The `model.tar.gz` the job will write."""
        return model_artifact_uri(self.output_path, self.job_name)

    def to_record(self) -> JobRecord:
        """A new PENDING `JobRecord` for the metadata store."""
        return JobRecord(
            self.job_name,
            self.user_id,
            self.model_id,
            hyperparameters=dict(self.hyperparameters),
            instance_data_uri=self.instance_data_uri,
            base_model=self.base_model,
            output_uri=self.output_uri,
        )


@dataclass(frozen=True)
class JobDescription:
    """A job as the caller sees it.

    Args:
        job_name (`str`), user_id (`str`), model_id (`str`): the job and whose model it trains.
        status (`JobStatus`): PENDING, RUNNING, COMPLETED, FAILED or STOPPED.
        failure_reason (`str`, *optional*): why it failed.
        last_step (`int`, *optional*), last_loss (`float`, *optional*): the latest progress.
        max_steps (`int`, *optional*): `max_train_steps` when the request set it.
        output_uri (`str`, *optional*): the `model.tar.gz` (there once COMPLETED).
        started_at (`str`, *optional*), ended_at (`str`, *optional*): ISO-8601 UTC.
        seconds (`float`, *optional*): run time so far, or in all once ended.
    """

    job_name: str
    status: JobStatus
    user_id: str | None = None
    model_id: str | None = None
    failure_reason: str | None = None
    last_step: int | None = None
    last_loss: float | None = None
    max_steps: int | None = None
    output_uri: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    seconds: float | None = None

    @property
    def done(self) -> bool:
        """Whether the job has ended."""
        return self.status.is_final

    @classmethod
    def from_record(cls, record: JobRecord) -> JobDescription:
        """The description of a stored job."""
        steps = record.hyperparameters.get("max_train_steps")
        return cls(
            job_name=record.job_name,
            status=record.status,
            user_id=record.user_id,
            model_id=record.model_id,
            failure_reason=record.failure_reason,
            last_step=record.last_step,
            last_loss=record.last_loss,
            max_steps=steps if isinstance(steps, int) else None,
            output_uri=record.output_uri,
            started_at=record.started_at,
            ended_at=record.ended_at,
            seconds=elapsed_seconds(record.started_at, record.ended_at),
        )


def elapsed_seconds(started_at: str | None, ended_at: str | None) -> float | None:
    """Seconds from `started_at` to `ended_at` (or to now), None before the start."""
    if not started_at:
        return None
    start = datetime.fromisoformat(started_at)
    end = datetime.fromisoformat(ended_at) if ended_at else datetime.now(timezone.utc)
    return round(max(0.0, (end - start).total_seconds()), 3)


class TrainingJobs(abc.ABC):
    """Training jobs of users' models. Every method takes the owner's `user_id`, so one user
    never sees or stops another's job."""

    @abc.abstractmethod
    def submit(self, request: TrainingJobRequest) -> JobDescription:
        """Start (or queue) the job of `request`.

        Raises:
            ValueError: when the request is invalid (nothing is created).
            JobExists: when a job of this name was already submitted.
        """

    @abc.abstractmethod
    def describe(self, job_name: str, user_id: str) -> JobDescription:
        """Where the job is now.

        Raises:
            NotFound: when `user_id` has no job `job_name`.
        """

    @abc.abstractmethod
    def logs(self, job_name: str, user_id: str) -> str:
        """The job's log so far (a message saying why when there is none to read)."""

    @abc.abstractmethod
    def stop(self, job_name: str, user_id: str) -> JobDescription:
        """Stop the job (a pending one never starts); an ended job is left as it is."""

    @abc.abstractmethod
    def list(self, user_id: str | None = None) -> list[JobDescription]:
        """The jobs of `user_id` (everyone's when None), oldest first."""

    @abc.abstractmethod
    def forget(self, job_name: str, user_id: str) -> None:
        """Delete what this backend keeps of the job besides the store's objects, and its
        record (its user is being deleted): a job still running is stopped first. A job that
        is gone already is fine, so a deletion interrupted halfway can run again; another
        user's job is never touched."""

    def wait(
        self,
        job_name: str,
        user_id: str,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[JobDescription], Any] | None = None,
    ) -> JobDescription:
        """Poll `describe` until the job ends; return its last description.

        Args:
            job_name (`str`), user_id (`str`): the job.
            timeout (`float`, *optional*): seconds to wait at most; None waits for ever.
            poll (`float`, defaults to 1.0): seconds between polls.
            on_progress (`Callable[[JobDescription], Any]`, *optional*): called with each
                description, e.g. to move a notebook progress bar.

        Raises:
            TimeoutError: naming the job and its status when `timeout` passes first.
        """
        if not isinstance(poll, (int, float)) or poll <= 0:
            raise ValueError(f"poll must be a positive number of seconds, got {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            description = self.describe(job_name, user_id)
            if on_progress is not None:
                on_progress(description)
            if description.done:
                return description
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_name} is still {description.status.value} after {timeout} s"
                )
            pause = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)


def require_job(metadata: MetadataStore, job_name: str, user_id: str) -> JobRecord:
    """The stored job, or `NotFound` naming it."""
    record = metadata.get_job(user_id, job_name)
    if record is None:
        raise NotFound(f"user {user_id!r} has no training job {job_name!r}")
    return record
