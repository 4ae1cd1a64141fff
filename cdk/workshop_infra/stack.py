"""The workshop's `sagemaker` backend as one deployable stack."""

from __future__ import annotations

from typing import Any

from aws_cdk import Annotations, Aws, CfnOutput, CfnParameter, Duration, Stack
from constructs import Construct

from helpers.domain.runtime import RUNTIME_ROOT
from workshop_infra.api import Api
from workshop_infra.bundling import MODEL_CODE_DIR, lambda_code
from workshop_infra.endpoint import MultiModelEndpoint, models_prefix
from workshop_infra.monitoring import MonitoredFunction, Operations
from workshop_infra.props import WorkshopProps
from workshop_infra.sagemaker_role import SageMakerExecutionRole
from workshop_infra.scaling import EndpointScaling
from workshop_infra.serving_image import ServingImage
from workshop_infra.storage import Storage
from workshop_infra.workflow import OnboardingWorkflow


class WorkshopStack(Stack):
    """Storage, the SageMaker role and endpoint, the onboarding workflow and the API.

    Args:
        scope (`Construct`): the app.
        construct_id (`str`): the stack's id.
        props (`WorkshopProps`, *optional*): the deployment's choices; the defaults otherwise.
        **kwargs: passed to `Stack` (`env`, `description`, ...).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        props: WorkshopProps | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.props = props = props or WorkshopProps()
        self.storage = Storage(self, "Storage")
        self.sagemaker_role = SageMakerExecutionRole(self, "SageMaker", self.storage)
        # The serving image is built only for an endpoint that runs it.
        self.serving_image = None
        if props.deploy_endpoint and props.endpoint_image == "workshop":
            self.serving_image = ServingImage(self, "ServingImage")
            self.sagemaker_role.allow_pull(self.serving_image.repository.repository_arn)
        if props.deploy_endpoint:
            self.endpoint = MultiModelEndpoint(
                self,
                "Endpoint",
                storage=self.storage,
                role=self.sagemaker_role.role,
                endpoint_name=props.endpoint_name,
                instance_type=props.endpoint_instance_type,
                instance_count=props.endpoint_instance_count,
                kms_key_arn=props.endpoint_kms_key_arn,
                serving_runtime=props.serving_runtime,
                image_uri=self.serving_image.image_uri if self.serving_image else None,
            )
            if self.serving_image:  # the model only once its image is pushed
                self.endpoint.model.node.add_dependency(self.serving_image.build)
        else:
            self.endpoint = None

        code = lambda_code(install=props.bundle)
        if not props.bundle:
            Annotations.of(self).add_warning_v2(
                "workshop:bundle",
                "workshop:bundle=false: the functions' bundle lacks their dependencies; "
                "synthesize with bundling before deploying",
            )
        # The settings `helpers.settings.load_settings()` reads inside both functions.
        settings = {
            "WORKSHOP_BACKEND": "sagemaker",
            "WORKSHOP_BUCKET": self.storage.bucket.bucket_name,
            "WORKSHOP_TABLE_NAME": self.storage.table.table_name,
            "WORKSHOP_REGION": Aws.REGION,
            "WORKSHOP_BASE_MODEL": props.base_model,
            "WORKSHOP_ROLE_ARN": self.sagemaker_role.role.role_arn,
            "WORKSHOP_ENDPOINT_NAME": props.endpoint_name,
            "WORKSHOP_ENDPOINT_GPU": "true" if props.endpoint_has_gpu else "false",
            "WORKSHOP_MODEL_CODE_DIR": MODEL_CODE_DIR,
        }
        if props.serving_runtime:
            settings["WORKSHOP_SERVING_RUNTIME"] = f"{RUNTIME_ROOT}/{props.serving_runtime}"
        self.workflow = OnboardingWorkflow(
            self,
            "Onboarding",
            storage=self.storage,
            code=code,
            execution_role=self.sagemaker_role.role,
            environment=settings,
            endpoint_name=props.endpoint_name,
        )
        self.api = Api(
            self,
            "Api",
            storage=self.storage,
            code=code,
            environment={
                **settings,
                "WORKSHOP_STATE_MACHINE_ARN": self.workflow.state_machine.state_machine_arn,
                "WORKSHOP_ADMIN_KEY_SHA256": self._admin_key_sha256(),
                "WORKSHOP_SERVING_MODE": props.serving_mode,
                **({"WORKSHOP_SHARED_MODEL": props.shared_model} if props.shared_model else {}),
            },
            endpoint_name=props.endpoint_name,
            shared_model=props.shared_model,
            workflow=self.workflow,
            timeout=Duration.seconds(props.api_timeout_seconds),
            memory_size=props.api_memory_mb,
            throttling_rate_limit=props.throttling_rate_limit,
            throttling_burst_limit=props.throttling_burst_limit,
        )
        self._operations()
        self._outputs()

    def _operations(self) -> None:
        """The endpoint's automatic scaling (when the stack creates the endpoint), and the
        dashboard and alarms (`workshop_infra.scaling`, `workshop_infra.monitoring`)."""
        props = self.props
        self.scaling = None
        if self.endpoint is not None:
            self.scaling = EndpointScaling(
                self,
                "EndpointScaling",
                endpoint=self.endpoint.endpoint,
                endpoint_name=props.endpoint_name,
                min_instances=props.endpoint_instance_count,
                max_instances=props.endpoint_max_instance_count,
                invocations_per_instance=props.invocations_per_instance_target,
                scale_in_cooldown_seconds=props.scale_in_cooldown_seconds,
                scale_out_cooldown_seconds=props.scale_out_cooldown_seconds,
            )
            if (
                props.endpoint_image == "triton"
                and props.endpoint_max_instance_count > props.endpoint_instance_count
            ):
                Annotations.of(self).add_warning_v2(
                    "workshop:scaling-without-image",
                    "serving_image='triton' with autoscaling: an instance that scaling adds has "
                    "no serving packages until SageMakerEndpoint.prepare() loads the serving "
                    "runtime there again; serving_image='workshop' serves from its first request",
                )
        self.operations = Operations(
            self,
            "Operations",
            endpoint_name=props.endpoint_name,
            instance_type=props.endpoint_instance_type,
            invocations_per_instance_target=props.invocations_per_instance_target,
            functions=[
                MonitoredFunction("api", self.api.handler.function),
                MonitoredFunction("packaging", self.workflow.package.function),
            ],
            state_machine=self.workflow.state_machine,
            table=self.storage.table,
            rest_api=self.api.rest_api,
            alarm_email=props.alarm_email,
        )

    def _admin_key_sha256(self) -> str:
        if self.props.admin_key_sha256 is not None:
            return self.props.admin_key_sha256
        return CfnParameter(
            self,
            "AdminKeySha256",
            type="String",
            no_echo=True,
            allowed_pattern="^[0-9a-f]{64}$",
            constraint_description="64 lowercase hex digits: the SHA-256 of the admin key",
            description="Hex SHA-256 of the operator's admin key (the key itself never leaves "
            "the operator); e.g. python -c \"import hashlib; print(hashlib.sha256(b'KEY')"
            '.hexdigest())"',
        ).value_as_string

    def _outputs(self) -> None:
        """What a notebook or client needs to use the deployment (`WORKSHOP_*` values)."""
        values = {
            "ApiUrl": self.api.rest_api.url,
            "BucketName": self.storage.bucket.bucket_name,
            "TableName": self.storage.table.table_name,
            "Region": Aws.REGION,
            "SageMakerRoleArn": self.sagemaker_role.role.role_arn,
            "StateMachineArn": self.workflow.state_machine.state_machine_arn,
            "EndpointName": self.props.endpoint_name,
            "EndpointModelsUri": self.storage.uri(models_prefix(self.props.endpoint_name)),
        }
        for name, value in values.items():
            CfnOutput(self, name, value=value)
