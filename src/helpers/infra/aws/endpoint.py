"""The multi-model endpoint on SageMaker: the Triton image in `MultiModel` mode.

One SageMaker model (`Mode="MultiModel"`, `ModelDataUrl` = the endpoint's S3 prefix), one
endpoint config (default `ml.g5.xlarge`), one endpoint. Every `<name>.tar.gz` that
`helpers.services.packaging` puts under the prefix is then a `TargetModel`, loaded by SageMaker
on first
use and evicted when the instance runs short, exactly as the local router does.

Both serving modes (`helpers.services.serving`) deploy as this same MME: in `"shared-base"` mode
the prefix holds one more archive, the shared model, which reads the users' adapters from
`s3://<bucket>/endpoints/<name>/adapters/` with the endpoint's execution role (so that role
needs `s3:GetObject` there). `deploy` records the mode in the container's environment, where
`serving(name)` reads it back for whoever routes users' requests.

The Triton image has no torch, diffusers, peft or boto3: one more archive on the prefix, the
serving runtime (`helpers.services.serving_runtime`), carries them (and the base model, if it is a
directory), and `prepare` loads it on the instance before any user's model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the CDK app imports this module for the image URI
    from helpers.domain.serving import Serving
    from helpers.domain.runtime import ServingRuntime

#: The container environment variables that record how an endpoint serves user models.
SERVING_MODE_ENV = "WORKSHOP_SERVING_MODE"
SHARED_MODEL_ENV = "WORKSHOP_SHARED_MODEL"
#: The serving runtime model (`helpers.services.serving_runtime`) that `prepare` loads.
RUNTIME_MODEL_ENV = "WORKSHOP_RUNTIME_MODEL"

#: NVIDIA Triton on SageMaker (AWS's deep learning containers, whose account depends on the
#: region: `helpers.infra.aws.images`), `{account}`, `{region}`, `{domain}` filled in by
#: `triton_image_uri`.
DEFAULT_TRITON_IMAGE = "{account}.dkr.ecr.{region}.{domain}/sagemaker-tritonserver:25.09-py3"


def triton_image_uri(region: str, image: str = DEFAULT_TRITON_IMAGE) -> str:
    """The Triton serving image in `region` (`ValueError` naming the supported regions where
    SageMaker has none)."""
    from helpers.infra.aws.images import TRITON_REGIONS, dlc_image_uri

    return dlc_image_uri(region, image, TRITON_REGIONS)


@dataclass(frozen=True)
class EndpointDescription:
    """An endpoint's state, as `describe` reads it."""

    name: str
    status: str
    failure_reason: str | None
    instance_type: str | None


