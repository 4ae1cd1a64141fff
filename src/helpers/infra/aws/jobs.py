"""Training jobs on Amazon SageMaker with boto3 (no SageMaker Python SDK).

`submit` packs `model_code/` into `sourcedir.tar.gz` at `s3://<bucket>/code/<job_name>/` and
calls `CreateTrainingJob` in script mode on the Hugging Face PyTorch training image: the
image's training toolkit downloads the source, and runs
`python train_dreambooth_lora.py --name value ...` with the hyperparameters (JSON-encoded
strings, as the SageMaker Python SDK sends them) and the channels as `SM_CHANNEL_*` folders:

- `instance`: the user's images (`request.instance_data_uri`);
- `base_model`: the base pipeline, when `request.base_model` is an `s3://` folder, or a local
  directory, which `submit` first uploads once to `s3://<bucket>/base-models/<dirname>-<sha256>/`
  (`helpers.infra.aws.base_model_upload`); a hub id is passed as the `pretrained_model_name_or_path`
  hyperparameter instead.

The model lands at `<output_path>/<job_name>/output/model.tar.gz`. Job state is SageMaker's;
with a metadata store each `describe` also records it there (so `list` and ownership checks
need no tags), without one a job's owner is read from its `user_id` tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import tarfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from helpers.domain.model_code import MODEL_CODE_DIR
from helpers.domain.paths import source_dir_uri
from helpers.domain.records import JobStatus, check_id, check_job_name
from helpers.infra.aws.base_model_upload import is_local_base_model, training_base_model
from helpers.ports.jobs import (
    ENTRY_POINT,
    METRIC_DEFINITIONS,
    JobDescription,
    JobExists,
    TrainingJobRequest,
    TrainingJobs,
    elapsed_seconds,
    require_job,
)
from helpers.ports.metadata import AlreadyExists, InvalidTransition, MetadataStore, NotFound
from helpers.ports.store import ArtifactStore
from helpers.settings import Settings, SettingsError

__all__ = [
    "DEFAULT_TRAINING_IMAGE",
    "LOG_GROUP",
    "SAGEMAKER_STATUS",
    "SageMakerTrainingJobs",
    "pack_source_dir",
    "training_image_uri",
]

logger = logging.getLogger(__name__)

#: The Hugging Face PyTorch training image (GPU), `{account}`, `{region}`, `{domain}` filled in
#: by `training_image_uri` (the account depends on the region: `helpers.infra.aws.images`).
DEFAULT_TRAINING_IMAGE = (
    "{account}.dkr.ecr.{region}.{domain}/"
    "huggingface-pytorch-training:2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04"
)
#: Where SageMaker sends training jobs' logs; streams are `<job_name>/algo-1-<id>`.
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
#: SageMaker's TrainingJobStatus as ours. A job being stopped still runs until it is Stopped.
SAGEMAKER_STATUS = {
    "InProgress": JobStatus.RUNNING,
    "Completed": JobStatus.COMPLETED,
    "Failed": JobStatus.FAILED,
    "Stopping": JobStatus.RUNNING,
    "Stopped": JobStatus.STOPPED,
}
#: The folder packed as the job's source directory (the script and its rules).
CODE_DIR = MODEL_CODE_DIR
_CHECKPOINTS_DIR = "/opt/ml/checkpoints"


def training_image_uri(region: str, image: str = DEFAULT_TRAINING_IMAGE) -> str:
    """The training image for `region`, from the account that serves AWS's deep learning
    containers there (`ValueError` naming the supported regions where SageMaker has none)."""
    from helpers.infra.aws.images import HUGGINGFACE_TRAINING_REGIONS, dlc_image_uri

    return dlc_image_uri(region, image, HUGGINGFACE_TRAINING_REGIONS)


def pack_source_dir(directory: str | Path = CODE_DIR) -> bytes:
    """`directory` as a gzipped tar with paths relative to it, without caches."""
    directory = Path(directory)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if path.is_dir() or "__pycache__" in relative.parts or path.suffix == ".pyc":
                continue
            archive.add(path, arcname=str(relative))
    return buffer.getvalue()


class SageMakerTrainingJobs(TrainingJobs):
    """Training jobs on SageMaker.

    Args:
        settings (`Settings`): `region`, `bucket` (source code) and `role_arn` (the execution
            role, needed by `submit`).
        store (`ArtifactStore`): S3, where the source code is uploaded and inputs are checked.
        metadata (`MetadataStore`, *optional*): where jobs are also recorded.
        client (`botocore.client.SageMaker`, *optional*): defaults to one for `settings.region`.
        instance_type (`str`, defaults to `"ml.g5.2xlarge"`): the training instance.
        max_runtime_seconds (`int`, defaults to 7200): SageMaker stops the job after this.
        use_spot (`bool`, defaults to False): managed spot training, with checkpoints in
            `<output_path>/<job_name>/checkpoints` and waiting up to twice the run time.
        image_uri (`str`, *optional*): the training image; `training_image_uri(region)`.
        logs_client (`botocore.client.CloudWatchLogs`, *optional*): for `logs`.
        code_dir (`Path`, *optional*): the source directory; `model_code/`.
        execution_role (`Callable[[], str]`, *optional*): finds the execution role when
            `settings.role_arn` is empty (SageMaker Studio's own, `resolve_execution_role`);
            called once, at the first `submit`.
    """

    def __init__(
        self,
        settings: Settings,
        store: ArtifactStore,
        metadata: MetadataStore | None = None,
        client=None,
        instance_type: str = "ml.g5.2xlarge",
        max_runtime_seconds: int = 7200,
        use_spot: bool = False,
        image_uri: str | None = None,
        logs_client=None,
        code_dir: str | Path | None = None,
        execution_role: Callable[[], str] | None = None,
    ) -> None:
        if not isinstance(instance_type, str) or not instance_type.startswith("ml."):
            raise ValueError(f"instance_type must look like 'ml.g5.2xlarge', got {instance_type!r}")
        if (
            not isinstance(max_runtime_seconds, int)
            or isinstance(max_runtime_seconds, bool)
            or not 1 <= max_runtime_seconds <= 28 * 24 * 3600
        ):
            raise ValueError(
                f"max_runtime_seconds must be 1 to 2419200 (28 days), got {max_runtime_seconds!r}"
            )
        self.settings = settings
        self.store = store
        self.metadata = metadata
        self.client = client or boto3.client("sagemaker", region_name=settings.region)
        self._logs_client = logs_client
        self.instance_type = instance_type
        self.max_runtime_seconds = max_runtime_seconds
        self.use_spot = bool(use_spot)
        self.image_uri = image_uri or training_image_uri(settings.region)
        self.code_dir = Path(code_dir) if code_dir is not None else CODE_DIR
        self.role_arn = settings.role_arn
        self._execution_role = execution_role

    def __repr__(self) -> str:
        return f"{type(self).__name__}(region={self.settings.region!r}, {self.instance_type})"

    # -- the port -------------------------------------------------------------------------

    def submit(self, request: TrainingJobRequest) -> JobDescription:
        if not isinstance(request, TrainingJobRequest):
            raise ValueError(f"request must be a TrainingJobRequest, got {type(request).__name__}")
        request.check_inputs()
        if not self.role_arn and self._execution_role is not None:
            self.role_arn = self._execution_role()
        if not self.role_arn:
            raise SettingsError(
                "WORKSHOP_ROLE_ARN: SageMaker training jobs need an execution role; set the "
                "environment variable WORKSHOP_ROLE_ARN or pass role_arn=... to load_settings()"
            )
        if not self.store.list(request.instance_data_uri):
            raise ValueError(
                f"instance_data_uri {request.instance_data_uri} holds no images: upload and "
                "validate the user's photos first"
            )
        if self._sagemaker_has(request.job_name):
            raise JobExists(_exists_message(request.job_name))
        request = self.with_training_base_model(request)
        if self.metadata is not None:
            try:
                self.metadata.put_job(request.to_record())
            except AlreadyExists:
                raise JobExists(_exists_message(request.job_name)) from None
        source_uri = source_dir_uri(self.settings.bucket, request.job_name)
        self.store.put_bytes(source_uri, pack_source_dir(self.code_dir))
        try:
            self.client.create_training_job(**self.training_job_config(request, source_uri))
        except ClientError as error:
            if _code(error) in ("ResourceInUse", "ValidationException") and "exist" in str(error):
                raise JobExists(_exists_message(request.job_name)) from None
            if self.metadata is not None:
                self._record(
                    request.user_id,
                    request.job_name,
                    status=JobStatus.FAILED,
                    failure_reason=f"CreateTrainingJob failed: {error}"[:1024],
                )
            raise
        if self.metadata is not None:
            self._record(request.user_id, request.job_name, status=JobStatus.RUNNING)
        return self.describe(request.job_name, request.user_id)

    def with_training_base_model(self, request: TrainingJobRequest) -> TrainingJobRequest:
        """`request` with a local base model directory uploaded to the store and named by its
        `s3://` folder (`base_model_upload.training_base_model`); as it is otherwise."""
        base_model = training_base_model(self.store, self.settings, request.base_model)
        if base_model == request.base_model:
            return request
        return dataclasses.replace(request, base_model=base_model)

    def training_job_config(self, request: TrainingJobRequest, source_uri: str) -> dict[str, Any]:
        """The `CreateTrainingJob` arguments of `request`, its source at `source_uri`.

        Raises:
            ValueError: `request.base_model` is a local directory, which a job cannot read
                (`with_training_base_model` uploads it first).
        """
        if is_local_base_model(request.base_model):
            raise ValueError(
                f"base_model {request.base_model!r} is a local directory, which a SageMaker job "
                "cannot read: upload it first (with_training_base_model) and pass its s3:// folder"
            )
        hyperparameters = dict(request.hyperparameters)
        channels = [_channel("instance", request.instance_data_uri)]
        if request.base_model.startswith("s3://"):
            channels.append(_channel("base_model", request.base_model))
        else:
            hyperparameters["pretrained_model_name_or_path"] = request.base_model
        hyperparameters.update(
            sagemaker_program=ENTRY_POINT,
            sagemaker_submit_directory=source_uri,
            sagemaker_region=self.settings.region,
            sagemaker_container_log_level=20,
        )
        stopping: dict[str, int] = {"MaxRuntimeInSeconds": self.max_runtime_seconds}
        config: dict[str, Any] = {
            "TrainingJobName": request.job_name,
            "AlgorithmSpecification": {
                "TrainingImage": self.image_uri,
                "TrainingInputMode": "File",
                "MetricDefinitions": [dict(metric) for metric in METRIC_DEFINITIONS],
            },
            "RoleArn": self.role_arn,
            "InputDataConfig": channels,
            "OutputDataConfig": {"S3OutputPath": request.output_path},
            "ResourceConfig": {
                "InstanceType": self.instance_type,
                "InstanceCount": 1,
                "VolumeSizeInGB": 50,
            },
            "StoppingCondition": stopping,
            "EnableManagedSpotTraining": self.use_spot,
            "Tags": [
                {"Key": "user_id", "Value": request.user_id},
                {"Key": "model_id", "Value": request.model_id},
            ],
        }
        if self.use_spot:
            # Spot capacity can take a while and can be reclaimed: wait for it, and resume
            # from checkpoints that SageMaker syncs to S3.
            stopping["MaxWaitTimeInSeconds"] = 2 * self.max_runtime_seconds
            checkpoints = f"{request.output_path.rstrip('/')}/{request.job_name}/checkpoints"
            config["CheckpointConfig"] = {"S3Uri": checkpoints, "LocalPath": _CHECKPOINTS_DIR}
            hyperparameters.setdefault("checkpointing_steps", 100)
            hyperparameters.update(
                checkpoints_dir=_CHECKPOINTS_DIR, resume_from_checkpoint="latest"
            )
        # Every value as a JSON string, as the SageMaker Python SDK sends them; the toolkit
        # decodes each (falling back to the raw string) before building `--name value`.
        config["HyperParameters"] = {
            name: json.dumps(value) for name, value in hyperparameters.items()
        }
        return config

    def describe(self, job_name: str, user_id: str) -> JobDescription:
        check_job_name(job_name)
        check_id("user_id", user_id)
        record = require_job(self.metadata, job_name, user_id) if self.metadata else None
        try:
            job = self.client.describe_training_job(TrainingJobName=job_name)
        except ClientError as error:
            if _code(error) == "ValidationException" and record is None:
                raise NotFound(f"user {user_id!r} has no training job {job_name!r}") from None
            if _code(error) == "ValidationException" and record.status.is_final:
                # SageMaker never had it (CreateTrainingJob failed): what we stored is all.
                return JobDescription.from_record(record)
            raise
        if record is None:
            self._check_owner(job["TrainingJobArn"], job_name, user_id)
        description = describe_response(job, user_id, record.model_id if record else None)
        if record is not None and (
            record.status != description.status
            or (record.last_step, record.last_loss)
            != (description.last_step, description.last_loss)
        ):
            changes = {
                "status": description.status,
                "started_at": description.started_at,
                "ended_at": description.ended_at,
                "failure_reason": description.failure_reason,
                "last_step": description.last_step,
                "last_loss": description.last_loss,
                "output_uri": description.output_uri,
            }
            self._record(user_id, job_name, **{k: v for k, v in changes.items() if v is not None})
        return description

    def logs(self, job_name: str, user_id: str) -> str:
        self.describe(job_name, user_id)  # checks the owner
        client = self._logs_client or boto3.client("logs", region_name=self.settings.region)
        try:
            streams = client.describe_log_streams(
                logGroupName=LOG_GROUP, logStreamNamePrefix=f"{job_name}/"
            ).get("logStreams", [])
            lines = []
            for stream in streams:
                token = None
                while True:
                    arguments = {"nextToken": token} if token else {}
                    page = client.get_log_events(
                        logGroupName=LOG_GROUP,
                        logStreamName=stream["logStreamName"],
                        startFromHead=True,
                        **arguments,
                    )
                    lines += [event["message"] for event in page.get("events", [])]
                    if page.get("nextForwardToken") in (None, token):
                        break
                    token = page["nextForwardToken"]
        except ClientError as error:
            return (
                f"no logs of job {job_name} in CloudWatch ({LOG_GROUP}): {_code(error)}; "
                "a job writes them once its instance has started"
            )
        if not lines:
            return f"no logs of job {job_name} in CloudWatch ({LOG_GROUP}) yet"
        return "\n".join(lines)

    def stop(self, job_name: str, user_id: str) -> JobDescription:
        description = self.describe(job_name, user_id)
        if description.done:
            return description
        self.client.stop_training_job(TrainingJobName=job_name)
        return self.describe(job_name, user_id)

    def list(self, user_id: str | None = None) -> list[JobDescription]:
        if self.metadata is not None:
            result = []
            for job in self.metadata.list_jobs(user_id):
                if job.status.is_final:
                    result.append(JobDescription.from_record(job))
                else:
                    result.append(self.describe(job.job_name, job.user_id))
            return result
        result = []
        paginator = self.client.get_paginator("list_training_jobs")
        for page in paginator.paginate(SortBy="CreationTime", SortOrder="Ascending"):
            for summary in page.get("TrainingJobSummaries", []):
                tags = self._tags(summary["TrainingJobArn"])
                if user_id is not None and tags.get("user_id") != user_id:
                    continue
                job = self.client.describe_training_job(TrainingJobName=summary["TrainingJobName"])
                result.append(describe_response(job, tags.get("user_id"), tags.get("model_id")))
        return result

    def forget(self, job_name: str, user_id: str) -> None:
        """Stop the job if it runs and delete its record. SageMaker has no API that deletes a
        job's description; it keeps it, and the name is never reused (user ids are retired)."""
        record = self.metadata.get_job(user_id, job_name) if self.metadata is not None else None
        if record is None:
            return
        if not record.status.is_final:
            with contextlib.suppress(NotFound):
                self.stop(job_name, user_id)
        self.metadata.delete_job(user_id, job_name)

    # -- helpers --------------------------------------------------------------------------

    def _sagemaker_has(self, job_name: str) -> bool:
        try:
            self.client.describe_training_job(TrainingJobName=job_name)
        except ClientError as error:
            if _code(error) == "ValidationException":
                return False
            raise
        return True

    def _check_owner(self, arn: str, job_name: str, user_id: str) -> None:
        if self._tags(arn).get("user_id") != user_id:
            raise NotFound(f"user {user_id!r} has no training job {job_name!r}")

    def _tags(self, arn: str) -> dict[str, str]:
        response = self.client.list_tags(ResourceArn=arn)
        return {tag["Key"]: tag["Value"] for tag in response.get("Tags", [])}

    def _record(self, user_id: str, job_name: str, **changes: Any) -> None:
        try:
            self.metadata.update_job(user_id, job_name, **changes)
        except InvalidTransition:
            logger.warning("job %s/%s: ignored a late status change %s", user_id, job_name, changes)


def describe_response(
    job: dict[str, Any], user_id: str | None = None, model_id: str | None = None
) -> JobDescription:
    """Our description of a `DescribeTrainingJob` response."""
    status = SAGEMAKER_STATUS.get(job["TrainingJobStatus"], JobStatus.RUNNING)
    metrics = {m["MetricName"]: m["Value"] for m in job.get("FinalMetricDataList", [])}
    step = metrics.get("train:step")
    started_at = _iso(job.get("TrainingStartTime"))
    ended_at = _iso(job.get("TrainingEndTime")) if status.is_final else None
    return JobDescription(
        job_name=job["TrainingJobName"],
        status=status,
        user_id=user_id,
        model_id=model_id,
        failure_reason=job.get("FailureReason") if status == JobStatus.FAILED else None,
        last_step=int(step) if step is not None else None,
        last_loss=float(metrics["train:loss"]) if "train:loss" in metrics else None,
        max_steps=_max_steps(job.get("HyperParameters", {})),
        output_uri=job.get("ModelArtifacts", {}).get("S3ModelArtifacts"),
        started_at=started_at,
        ended_at=ended_at,
        seconds=(
            float(job["TrainingTimeInSeconds"])
            if job.get("TrainingTimeInSeconds") is not None
            else elapsed_seconds(started_at, ended_at)
        ),
    )


def _max_steps(hyperparameters: dict[str, str]) -> int | None:
    try:
        value = json.loads(hyperparameters.get("max_train_steps", "null"))
    except ValueError:
        return None
    return value if isinstance(value, int) else None


def _iso(value: Any) -> str | None:
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": uri,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        "InputMode": "File",
    }


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _exists_message(job_name: str) -> str:
    return f"a training job named {job_name!r} already exists: job names are never reused"
