"""The multi-model endpoint: Triton on SageMaker serving every user's model from one prefix.

One SageMaker model in `MultiModel` mode whose `ModelDataUrl` is the prefix where the packaging
step puts `<user>--<model_id>.tar.gz`; each archive is a `TargetModel`, loaded on first use and
evicted under memory pressure. The same resources `helpers.infra.aws.endpoint` creates
with boto3, here as CloudFormation.
"""

from __future__ import annotations

from aws_cdk import Aws
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from helpers.infra.aws.endpoint import RUNTIME_MODEL_ENV, triton_image_uri
from workshop_infra.storage import ENDPOINTS_PREFIX, Storage


def models_prefix(endpoint_name: str) -> str:
    """The key prefix of the endpoint's models in the bucket, `endpoints/<name>/models/`."""
    return f"{ENDPOINTS_PREFIX}{endpoint_name}/models/"


def adapters_prefix(endpoint_name: str) -> str:
    """The key prefix of the users' adapters for the shared-base mode, beside the models."""
    return f"{ENDPOINTS_PREFIX}{endpoint_name}/adapters/"


class MultiModelEndpoint(Construct):
    """The Triton multi-model endpoint (model, endpoint config and endpoint).

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        storage (`Storage`): the bucket that holds the models.
        role (`iam.IRole`): the SageMaker execution role (reads the models, pulls the image).
        endpoint_name (`str`): the endpoint's name, which the API invokes.
        instance_type (`str`): the serving instance, e.g. `"ml.g5.xlarge"`.
        instance_count (`int`, defaults to 1): instances behind the endpoint.
        kms_key_arn (`str`, *optional*): a KMS key for the instances' storage volume (instance
            types with local NVMe storage, such as ml.g5, do not accept one).
        serving_runtime (`str`, *optional*): the serving runtime model's name, recorded in the
            container's environment for `SageMakerEndpoint.prepare`.
        image_uri (`str`, *optional*): the container's image, e.g. the workshop's serving image
            (`serving_image.ServingImage.image_uri`), which has the serving packages and takes
            no serving runtime; SageMaker's Triton image of the region when None.

    Raises:
        ValueError: when both `image_uri` and `serving_runtime` are given.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        storage: Storage,
        role: iam.IRole,
        endpoint_name: str,
        instance_type: str,
        instance_count: int = 1,
        kms_key_arn: str | None = None,
        serving_runtime: str | None = None,
        image_uri: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        if image_uri is not None and serving_runtime is not None:
            raise ValueError(
                "image_uri and serving_runtime exclude each other: a serving runtime brings the "
                "packages to SageMaker's Triton image, which image_uri replaces"
            )
        self.model_data_url = storage.uri(models_prefix(endpoint_name))
        self.model = sagemaker.CfnModel(
            self,
            "Model",
            execution_role_arn=role.role_arn,
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                image=image_uri or triton_image_uri(Aws.REGION),
                mode="MultiModel",
                model_data_url=self.model_data_url,
                environment={RUNTIME_MODEL_ENV: f"{serving_runtime}.tar.gz"}
                if serving_runtime
                else None,
            ),
        )
        # SageMaker checks the role's permissions when it creates the model.
        self.model.node.add_dependency(role)
        self.config = sagemaker.CfnEndpointConfig(
            self,
            "Config",
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name="AllTraffic",
                    model_name=self.model.attr_model_name,
                    initial_instance_count=instance_count,
                    instance_type=instance_type,
                    initial_variant_weight=1.0,
                )
            ],
            kms_key_id=kms_key_arn,
        )
        self.endpoint = sagemaker.CfnEndpoint(
            self,
            "Endpoint",
            endpoint_name=endpoint_name,
            endpoint_config_name=self.config.attr_endpoint_config_name,
        )