class SageMakerEndpoint:
    """Deploy, describe, invoke and delete a Triton multi-model endpoint.

    Args:
        region (`str`): the AWS region.
        role_arn (`str`): the execution role SageMaker uses to read the model prefix.
        client, runtime, s3 (*optional*): boto3 `sagemaker`, `sagemaker-runtime` and `s3`
            clients.
        image_uri (`str`, *optional*): the serving image; `triton_image_uri(region)`.
    """

    def __init__(
        self,
        region: str,
        role_arn: str,
        client=None,
        runtime=None,
        image_uri: str | None = None,
        s3=None,
    ) -> None:
        import boto3

        if not role_arn or not role_arn.startswith("arn:"):
            raise ValueError(f"role_arn must be an IAM role ARN, got {role_arn!r}")
        self.region = region
        self.role_arn = role_arn
        self.client = client or boto3.client("sagemaker", region_name=region)
        self.runtime = runtime or boto3.client("sagemaker-runtime", region_name=region)
        self.s3 = s3 or boto3.client("s3", region_name=region)
        self.image_uri = image_uri or triton_image_uri(region)

    def deploy(
        self,
        name: str,
        model_prefix_uri: str,
        instance_type: str = "ml.g5.xlarge",
        instance_count: int = 1,
        serving: Serving | None = None,
        runtime: ServingRuntime | None = None,
    ) -> EndpointDescription:
        """Create the model, endpoint config and endpoint `name` serving `model_prefix_uri`.

        Args:
            serving (`Serving`, *optional*): how users' requests reach their models; per-user
                models by default. For `"shared-base"` the shared model's archive must be
                under the prefix already (`adapter_serving.package_shared_base`, with the
                adapter store's `s3://` prefix as its `adapter_source`).
            runtime (`ServingRuntime`, *optional*): the serving runtime on the prefix that
                the models were packaged with (`helpers.services.serving_runtime.package_runtime`);
                `prepare` loads it once the endpoint is in service. Without one the image
                must bring torch and diffusers itself.
        """
        from helpers.domain.serving import Serving

        serving = serving or Serving()
        if not model_prefix_uri.startswith("s3://") or not model_prefix_uri.endswith("/"):
            raise ValueError(
                f"model_prefix_uri must be an s3:// folder ending in '/', got {model_prefix_uri!r}"
            )
        if not instance_type.startswith("ml."):
            raise ValueError(f"instance_type must look like 'ml.g5.xlarge', got {instance_type!r}")
        environment = {SERVING_MODE_ENV: serving.mode}
        if serving.mode == "shared-base":
            self._check_archive(
                f"{model_prefix_uri}{serving.shared_model}.tar.gz",
                "helpers.services.serving.package_shared_base",
            )
            environment[SHARED_MODEL_ENV] = serving.shared_model
        if runtime is not None:
            self._check_archive(runtime.uri, "helpers.services.serving_runtime.package_runtime")
            environment[RUNTIME_MODEL_ENV] = runtime.target_model
        self.client.create_model(
            ModelName=name,
            ExecutionRoleArn=self.role_arn,
            PrimaryContainer={
                "Image": self.image_uri,
                "Mode": "MultiModel",
                "ModelDataUrl": model_prefix_uri,
                "Environment": environment,
            },
        )
        self.client.create_endpoint_config(
            EndpointConfigName=name,
            ProductionVariants=[
                {
                    "VariantName": "AllTraffic",
                    "ModelName": name,
                    "InstanceType": instance_type,
                    "InitialInstanceCount": instance_count,
                }
            ],
        )
        self.client.create_endpoint(EndpointName=name, EndpointConfigName=name)
        return self.describe(name)

    def _check_archive(self, uri: str, packager: str) -> None:
        from botocore.exceptions import ClientError

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ValueError(f"{uri} does not exist: package it first ({packager})") from None
            raise

    def serving(self, name: str) -> Serving:
        """How endpoint `name` serves user models, as `deploy` recorded it (per-user models
        where it recorded nothing)."""
        from helpers.domain.serving import Serving

        environment = self._environment(name)
        return Serving(
            environment.get(SERVING_MODE_ENV, "per-user"), environment.get(SHARED_MODEL_ENV)
        )

    def prepare(self, name: str) -> dict | None:
        """Load the serving runtime that `deploy` recorded for endpoint `name` (None if none):
        invoke its model once, which installs it on the instance. Return what it reports
        (its name, folder, parts and Python). Call it after `wait`, and again whenever an
        instance may be new: it costs one request where the runtime is there. SageMaker sends
        a target to an instance that has it loaded, so this reaches one instance: an endpoint
        of several instances needs an image with the packages instead."""
        from helpers.domain.runtime import read_status, status_request

        target = self._environment(name).get(RUNTIME_MODEL_ENV)
        if not target:
            return None
        body, content_type = status_request()
        answer = self.runtime.invoke_endpoint(
            EndpointName=name, TargetModel=target, ContentType=content_type, Body=body
        )
        return read_status(answer["Body"].read())

    def _environment(self, name: str) -> dict[str, str]:
        """The container environment `deploy` gave endpoint `name`'s model."""
        config_name = self.client.describe_endpoint(EndpointName=name)["EndpointConfigName"]
        config = self.client.describe_endpoint_config(EndpointConfigName=config_name)
        model = self.client.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
        return model["PrimaryContainer"].get("Environment") or {}

    def describe(self, name: str) -> EndpointDescription:
        answer = self.client.describe_endpoint(EndpointName=name)
        # The endpoint's own description has no instance type; its config does.
        config = self.client.describe_endpoint_config(
            EndpointConfigName=answer["EndpointConfigName"]
        )
        return EndpointDescription(
            name=name,
            status=answer["EndpointStatus"],
            failure_reason=answer.get("FailureReason"),
            instance_type=config["ProductionVariants"][0].get("InstanceType"),
        )

    def wait(self, name: str, timeout: float = 1800, poll: float = 30) -> EndpointDescription:
        """Poll until the endpoint is InService; raise with SageMaker's reason if it fails."""
        deadline = time.monotonic() + timeout
        while True:
            description = self.describe(name)
            if description.status == "InService":
                return description
            if description.status == "Failed":
                raise RuntimeError(f"endpoint {name} failed: {description.failure_reason}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"endpoint {name} is still {description.status} after {timeout:g} s"
                )
            time.sleep(poll)

    def invoke(self, name: str, target_model: str, prompt: str, **parameters):
        """Generate with one user's model; the images as PIL images."""
        from helpers.domain.generation import invoke_model

        return invoke_model(self.runtime, name, target_model, prompt, **parameters)

    def delete(self, name: str) -> None:
        """Delete the endpoint, its config and its model (the archives on S3 stay)."""
        self.client.delete_endpoint(EndpointName=name)
        self.client.delete_endpoint_config(EndpointConfigName=name)
        self.client.delete_model(ModelName=name)
