"""The stack's operations: the endpoint's automatic scaling, the dashboard and the alarms.

One app with four stacks, synthesized once for the module (about 25 s, `bundle=False`, with
cdk-nag): the defaults; one with every scaling prop, an alarm email and a four-GPU instance
type; one without the endpoint, on a CPU instance type; one on SageMaker's stock Triton image
with the serving runtime.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from iam_enforced import failed_nag_reports, import_infra, synthesize_with_nag

from helpers.workshop.aws_stack import node_problem

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

if (_NODE_PROBLEM := node_problem()) is not None:  # importing aws_cdk starts node
    pytest.skip(f"the CDK needs Node.js: {_NODE_PROBLEM}", allow_module_level=True)

import aws_cdk as cdk
from aws_cdk.assertions import Annotations, Match, Template

pytestmark = pytest.mark.slow

EMAIL = "ops@example.com"
RUNTIME = "runtime-0123456789ab"
#: The capacity model's assumption for one ml.g5.xlarge: SD 2.1 at 512 px, 25 steps, about
#: 2.0 s an image, so about 30 images (one-image invocations) a minute at saturation.
IMAGES_PER_MINUTE_G5_XLARGE = 30
SAGEMAKER = "AWS/SageMaker"
INSTANCES = "/aws/sagemaker/Endpoints"
ENDPOINT_METRICS = {
    "Invocations",
    "InvocationsPerInstance",
    "ModelCacheHit",
    "ModelLoadingWaitTime",
    "LoadedModelCount",
    "ModelLatency",
    "OverheadLatency",
    "Invocation5XXErrors",
    "Invocation4XXErrors",
}
INSTANCE_METRICS = {"CPUUtilization", "MemoryUtilization", "DiskUtilization"}
GPU_METRICS = {"GPUMemoryUtilization", "GPUUtilization"}
NOTIFYING_ALARMS = {
    "endpoint-5xx",
    "endpoint-4xx",
    "endpoint-cache-hit-low",
    "endpoint-model-loading-wait",
    "endpoint-overloaded",
    "api-function-errors",
    "api-function-throttles",
    "packaging-function-errors",
    "packaging-function-throttles",
    "onboarding-failed",
    "onboarding-timed-out",
    "table-throttles",
    "api-5xx",
}


@dataclass
class Synthesized:
    outdir: Path
    default: Template
    scaled: Template
    no_endpoint: Template
    stacks: list[cdk.Stack]


@pytest.fixture(scope="module")
def infra():
    return import_infra()


@pytest.fixture(scope="module")
def synthesized(infra, tmp_path_factory) -> Synthesized:
    outdir = tmp_path_factory.mktemp("cdk.out")
    app = cdk.App(outdir=str(outdir))
    stacks = [
        infra.WorkshopStack(app, "Default", props=infra.WorkshopProps(bundle=False)),
        infra.WorkshopStack(
            app,
            "Scaled",
            props=infra.WorkshopProps(
                bundle=False,
                endpoint_name="other-mme",
                endpoint_instance_type="ml.g5.12xlarge",
                endpoint_instance_count=2,
                endpoint_max_instance_count=6,
                invocations_per_instance_target=12.5,
                scale_in_cooldown_seconds=900,
                scale_out_cooldown_seconds=30,
                alarm_email=EMAIL,
            ),
        ),
        infra.WorkshopStack(
            app,
            "NoEndpoint",
            props=infra.WorkshopProps(
                bundle=False,
                deploy_endpoint=False,
                endpoint_name="later-mme",
                endpoint_instance_type="ml.c5.xlarge",
            ),
        ),
        infra.WorkshopStack(
            app, "Triton", props=infra.WorkshopProps(bundle=False, serving_runtime=RUNTIME)
        ),
    ]
    synthesize_with_nag(infra, app, outdir)
    default, scaled, no_endpoint, _ = (Template.from_stack(stack) for stack in stacks)
    return Synthesized(outdir, default, scaled, no_endpoint, stacks)


def only(template: Template, type_: str) -> tuple[str, dict]:
    found = template.find_resources(type_)
    assert len(found) == 1, f"expected one {type_}, found {list(found)}"
    return next(iter(found.items()))


def logical_id(template: Template, type_: str, **properties: Any) -> str:
    found = template.find_resources(type_, {"Properties": properties} if properties else None)
    assert len(found) == 1, f"expected one {type_} with {properties}, found {list(found)}"
    return next(iter(found))


def function_id(template: Template, handler: str) -> str:
    return logical_id(template, "AWS::Lambda::Function", Handler=handler)


def text(value: Any) -> str:
    """A CloudFormation value as text: `Fn::Join` joined, `Ref`/`Fn::GetAtt` as `<Ref:X>` and
    `<GetAtt:X.Attribute>` (no quotes, so a joined JSON document stays JSON)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(text(part) for part in parts)
    if isinstance(value, dict) and "Ref" in value:
        return f"<Ref:{value['Ref']}>"
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return f"<GetAtt:{'.'.join(value['Fn::GetAtt'])}>"
    raise AssertionError(f"unexpected intrinsic {value}")


