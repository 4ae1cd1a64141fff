"""Every name and store path of the workshop, in one place.

    s3://<bucket>/users/<user_id>/photos/                 validated photos (PNG)
    s3://<bucket>/users/<user_id>/uploads/                presigned uploads, not yet checked
    s3://<bucket>/users/<user_id>/training/<model_id>/    the photos a model trains on
    s3://<bucket>/jobs/<job_name>/output/model.tar.gz     a training job's output
    s3://<bucket>/code/<job_name>/sourcedir.tar.gz        a SageMaker job's source directory
    s3://<bucket>/base-models/<name>-<hash>/              a local base model, for SageMaker jobs
    s3://<bucket>/endpoints/<endpoint>/models/<user_id>--<model_id>.tar.gz   per-user archives
    s3://<bucket>/endpoints/<endpoint>/adapters/<user_id>--<model_id>.safetensors   LoRAs

A model's name, `<user_id>--<model_id>`, is its Triton model name, its `TargetModel` and its
adapter's name; model ids are never reused, so neither is a name.
"""

from __future__ import annotations

import hashlib
import re

from helpers.domain.records import check_id
from helpers.domain.uris import S3Uri

#: The workshop's multi-model endpoint.
ENDPOINT_NAME = "workshop-mme"
#: A user's LoRA file in the endpoint's adapter store.
ADAPTER_SUFFIX = ".safetensors"
_NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}--[a-z0-9_-]{1,64}$")


def uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def user_prefix(bucket: str, user_id: str) -> str:
    return uri(bucket, f"users/{user_id}/")


def photos_prefix(bucket: str, user_id: str) -> str:
    return uri(bucket, f"users/{user_id}/photos/")


def uploads_prefix(bucket: str, user_id: str) -> str:
    return uri(bucket, f"users/{user_id}/uploads/")


def training_photos_prefix(bucket: str, user_id: str, model_id: str) -> str:
    return uri(bucket, f"users/{user_id}/training/{model_id}/")


def jobs_output_path(bucket: str) -> str:
    return uri(bucket, "jobs/")


def job_prefix(bucket: str, job_name: str) -> str:
    """Everything a training job wrote: `s3://<bucket>/jobs/<job_name>/`."""
    return uri(bucket, f"jobs/{job_name}/")


def code_prefix(bucket: str, job_name: str) -> str:
    """A SageMaker job's code: `s3://<bucket>/code/<job_name>/`."""
    return uri(bucket, f"code/{job_name}/")


def source_dir_uri(bucket: str, job_name: str) -> str:
    """The `sourcedir.tar.gz` a SageMaker job runs (`sagemaker_submit_directory`)."""
    return code_prefix(bucket, job_name) + "sourcedir.tar.gz"


def base_models_prefix(bucket: str) -> str:
    """Where local base models are uploaded for SageMaker jobs, one folder per content."""
    return uri(bucket, "base-models/")


def job_name_for(user_id: str, model_id: str) -> str:
    """A training job name for the model: valid for SageMaker, unique per (user, model).

    User ids may hold `_`, which job names may not; the short hash keeps `a_b` and `a-b` apart.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", user_id).strip("-")[:32] or "user"
    digest = hashlib.sha256(f"{user_id}/{model_id}".encode()).hexdigest()[:8]
    model = re.sub(r"[^a-z0-9]+", "-", model_id).strip("-")[:16] or "model"
    return f"{slug}-{model}-{digest}"


def retry_job_name(job_name: str, attempt: int) -> str:
    """The job name of a model's `attempt`-th training (1 is the first: `job_name` itself)."""
    return job_name if attempt <= 1 else f"{job_name}-r{attempt}"


def endpoint_prefix(bucket: str, name: str = ENDPOINT_NAME) -> str:
    """Where an endpoint's model archives live: `s3://<bucket>/endpoints/<name>/models/`."""
    return uri(bucket, f"endpoints/{name}/models/")


def adapter_prefix(endpoint_prefix_uri: str) -> str:
    """The adapter store beside an endpoint's model prefix: `.../<endpoint>/adapters/`."""
    prefix = S3Uri.parse_prefix(str(endpoint_prefix_uri))
    parent = prefix.key.rpartition("/")[0]
    return str(S3Uri.parse_prefix(f"s3://{prefix.bucket}/{parent}").join("adapters")) + "/"


def model_name(user_id: str, model_id: str) -> str:
    """`<user_id>--<model_id>`: one name per trained model, so never reused."""
    check_id("user_id", user_id)
    check_id("model_id", model_id)
    return check_model_name(f"{user_id}--{model_id}")


def check_model_name(name: str) -> str:
    """`name` if it is a user model name (`model_name`'s form), else `ValueError`."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"model name must look like '<user_id>--<model_id>' (a-z, 0-9, '-', '_'), got {name!r}"
        )
    return name
