"""The multi-model endpoint on SageMaker: the Triton image in `MultiModel` mode.

One SageMaker model (`Mode="MultiModel"`, `ModelDataUrl` = the endpoint's S3 prefix), one
endpoint config (default `ml.g5.xlarge`), one endpoint. Every `<name>.tar.gz` that
`helpers.packaging` puts under the prefix is then a `TargetModel`, loaded by SageMaker on first
use and evicted when the instance runs short, exactly as the local router does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: NVIDIA Triton on SageMaker (AWS's deep learning containers, account 763104351884 in most
#: commercial regions), `{region}` filled in by `triton_image_uri`.
DEFAULT_TRITON_IMAGE = (
    "763104351884.dkr.ecr.{region}.amazonaws.com/sagemaker-tritonserver:25.09-py3"
)


def triton_image_uri(region: str, image: str = DEFAULT_TRITON_IMAGE) -> str:
    return image.format(region=region)


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
        client, runtime (*optional*): boto3 `sagemaker` and `sagemaker-runtime` clients.
        image_uri (`str`, *optional*): the serving image; `triton_image_uri(region)`.
    """

    def __init__(
        self,
        region: str,
        role_arn: str,
        client=None,
        runtime=None,
        image_uri: str | None = None,
    ) -> None:
        import boto3

        if not role_arn or not role_arn.startswith("arn:"):
            raise ValueError(f"role_arn must be an IAM role ARN, got {role_arn!r}")
        self.region = region
        self.role_arn = role_arn
        self.client = client or boto3.client("sagemaker", region_name=region)
        self.runtime = runtime or boto3.client("sagemaker-runtime", region_name=region)
        self.image_uri = image_uri or triton_image_uri(region)

    def deploy(
        self,
        name: str,
        model_prefix_uri: str,
        instance_type: str = "ml.g5.xlarge",
        instance_count: int = 1,
    ) -> EndpointDescription:
        """Create the model, endpoint config and endpoint `name` serving `model_prefix_uri`."""
        if not model_prefix_uri.startswith("s3://") or not model_prefix_uri.endswith("/"):
            raise ValueError(
                f"model_prefix_uri must be an s3:// folder ending in '/', got {model_prefix_uri!r}"
            )
        if not instance_type.startswith("ml."):
            raise ValueError(f"instance_type must look like 'ml.g5.xlarge', got {instance_type!r}")
        self.client.create_model(
            ModelName=name,
            ExecutionRoleArn=self.role_arn,
            PrimaryContainer={
                "Image": self.image_uri,
                "Mode": "MultiModel",
                "ModelDataUrl": model_prefix_uri,
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
        from helpers.mme_client import invoke_model

        return invoke_model(self.runtime, name, target_model, prompt, **parameters)

    def delete(self, name: str) -> None:
        """Delete the endpoint, its config and its model (the archives on S3 stay)."""
        self.client.delete_endpoint(EndpointName=name)
        self.client.delete_endpoint_config(EndpointConfigName=name)
        self.client.delete_model(ModelName=name)