def dashboard_metrics(template: Template) -> set[tuple[str, str, tuple]]:
    """Every metric the dashboard charts: (namespace, name, sorted dimension pairs)."""
    _, dashboard = only(template, "AWS::CloudWatch::Dashboard")
    body = json.loads(text(dashboard["Properties"]["DashboardBody"]))
    found = set()
    for widget in body["widgets"]:
        previous: list = []
        for row in widget.get("properties", {}).get("metrics", []):
            fields = [f for f in row if not isinstance(f, dict)]
            # CloudWatch's shorthand: "." repeats the field of the row above.
            fields = [previous[i] if f == "." else f for i, f in enumerate(fields)]
            previous = fields
            namespace, name, *dimensions = fields
            found.add(
                (
                    namespace,
                    name,
                    tuple(sorted(zip(dimensions[::2], dimensions[1::2], strict=True))),
                )
            )
    return found


def alarms(template: Template) -> dict[str, dict]:
    """Metric alarms by name, without the stack's prefix."""
    found = {}
    for resource in template.find_resources("AWS::CloudWatch::Alarm").values():
        properties = resource["Properties"]
        found[properties["AlarmName"].split("-", 1)[1]] = properties
    return found


def endpoint_dimensions(endpoint: str) -> list[dict]:
    return [
        {"Name": "EndpointName", "Value": endpoint},
        {"Name": "VariantName", "Value": "AllTraffic"},
    ]


# -------------------------------------------------------------------- scaling


def test_the_scalable_target_is_the_endpoint_variant_between_the_instance_counts(synthesized):
    for template, endpoint, low, high in (
        (synthesized.default, "workshop-mme", 1, 4),
        (synthesized.scaled, "other-mme", 2, 6),
    ):
        _, target = only(template, "AWS::ApplicationAutoScaling::ScalableTarget")
        assert target["Properties"] == {
            "ServiceNamespace": "sagemaker",
            "ResourceId": f"endpoint/{endpoint}/variant/AllTraffic",
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
            "MinCapacity": low,
            "MaxCapacity": high,
        }  # and no RoleARN: Application Auto Scaling's service-linked role, no role here
        # The variant must exist before it is registered.
        assert logical_id(template, "AWS::SageMaker::Endpoint") in target["DependsOn"]
        _, config = only(template, "AWS::SageMaker::EndpointConfig")
        assert config["Properties"]["ProductionVariants"][0]["VariantName"] == "AllTraffic"
        assert config["Properties"]["ProductionVariants"][0]["InitialInstanceCount"] == low


def test_the_policy_tracks_invocations_per_instance_with_the_props(synthesized):
    for template, target, scale_in, scale_out in (
        (synthesized.default, 20, 600, 60),
        (synthesized.scaled, 12.5, 900, 30),
    ):
        target_id, _ = only(template, "AWS::ApplicationAutoScaling::ScalableTarget")
        _, policy = only(template, "AWS::ApplicationAutoScaling::ScalingPolicy")
        properties = policy["Properties"]
        assert properties["PolicyType"] == "TargetTrackingScaling"
        assert properties["ScalingTargetId"] == {"Ref": target_id}
        assert properties["TargetTrackingScalingPolicyConfiguration"] == {
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            },
            "TargetValue": target,
            "ScaleInCooldown": scale_in,
            "ScaleOutCooldown": scale_out,
        }


