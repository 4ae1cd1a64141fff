"""Automatic scaling of the multi-model endpoint's instances (Application Auto Scaling).

One scalable target, the variant's `DesiredInstanceCount`, between the stack's
`endpoint_instance_count` and `endpoint_max_instance_count`, and one target-tracking policy on
the predefined metric `SageMakerVariantInvocationsPerInstance` (invocations per instance per
minute, summed over every model the endpoint serves: the metric AWS recommends for multi-model
endpoints). Why the defaults are what they are: `workshop_infra.props.WorkshopProps`.

No role in the stack: without a `RoleARN`, Application Auto Scaling uses its service-linked
role for SageMaker (`AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint`), creating it
on first use, which allows exactly the endpoint calls that scaling makes.
"""

from __future__ import annotations

from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

#: The endpoint config's one production variant (`workshop_infra.endpoint`).
VARIANT_NAME = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
PREDEFINED_METRIC = "SageMakerVariantInvocationsPerInstance"


def variant_resource_id(endpoint_name: str, variant_name: str = VARIANT_NAME) -> str:
    """Application Auto Scaling's id of an endpoint variant, `endpoint/<name>/variant/<variant>`."""
    return f"endpoint/{endpoint_name}/variant/{variant_name}"


class EndpointScaling(Construct):
    """Target tracking of invocations per instance on the endpoint's variant.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        endpoint (`sagemaker.CfnEndpoint`): the endpoint whose variant scales; it must exist
            before its scalable target is registered.
        endpoint_name (`str`): its name (a plain string: it is part of the resource id).
        min_instances (`int`): the fewest instances (the endpoint's initial count).
        max_instances (`int`): the most instances.
        invocations_per_instance (`float`): the target of invocations per instance per minute.
        scale_in_cooldown_seconds (`int`): the wait after a scale-in before the next one.
        scale_out_cooldown_seconds (`int`): the wait after a scale-out before the next one.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        endpoint: sagemaker.CfnEndpoint,
        endpoint_name: str,
        min_instances: int,
        max_instances: int,
        invocations_per_instance: float,
        scale_in_cooldown_seconds: int,
        scale_out_cooldown_seconds: int,
    ) -> None:
        super().__init__(scope, construct_id)
        if not 1 <= min_instances <= max_instances:
            raise ValueError(
                f"instances must satisfy 1 <= min_instances ({min_instances}) <= max_instances "
                f"({max_instances})"
            )
        self.target = appscaling.CfnScalableTarget(
            self,
            "Target",
            service_namespace="sagemaker",
            resource_id=variant_resource_id(endpoint_name),
            scalable_dimension=SCALABLE_DIMENSION,
            min_capacity=min_instances,
            max_capacity=max_instances,
        )
        # The resource id names the endpoint by a plain string, which makes no dependency:
        # registering a variant that does not exist yet fails.
        self.target.node.add_dependency(endpoint)
        self.policy = appscaling.CfnScalingPolicy(
            self,
            "InvocationsPerInstance",
            policy_name=f"{endpoint_name}-invocations-per-instance",
            policy_type="TargetTrackingScaling",
            scaling_target_id=self.target.ref,
            target_tracking_scaling_policy_configuration=(
                appscaling.CfnScalingPolicy.TargetTrackingScalingPolicyConfigurationProperty(
                    target_value=float(invocations_per_instance),
                    predefined_metric_specification=(
                        appscaling.CfnScalingPolicy.PredefinedMetricSpecificationProperty(
                            predefined_metric_type=PREDEFINED_METRIC
                        )
                    ),
                    scale_in_cooldown=scale_in_cooldown_seconds,
                    scale_out_cooldown=scale_out_cooldown_seconds,
                )
            ),
        )