def test_the_default_target_leaves_headroom_and_scales_in_slower_than_out(infra):
    props = infra.WorkshopProps()
    # Below an instance's throughput, with room for the model loads of cache misses.
    assert props.invocations_per_instance_target <= IMAGES_PER_MINUTE_G5_XLARGE * 0.75
    assert props.scale_in_cooldown_seconds > props.scale_out_cooldown_seconds
    assert props.endpoint_max_instance_count > props.endpoint_instance_count


def test_scaling_on_the_stock_triton_image_warns_that_new_instances_lack_the_runtime(
    synthesized,
):
    default, _, _, triton = synthesized.stacks
    warning = Match.string_like_regexp(".*an instance that scaling adds has no serving packages.*")
    assert Annotations.from_stack(triton).find_warning("*", warning)
    assert not Annotations.from_stack(default).find_warning("*", warning)


def test_no_scaling_without_the_endpoint(synthesized):
    template = synthesized.no_endpoint
    template.resource_count_is("AWS::ApplicationAutoScaling::ScalableTarget", 0)
    template.resource_count_is("AWS::ApplicationAutoScaling::ScalingPolicy", 0)


@pytest.mark.parametrize(
    ("props", "named"),
    [
        ({"endpoint_max_instance_count": 0}, "endpoint_max_instance_count"),
        ({"endpoint_max_instance_count": 101}, "endpoint_max_instance_count"),
        ({"endpoint_instance_count": 3, "endpoint_max_instance_count": 2}, "at least"),
        ({"invocations_per_instance_target": 0}, "invocations_per_instance_target"),
        ({"invocations_per_instance_target": "20"}, "invocations_per_instance_target"),
        ({"scale_in_cooldown_seconds": -1}, "scale_in_cooldown_seconds"),
        ({"scale_out_cooldown_seconds": 1.5}, "scale_out_cooldown_seconds"),
        ({"alarm_email": "ops"}, "alarm_email"),
        ({"alarm_email": "a@example.com,b@example.com"}, "alarm_email"),
    ],
)
def test_scaling_and_alarm_props_are_checked(infra, props, named):
    with pytest.raises(ValueError, match=named) as raised:
        infra.WorkshopProps(**props)
    if named == "at least":  # both props, and the values, in the message
        assert "endpoint_max_instance_count (2)" in str(raised.value)
        assert "endpoint_instance_count (3)" in str(raised.value)


def test_scaling_and_alarm_props_come_from_context_strings(infra):
    props = infra.WorkshopProps.from_context(
        {
            "workshop:endpoint_max_instance_count": "8",
            "workshop:invocations_per_instance_target": "15.5",
            "workshop:scale_in_cooldown_seconds": "1200",
            "workshop:scale_out_cooldown_seconds": "120",
            "workshop:alarm_email": EMAIL,
        }.get
    )
    assert props.endpoint_max_instance_count == 8
    assert props.invocations_per_instance_target == 15.5
    assert (props.scale_in_cooldown_seconds, props.scale_out_cooldown_seconds) == (1200, 120)
    assert props.alarm_email == EMAIL


# -------------------------------------------------------------------- dashboard


def test_the_dashboard_charts_the_endpoint_functions_workflow_table_and_api(synthesized):
    template = synthesized.default
    charted = dashboard_metrics(template)
    variant = (("EndpointName", "workshop-mme"), ("VariantName", "AllTraffic"))
    for name in ENDPOINT_METRICS:
        assert (SAGEMAKER, name, variant) in charted, name
    for name in INSTANCE_METRICS | GPU_METRICS:
        assert (INSTANCES, name, variant) in charted, name
    for handler in (
        "helpers.lambdas.api_handler.handler",
        "helpers.lambdas.workflow.package_handler",
    ):
        function = (("FunctionName", f"<Ref:{function_id(template, handler)}>"),)
        for name in ("Invocations", "Errors", "Throttles", "Duration"):
            assert ("AWS/Lambda", name, function) in charted, (handler, name)
    machine = logical_id(
        template, "AWS::StepFunctions::StateMachine", StateMachineName=Match.any_value()
    )
    for name in ("ExecutionsFailed", "ExecutionsTimedOut", "ExecutionsAborted"):
        assert ("AWS/States", name, (("StateMachineArn", f"<Ref:{machine}>"),)) in charted
    table = (("TableName", f"<Ref:{logical_id(template, 'AWS::DynamoDB::Table')}>"),)
    for name in ("ReadThrottleEvents", "WriteThrottleEvents"):
        assert ("AWS/DynamoDB", name, table) in charted, name
    assert any(m[:2] == ("AWS/ApiGateway", "5XXError") for m in charted)
    _, dashboard = only(template, "AWS::CloudWatch::Dashboard")
    assert dashboard["Properties"]["DashboardName"] == "Default-operations"


def test_an_endpoint_made_later_is_still_charted_without_gpu_metrics_on_cpu(synthesized):
    charted = dashboard_metrics(synthesized.no_endpoint)
    variant = (("EndpointName", "later-mme"), ("VariantName", "AllTraffic"))
    assert (SAGEMAKER, "ModelCacheHit", variant) in charted
    assert (INSTANCES, "CPUUtilization", variant) in charted
    assert not {name for _, name, _ in charted} & GPU_METRICS


# -------------------------------------------------------------------- alarms


@pytest.mark.parametrize(
    ("alarm", "namespace", "metric", "statistic", "threshold", "comparison", "periods"),
    [
        ("endpoint-5xx", SAGEMAKER, "Invocation5XXErrors", "Sum", 5, "GreaterThanOrEqualTo", 1),
        (
            "endpoint-4xx",
            SAGEMAKER,
            "Invocation4XXErrors",
            "Average",
            0.05,
            "GreaterThanOrEqualTo",
            2,
        ),
        ("endpoint-cache-hit-low", SAGEMAKER, "ModelCacheHit", "Average", 0.5, "LessThan", 3),
        (
            "endpoint-model-loading-wait",
            SAGEMAKER,
            "ModelLoadingWaitTime",
            "Maximum",
            20_000_000,  # microseconds: 20 s of API Gateway's 29
            "GreaterThanOrEqualTo",
            3,
        ),
        ("endpoint-overloaded", SAGEMAKER, "InvocationsPerInstance", "Sum", 30, "GreaterThan", 15),
        (
            "endpoint-gpu-memory-full",
            INSTANCES,
            "GPUMemoryUtilization",
            "Maximum",
            95,
            "GreaterThanOrEqualTo",
            1,
        ),
    ],
)
def test_each_endpoint_alarm_watches_the_endpoints_variant(
    synthesized, alarm, namespace, metric, statistic, threshold, comparison, periods
):
    properties = alarms(synthesized.default)[alarm]
    assert properties["AlarmName"] == f"Default-{alarm}"
    assert properties["Namespace"] == namespace and properties["MetricName"] == metric
    assert properties["Dimensions"] == endpoint_dimensions("workshop-mme")
    assert properties["Statistic"] == statistic
    assert properties["Threshold"] == threshold
    assert properties["ComparisonOperator"] == f"{comparison}Threshold"
    assert properties["EvaluationPeriods"] == periods
    assert properties["TreatMissingData"] == "notBreaching"  # no traffic is no trouble


def test_alarm_thresholds_follow_the_scaling_target_and_the_gpus(synthesized):
    scaled = alarms(synthesized.scaled)
    assert scaled["endpoint-overloaded"]["Threshold"] == 12.5 * 1.5
    assert scaled["endpoint-overloaded"]["Period"] == 60
    # GPU metrics reach 100 per GPU: ml.g5.12xlarge has four.
    assert scaled["endpoint-gpu-memory-full"]["Threshold"] == 95 * 4
    assert scaled["endpoint-5xx"]["Dimensions"] == endpoint_dimensions("other-mme")
    assert "endpoint-gpu-memory-full" not in alarms(synthesized.no_endpoint)
    synthesized.no_endpoint.resource_count_is("AWS::CloudWatch::CompositeAlarm", 0)


@pytest.mark.parametrize(
    ("alarm", "handler"),
    [
        ("api-function", "helpers.lambdas.api_handler.handler"),
        ("packaging-function", "helpers.lambdas.workflow.package_handler"),
    ],
)
def test_each_function_alarms_on_errors_and_throttles(synthesized, alarm, handler):
    template = synthesized.default
    found = alarms(template)
    for suffix, metric in (("errors", "Errors"), ("throttles", "Throttles")):
        properties = found[f"{alarm}-{suffix}"]
        assert (properties["Namespace"], properties["MetricName"]) == ("AWS/Lambda", metric)
        assert properties["Dimensions"] == [
            {"Name": "FunctionName", "Value": {"Ref": function_id(template, handler)}}
        ]
        assert properties["Statistic"] == "Sum" and properties["Threshold"] == 1
        assert properties["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert properties["TreatMissingData"] == "notBreaching"


def test_the_workflow_table_and_api_alarms(synthesized):
    template = synthesized.default
    found = alarms(template)
    machine = {
        "Ref": logical_id(
            template, "AWS::StepFunctions::StateMachine", StateMachineName="Default-onboarding"
        )
    }
    for alarm, metric in (
        ("onboarding-failed", "ExecutionsFailed"),
        ("onboarding-timed-out", "ExecutionsTimedOut"),
    ):
        properties = found[alarm]
        assert (properties["Namespace"], properties["MetricName"]) == ("AWS/States", metric)
        assert properties["Dimensions"] == [{"Name": "StateMachineArn", "Value": machine}]
        assert properties["Threshold"] == 1 and properties["Statistic"] == "Sum"

    throttles = found["table-throttles"]
    table = {"Ref": logical_id(template, "AWS::DynamoDB::Table")}
    queries = {query["Id"]: query for query in throttles["Metrics"]}
    assert queries["expr_1"]["Expression"] == "reads + writes"
    for query_id, metric in (("reads", "ReadThrottleEvents"), ("writes", "WriteThrottleEvents")):
        stat = queries[query_id]["MetricStat"]
        assert stat["Metric"]["MetricName"] == metric
        assert stat["Metric"]["Dimensions"] == [{"Name": "TableName", "Value": table}]
        assert stat["Stat"] == "Sum"
    assert throttles["Threshold"] == 10

    api = found["api-5xx"]
    rest_api = only(template, "AWS::ApiGateway::RestApi")[1]["Properties"]["Name"]
    assert (api["Namespace"], api["MetricName"]) == ("AWS/ApiGateway", "5XXError")
    assert api["Dimensions"] == [{"Name": "ApiName", "Value": rest_api}]
    assert api["Threshold"] == 10 and api["EvaluationPeriods"] == 2


def test_a_full_gpu_memory_notifies_only_together_with_errors(synthesized):
    template = synthesized.scaled
    ids = {
        resource["Properties"]["AlarmName"]: name
        for name, resource in template.find_resources("AWS::CloudWatch::Alarm").items()
    }
    _, composite = only(template, "AWS::CloudWatch::CompositeAlarm")
    rule = text(composite["Properties"]["AlarmRule"])
    assert rule == (
        f'(ALARM("<GetAtt:{ids["Scaled-endpoint-gpu-memory-full"]}.Arn>") AND '
        f'ALARM("<GetAtt:{ids["Scaled-endpoint-5xx"]}.Arn>"))'
    )
    assert composite["Properties"]["AlarmName"] == "Scaled-endpoint-gpu-memory-errors"
    # A full model cache is normal for a multi-model endpoint: alone it emails no one.
    assert "AlarmActions" not in alarms(template)["endpoint-gpu-memory-full"]


def test_alarms_email_only_when_an_address_is_given(synthesized):
    for template in (synthesized.default, synthesized.no_endpoint):
        assert not [a for a in alarms(template).values() if a.get("AlarmActions")]
        template.resource_count_is("AWS::SNS::Topic", 0)
        template.resource_count_is("AWS::KMS::Key", 0)

    template = synthesized.scaled
    topic_id, _ = only(template, "AWS::SNS::Topic")
    notifying = {name: a for name, a in alarms(template).items() if name in NOTIFYING_ALARMS}
    assert set(notifying) == NOTIFYING_ALARMS
    for name, alarm in notifying.items():
        assert alarm["AlarmActions"] == [{"Ref": topic_id}], name
    _, composite = only(template, "AWS::CloudWatch::CompositeAlarm")
    assert composite["Properties"]["AlarmActions"] == [{"Ref": topic_id}]
    template.has_resource_properties(
        "AWS::SNS::Subscription",
        {"Protocol": "email", "Endpoint": EMAIL, "TopicArn": {"Ref": topic_id}},
    )


def test_the_alarm_topic_is_encrypted_with_a_key_cloudwatch_may_use_and_needs_tls(synthesized):
    template = synthesized.scaled
    _, topic = only(template, "AWS::SNS::Topic")
    key_id, key = only(template, "AWS::KMS::Key")
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    assert topic["Properties"]["TopicName"] == "Scaled-alarms"
    assert key["Properties"]["EnableKeyRotation"] is True
    cloudwatch = {"Service": "cloudwatch.amazonaws.com"}
    key_statements = key["Properties"]["KeyPolicy"]["Statement"]
    [use] = [s for s in key_statements if s["Principal"] == cloudwatch]
    assert set(use["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    # Only CloudWatch acting for this stack's alarms, on either policy.
    assert text(use["Condition"]["ArnLike"]["aws:SourceArn"]).endswith(":alarm:Scaled-*")
    assert use["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    _, policy = only(template, "AWS::SNS::TopicPolicy")
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    assert any(
        s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        for s in statements
    )
    [publish] = [s for s in statements if s["Effect"] == "Allow"]
    assert publish["Principal"] == cloudwatch and publish["Action"] == "sns:Publish"
    source = text(publish["Condition"]["ArnLike"]["aws:SourceArn"])
    assert source.endswith(":alarm:Scaled-*")  # this stack's alarms only


def test_names_derive_from_the_stack_so_two_stacks_never_clash(synthesized):
    names = []
    for stack, template in zip(
        ("Default", "Scaled", "NoEndpoint"),
        (synthesized.default, synthesized.scaled, synthesized.no_endpoint),
        strict=True,
    ):
        own = [a["AlarmName"] for a in alarms(template).values()]
        own += [
            c["Properties"]["AlarmName"]
            for c in template.find_resources("AWS::CloudWatch::CompositeAlarm").values()
        ]
        assert all(name.startswith(f"{stack}-") for name in own)
        names += own
        _, dashboard = only(template, "AWS::CloudWatch::Dashboard")
        assert dashboard["Properties"]["DashboardName"] == f"{stack}-operations"
    assert len(names) == len(set(names))


def test_every_alarm_says_what_to_do(synthesized):
    for template in (synthesized.default, synthesized.scaled):
        described = [a["AlarmDescription"] for a in alarms(template).values()]
        described += [
            c["Properties"]["AlarmDescription"]
            for c in template.find_resources("AWS::CloudWatch::CompositeAlarm").values()
        ]
        for description in described:
            assert len(description.split()) >= 15, description


# -------------------------------------------------------------------- cdk-nag


def test_cdk_nag_finds_nothing_open(synthesized):
    assert failed_nag_reports(synthesized.outdir) == []
    for stack in synthesized.stacks:
        errors = Annotations.from_stack(stack).find_error(
            "*", Match.string_like_regexp("AwsSolutions-.*")
        )
        assert errors == []
