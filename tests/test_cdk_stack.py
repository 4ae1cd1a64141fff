"""The AWS stack of the `sagemaker` backend (`cdk/`): what it deploys, and cdk-nag's verdict.

One app with two stacks, synthesized once for the module (about 10 s): the defaults, and one
with other props. The functions' bundle skips pip (`bundle=False`) so that synthesis runs
offline and fast.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from iam_enforced import (
    CDK_DIR,
    failed_nag_reports,
    import_infra,
    onboarding_machine_id,
    synthesize_with_nag,
)

from helpers.workshop.aws_stack import node_problem

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

if (_NODE_PROBLEM := node_problem()) is not None:  # importing aws_cdk starts node
    pytest.skip(f"the CDK needs Node.js: {_NODE_PROBLEM}", allow_module_level=True)

import aws_cdk as cdk
from aws_cdk.assertions import Annotations, Match, Template

pytestmark = pytest.mark.slow

ADMIN_KEY_SHA256 = "ab" * 32
SHARED_MODEL = "shared-base-0123456789ab"
RUNTIME = "runtime-0123456789ab"
TASK_STATES = ["MarkTraining", "Train", "MarkPackaging", "Package", "MarkAvailable"]
#: The cdk-nag rules this app acknowledges; a new one needs a look (and a README entry).
ACKNOWLEDGED_RULES = {
    "AwsSolutions-APIG2",
    "AwsSolutions-APIG3",
    "AwsSolutions-APIG4",
    "AwsSolutions-CB3",
    "AwsSolutions-COG4",
    "AwsSolutions-IAM4",
    "AwsSolutions-IAM5",
    "AwsSolutions-L1",
    "AwsSolutions-SF2",
}


@pytest.fixture(scope="module")
def infra():
    """The `workshop_infra` package of `cdk/` (not installed: the CDK app is not a library)."""
    return import_infra()


@dataclass
class Synthesized:
    outdir: Path
    default: Template
    custom: Template
    default_stack: cdk.Stack


@pytest.fixture(scope="module")
def synthesized(infra, tmp_path_factory) -> Synthesized:
    outdir = tmp_path_factory.mktemp("cdk.out")
    app = cdk.App(outdir=str(outdir))
    default = infra.WorkshopStack(app, "Default", props=infra.WorkshopProps(bundle=False))
    custom = infra.WorkshopStack(
        app,
        "Custom",
        props=infra.WorkshopProps(
            bundle=False,
            base_model="org/tiny-sd",
            deploy_endpoint=False,
            endpoint_name="other-mme",
            endpoint_instance_type="ml.c5.xlarge",
            api_timeout_seconds=29,
            api_memory_mb=2048,
            throttling_rate_limit=5,
            throttling_burst_limit=7,
            admin_key_sha256=ADMIN_KEY_SHA256,
            shared_model=SHARED_MODEL,
            serving_runtime=RUNTIME,
        ),
    )
    synthesize_with_nag(infra, app, outdir)
    return Synthesized(outdir, Template.from_stack(default), Template.from_stack(custom), default)


def resources(template: Template, type_: str) -> dict[str, dict]:
    return template.find_resources(type_)


def sagemaker_role_id(template: Template) -> str:
    """The SageMaker execution role (the role SageMaker assumes)."""
    return logical_id(
        template,
        "AWS::IAM::Role",
        AssumeRolePolicyDocument=Match.object_like(
            {
                "Statement": [
                    Match.object_like({"Principal": {"Service": "sagemaker.amazonaws.com"}})
                ]
            }
        ),
    )


def artifact_bucket_id(template: Template) -> str:
    """The artifact bucket (the one whose access is logged)."""
    return logical_id(template, "AWS::S3::Bucket", LoggingConfiguration=Match.any_value())


def only(template: Template, type_: str) -> dict:
    found = list(resources(template, type_).values())
    assert len(found) == 1, f"expected one {type_}, found {len(found)}"
    return found[0]


def logical_id(template: Template, type_: str, **properties: Any) -> str:
    found = template.find_resources(type_, {"Properties": properties} if properties else None)
    assert len(found) == 1, f"expected one {type_} with {properties}, found {list(found)}"
    return next(iter(found))


def function(template: Template, handler: str) -> tuple[str, dict]:
    found = template.find_resources("AWS::Lambda::Function", {"Properties": {"Handler": handler}})
    assert len(found) == 1, f"expected one function with handler {handler}"
    return next(iter(found.items()))


def flatten(value: Any) -> str:
    """A CloudFormation value as text: an `Fn::Join` joined, other intrinsics as `<...>`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(flatten(part) for part in parts)
    if value == {"Ref": "AWS::Partition"}:
        return "aws"
    return "<" + json.dumps(value, sort_keys=True).replace('"', "'") + ">"


def onboarding_machine(template: Template) -> dict:
    """The onboarding state machine (not the serving image build's waiter)."""
    return template.to_json()["Resources"][onboarding_machine_id(template.to_json())]


def definition(template: Template) -> dict:
    machine = onboarding_machine(template)
    return json.loads(flatten(machine["Properties"]["DefinitionString"]))


def statements(template: Template) -> list[tuple[str, dict]]:
    """Every IAM policy statement of the template, with the logical id it belongs to."""
    found = []
    for name, policy in resources(template, "AWS::IAM::Policy").items():
        found += [(name, s) for s in policy["Properties"]["PolicyDocument"]["Statement"]]
    for name, policy in resources(template, "AWS::IAM::ManagedPolicy").items():
        found += [(name, s) for s in policy["Properties"]["PolicyDocument"]["Statement"]]
    for name, role in resources(template, "AWS::IAM::Role").items():
        for inline in role["Properties"].get("Policies", []):
            found += [(name, s) for s in inline["PolicyDocument"]["Statement"]]
    return found


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def role_statements(template: Template, role_id: str) -> list[dict]:
    """The statements of the policies attached to the role `role_id`."""
    found = []
    for policy in resources(template, "AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            found += policy["Properties"]["PolicyDocument"]["Statement"]
    return found


def allowed(statements_: list[dict], action: str) -> list[str]:
    """The resources (as text) on which `statements_` allow `action`."""
    return [
        flatten(resource)
        for s in statements_
        if s["Effect"] == "Allow" and action in as_list(s["Action"])
        for resource in as_list(s["Resource"])
    ]


def role_of(template: Template, function_id: str) -> str:
    role = template.to_json()["Resources"][function_id]["Properties"]["Role"]
    return role["Fn::GetAtt"][0]


# -------------------------------------------------------------------- storage


def test_buckets_are_encrypted_private_ssl_only_and_the_artifacts_logged(synthesized):
    template = synthesized.default
    template.resource_count_is("AWS::S3::Bucket", 2)
    for bucket in resources(template, "AWS::S3::Bucket").values():
        properties = bucket["Properties"]
        encryption = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert encryption[0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in (
            "AES256",
            "aws:kms",
        )
        assert properties["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        assert bucket["DeletionPolicy"] == "Retain"
    logs_bucket = logical_id(template, "AWS::S3::Bucket", LoggingConfiguration=Match.absent())
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {"LoggingConfiguration": {"DestinationBucketName": {"Ref": logs_bucket}}},
    )
    policies = resources(template, "AWS::S3::BucketPolicy").values()
    assert len(policies) == 2
    for policy in policies:
        assert any(
            s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
            for s in policy["Properties"]["PolicyDocument"]["Statement"]
        ), "every bucket must refuse requests without TLS"


def test_the_table_has_the_records_keys_and_point_in_time_recovery(synthesized):
    table = only(synthesized.default, "AWS::DynamoDB::Table")
    assert table["Properties"]["KeySchema"] == [
        {"AttributeName": "user_id", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert sorted(
        (a["AttributeName"], a["AttributeType"])
        for a in table["Properties"]["AttributeDefinitions"]
    ) == [("sk", "S"), ("user_id", "S")]
    assert table["Properties"]["BillingMode"] == "PAY_PER_REQUEST"
    assert table["Properties"]["PointInTimeRecoverySpecification"] == {
        "PointInTimeRecoveryEnabled": True
    }
    assert table["DeletionPolicy"] == "Retain"
    # The API's quota counters share the table and expire by themselves.
    assert table["Properties"]["TimeToLiveSpecification"] == {
        "AttributeName": "expires_at",
        "Enabled": True,
    }


# -------------------------------------------------------------------- the API


def test_the_api_function_runs_the_app_with_the_workshop_settings(synthesized):
    template = synthesized.default
    bucket = artifact_bucket_id(template)
    table = logical_id(template, "AWS::DynamoDB::Table")
    machine = onboarding_machine_id(template.to_json())
    role = sagemaker_role_id(template)
    _, api = function(template, "helpers.lambdas.api_handler.handler")
    properties = api["Properties"]
    assert properties["Runtime"] == "python3.12"
    assert properties["Timeout"] == 60 and properties["MemorySize"] == 1024
    assert properties["Environment"]["Variables"] == {
        "WORKSHOP_BACKEND": "sagemaker",
        "WORKSHOP_BUCKET": {"Ref": bucket},
        "WORKSHOP_TABLE_NAME": {"Ref": table},
        "WORKSHOP_REGION": {"Ref": "AWS::Region"},
        "WORKSHOP_BASE_MODEL": "stabilityai/stable-diffusion-2-1-base",
        "WORKSHOP_ROLE_ARN": {"Fn::GetAtt": [role, "Arn"]},
        "WORKSHOP_ENDPOINT_NAME": "workshop-mme",
        "WORKSHOP_ENDPOINT_GPU": "true",
        "WORKSHOP_MODEL_CODE_DIR": "/var/task/model_code",
        "WORKSHOP_STATE_MACHINE_ARN": {"Ref": machine},
        "WORKSHOP_ADMIN_KEY_SHA256": {"Ref": "AdminKeySha256"},
        "WORKSHOP_SERVING_MODE": "per-user",
    }
    parameter = synthesized.default.to_json()["Parameters"]["AdminKeySha256"]
    assert parameter["NoEcho"] is True
    assert parameter["AllowedPattern"] == "^[0-9a-f]{64}$"


def test_props_reach_the_functions(synthesized):
    template = synthesized.custom
    _, api = function(template, "helpers.lambdas.api_handler.handler")
    variables = api["Properties"]["Environment"]["Variables"]
    assert variables["WORKSHOP_ADMIN_KEY_SHA256"] == ADMIN_KEY_SHA256
    assert variables["WORKSHOP_BASE_MODEL"] == "org/tiny-sd"
    assert variables["WORKSHOP_ENDPOINT_NAME"] == "other-mme"
    assert api["Properties"]["Timeout"] == 29 and api["Properties"]["MemorySize"] == 2048
    assert "AdminKeySha256" not in template.to_json().get("Parameters", {})
    _, package = function(template, "helpers.lambdas.workflow.package_handler")
    packaging = package["Properties"]["Environment"]["Variables"]
    # A CPU endpoint gets KIND_CPU Triton instances.
    assert packaging["WORKSHOP_ENDPOINT_GPU"] == "false"
    # Every user's model is packaged to use the serving runtime's packages.
    assert packaging["WORKSHOP_SERVING_RUNTIME"] == f"/tmp/workshop-runtime/{RUNTIME}"
    _, default = function(synthesized.default, "helpers.lambdas.workflow.package_handler")
    assert "WORKSHOP_SERVING_RUNTIME" not in default["Properties"]["Environment"]["Variables"]


def test_a_shared_model_serves_every_user_through_the_shared_base(synthesized):
    template = synthesized.custom
    api_id, api = function(template, "helpers.lambdas.api_handler.handler")
    variables = api["Properties"]["Environment"]["Variables"]
    assert variables["WORKSHOP_SERVING_MODE"] == "shared-base"
    assert variables["WORKSHOP_SHARED_MODEL"] == SHARED_MODEL
    granted = role_statements(template, role_of(template, api_id))
    [invoke] = [s for s in granted if "sagemaker:InvokeEndpoint" in as_list(s["Action"])]
    targets = invoke["Condition"]["StringLike"]["sagemaker:TargetModel"]
    assert targets == ["*--*.tar.gz", f"{SHARED_MODEL}.tar.gz"]  # and no other shared model


def test_the_rest_api_proxies_every_route_to_the_function(synthesized):
    template = synthesized.default
    api_id, _ = function(template, "helpers.lambdas.api_handler.handler")
    methods = resources(template, "AWS::ApiGateway::Method").values()
    # ANY / and ANY /{proxy+}, and GET /health on a resource of its own (for its throttle).
    assert sorted(m["Properties"]["HttpMethod"] for m in methods) == ["ANY", "ANY", "GET"]
    for method in methods:
        integration = method["Properties"]["Integration"]
        assert integration["Type"] == "AWS_PROXY"
        assert f"'{api_id}'" in flatten(integration["Uri"])
    template.has_resource_properties("AWS::ApiGateway::Resource", {"PathPart": "health"})
    template.has_resource_properties("AWS::ApiGateway::RestApi", {"BinaryMediaTypes": ["*/*"]})


def test_the_stage_throttles_logs_access_and_never_logs_bodies(synthesized):
    for template, rate, burst in ((synthesized.default, 10, 20), (synthesized.custom, 5, 7)):
        stage = only(template, "AWS::ApiGateway::Stage")["Properties"]
        settings = {(s["ResourcePath"], s["HttpMethod"]): s for s in stage["MethodSettings"]}
        assert sorted(settings) == [("/*", "*"), ("/~1health", "GET")]
        every = settings[("/*", "*")]
        assert every["ThrottlingRateLimit"] == rate
        assert every["ThrottlingBurstLimit"] == burst
        assert every["DataTraceEnabled"] is False
        assert every["LoggingLevel"] == "ERROR"
        # Anonymous health checks have their own, lower throttle: they cannot use up the
        # tenants' requests.
        health = settings[("/~1health", "GET")]
        assert health["ThrottlingRateLimit"] == 1 and health["ThrottlingBurstLimit"] == 2
        assert health["ThrottlingRateLimit"] < rate and health["ThrottlingBurstLimit"] < burst
        assert stage["TracingEnabled"] is True
        assert stage["StageName"] == "prod"  # URLs read <api>/prod/v1/..., not /v1/v1/
        destination = stage["AccessLogSetting"]["DestinationArn"]["Fn::GetAtt"][0]
        assert template.to_json()["Resources"][destination]["Type"] == "AWS::Logs::LogGroup"
        assert "$context.status" in stage["AccessLogSetting"]["Format"]


# -------------------------------------------------------------------- the workflow


def test_the_workflow_trains_packages_and_marks_the_model(synthesized):
    states = definition(synthesized.default)["States"]
    assert definition(synthesized.default)["QueryLanguage"] == "JSONata"
    assert definition(synthesized.default)["StartAt"] == "MarkTraining"
    # Longer than a training job may run and wait (2 h, spot 4 h): a stuck execution ends and
    # the onboarding-timed-out alarm sees it.
    assert definition(synthesized.default)["TimeoutSeconds"] == 6 * 3600
    for state, following in zip(TASK_STATES, [*TASK_STATES[1:], None], strict=True):
        assert states[state]["Type"] == "Task"
        assert states[state].get("Next") == following, state
    assert states["MarkAvailable"]["End"] is True
    assert not [name for name, state in states.items() if state["Type"] == "Wait"]

    train = states["Train"]
    assert train["Resource"] == "arn:aws:states:::sagemaker:createTrainingJob.sync"
    # The whole CreateTrainingJob request of the execution's input, as the API built it.
    assert train["Arguments"] == "{% $states.context.Execution.Input.training_job %}"
    package = states["Package"]
    assert package["Resource"] == "arn:aws:states:::lambda:invoke"
    assert package["Arguments"]["Payload"] == {
        "user_id": "{% $states.context.Execution.Input.user_id %}",
        "model_id": "{% $states.context.Execution.Input.model_id %}",
        "training_output_uri": "{% $states.context.Execution.Input.training_output_uri %}",
    }


@pytest.mark.parametrize(
    ("state", "status", "sources", "attributes"),
    [
        ("MarkTraining", "TRAINING", {"REQUESTED", "TRAINING"}, {"training_job_name"}),
        ("MarkPackaging", "PACKAGING", {"TRAINING", "PACKAGING"}, set()),
        (
            "MarkAvailable",
            "AVAILABLE",
            {"PACKAGING", "AVAILABLE"},
            {"endpoint_model_name", "model_artifact_uri"},
        ),
        (
            "MarkFailed",
            "FAILED",
            {"REQUESTED", "TRAINING", "PACKAGING", "FAILED"},
            {"failure_reason"},
        ),
    ],
)
def test_each_mark_state_moves_the_model_item_as_the_records_allow(
    synthesized, state, status, sources, attributes
):
    table = logical_id(synthesized.default, "AWS::DynamoDB::Table")
    mark = definition(synthesized.default)["States"][state]
    arguments = mark["Arguments"]
    assert mark["Resource"] == "arn:aws:states:::dynamodb:updateItem"
    assert arguments["TableName"] == f"<{{'Ref': '{table}'}}>"
    assert arguments["Key"] == {
        "user_id": {"S": "{% $states.context.Execution.Input.user_id %}"},
        "sk": {"S": "{% 'MODEL#' & $states.context.Execution.Input.model_id %}"},
    }
    values = arguments["ExpressionAttributeValues"]
    names = arguments["ExpressionAttributeNames"]
    assert values[":status"] == {"S": status}
    update = arguments["UpdateExpression"]
    assert update.startswith("SET #status = :status, #updated_at = :now")
    assert update.endswith("ADD #version :one") and values[":one"] == {"N": "1"}
    assert {names[f"#{a}"] for a in attributes} == attributes
    assert all(f"#{a} = :{a}" in update for a in attributes)
    condition = arguments["ConditionExpression"]
    assert condition.startswith("attribute_exists(sk) AND #status IN (")
    assert {values[v]["S"] for v in values if v.startswith(":from")} == sources


def test_every_task_fails_the_model_with_a_reason(synthesized):
    states = definition(synthesized.default)["States"]
    for state in TASK_STATES:
        catches = states[state]["Catch"]
        assert len(catches) == 1, state
        assert catches[0]["ErrorEquals"] == ["States.ALL"]
        assert catches[0]["Next"] == "MarkFailed"
        detail = catches[0]["Assign"]["failure_detail"]  # for operators, in the Fail's cause
        assert "$states.errorOutput.Error" in detail and "$substring(" in detail
        reason = catches[0]["Assign"]["failure_reason"]  # for the user: no error text
        assert "errorOutput" not in reason and "$states.context.Execution.Name" in reason
    failed = states["MarkFailed"]
    assert failed["Arguments"]["ExpressionAttributeValues"][":failure_reason"] == {
        "S": "{% $failure_reason %}"
    }
    assert failed["Next"] == "Failed" and "Catch" not in failed
    assert states["Failed"]["Type"] == "Fail"
    assert states["Failed"]["Cause"] == "{% $failure_detail %}"


def test_the_state_machine_logs_everything_and_traces(synthesized):
    machine = onboarding_machine(synthesized.default)["Properties"]
    assert machine["LoggingConfiguration"]["Level"] == "ALL"
    assert machine["LoggingConfiguration"]["IncludeExecutionData"] is True
    assert machine["TracingConfiguration"] == {"Enabled": True}


# -------------------------------------------------------------------- IAM


def test_no_statement_allows_a_wildcard_action(synthesized):
    for template in (synthesized.default, synthesized.custom):
        for owner, statement in statements(template):
            if statement["Effect"] != "Allow":
                continue
            wildcards = [a for a in as_list(statement["Action"]) if "*" in a]
            assert not wildcards, f"{owner} allows {wildcards}"


def test_no_full_access_managed_policy(synthesized):
    for template in (synthesized.default, synthesized.custom):
        for name, role in resources(template, "AWS::IAM::Role").items():
            for arn in role["Properties"].get("ManagedPolicyArns", []):
                assert "FullAccess" not in flatten(arn), f"{name} has {flatten(arn)}"


def test_only_the_state_machine_passes_the_sagemaker_role_and_only_to_sagemaker(synthesized):
    template = synthesized.default
    sagemaker_role = sagemaker_role_id(template)
    passes = [(o, s) for o, s in statements(template) if "iam:PassRole" in as_list(s["Action"])]
    assert len(passes) == 1
    owner, statement = passes[0]
    assert owner.startswith("OnboardingStateMachineRole")
    assert statement["Resource"] == {"Fn::GetAtt": [sagemaker_role, "Arn"]}
    assert statement["Condition"] == {
        "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}
    }


def test_the_state_machine_may_run_training_jobs_through_the_sync_rule(synthesized):
    template = synthesized.default
    machine = onboarding_machine(template)["Properties"]
    role = machine["RoleArn"]["Fn::GetAtt"][0]
    granted = role_statements(template, role)
    for action in ("CreateTrainingJob", "DescribeTrainingJob", "StopTrainingJob", "AddTags"):
        assert allowed(granted, f"sagemaker:{action}") == [
            "arn:aws:sagemaker:<{'Ref': 'AWS::Region'}>:<{'Ref': 'AWS::AccountId'}>:training-job/*"
        ]
    for action in ("PutTargets", "PutRule", "DescribeRule"):
        assert allowed(granted, f"events:{action}") == [
            "arn:aws:events:<{'Ref': 'AWS::Region'}>:<{'Ref': 'AWS::AccountId'}>:"
            "rule/StepFunctionsGetEventsForSageMakerTrainingJobsRule"
        ]


def test_the_sagemaker_role_reads_inputs_and_writes_only_training_outputs(synthesized):
    template = synthesized.default
    bucket = artifact_bucket_id(template)
    role = sagemaker_role_id(template)
    granted = role_statements(template, role)
    arn = f"<{{'Fn::GetAtt': ['{bucket}', 'Arn']}}>"
    assert sorted(allowed(granted, "s3:GetObject")) == sorted(
        f"{arn}/{prefix}*" for prefix in ("users/", "code/", "base-models/", "endpoints/", "jobs/")
    )
    assert allowed(granted, "s3:PutObject") == [f"{arn}/jobs/*"]
    assert not allowed(granted, "s3:DeleteObject")
    repositories = allowed(granted, "ecr:BatchGetImage")
    # The default endpoint runs the serving image that the stack builds into its repository.
    serving = f"<{{'Fn::GetAtt': ['{logical_id(template, 'AWS::ECR::Repository')}', 'Arn']}}>"
    assert serving in repositories
    repositories.remove(serving)
    assert sorted(r.rsplit("/", 1)[1] for r in repositories) == [
        "huggingface-pytorch-training",
        "sagemaker-tritonserver",
    ]
    assert all(":763104351884:repository/" in r for r in repositories)


def test_the_api_function_invokes_only_user_models_and_runs_only_the_workflow(synthesized):
    template = synthesized.default
    api_id, _ = function(template, "helpers.lambdas.api_handler.handler")
    granted = role_statements(template, role_of(template, api_id))
    invoke = [s for s in granted if "sagemaker:InvokeEndpoint" in as_list(s["Action"])]
    assert len(invoke) == 1
    assert flatten(invoke[0]["Resource"]).endswith(":endpoint/workshop-mme")
    assert invoke[0]["Condition"] == {"StringLike": {"sagemaker:TargetModel": "*--*.tar.gz"}}
    machine = onboarding_machine_id(template.to_json())
    assert allowed(granted, "states:StartExecution") == [f"<{{'Ref': '{machine}'}}>"]
    # Deleting a user stops the executions of this state machine, and no other.
    assert allowed(granted, "states:StopExecution") == [
        "arn:aws:states:<{'Ref': 'AWS::Region'}>:<{'Ref': 'AWS::AccountId'}>:"
        "execution:Default-onboarding:*"
    ]
    template.has_resource_properties(
        "AWS::StepFunctions::StateMachine", {"StateMachineName": "Default-onboarding"}
    )
    everything = {a for s in granted for a in as_list(s["Action"])}
    assert not {"iam:PassRole", "sagemaker:CreateTrainingJob"} & everything
    assert {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"} <= everything
    # The quota counters' conditional UpdateItem: on the table, nothing else, never TTL changes.
    table = logical_id(template, "AWS::DynamoDB::Table")
    assert allowed(granted, "dynamodb:UpdateItem") == [f"<{{'Fn::GetAtt': ['{table}', 'Arn']}}>"]
    assert not any(a.startswith("dynamodb:") and "TimeToLive" in a for a in everything)
    bucket = artifact_bucket_id(template)
    arn = f"<{{'Fn::GetAtt': ['{bucket}', 'Arn']}}>"
    assert sorted(allowed(granted, "s3:PutObject")) == [f"{arn}/code/*", f"{arn}/users/*"]


def test_the_packaging_function_writes_only_the_endpoints_models_and_adapters(synthesized):
    template = synthesized.default
    package_id, _ = function(template, "helpers.lambdas.workflow.package_handler")
    granted = role_statements(template, role_of(template, package_id))
    bucket = artifact_bucket_id(template)
    arn = f"<{{'Fn::GetAtt': ['{bucket}', 'Arn']}}>"
    assert sorted(allowed(granted, "s3:PutObject")) == [
        f"{arn}/endpoints/workshop-mme/adapters/*",
        f"{arn}/endpoints/workshop-mme/models/*",
    ]
    assert sorted(allowed(granted, "s3:GetObject")) == [
        f"{arn}/endpoints/workshop-mme/adapters/*",
        f"{arn}/endpoints/workshop-mme/models/*",
        f"{arn}/jobs/*",
    ]


# -------------------------------------------------------------------- the endpoint


def test_the_endpoint_serves_every_user_model_from_its_prefix(synthesized):
    template = synthesized.default
    bucket = artifact_bucket_id(template)
    container = only(template, "AWS::SageMaker::Model")["Properties"]["PrimaryContainer"]
    assert container["Mode"] == "MultiModel"
    assert flatten(container["ModelDataUrl"]) == (
        f"s3://<{{'Ref': '{bucket}'}}>/endpoints/workshop-mme/models/"
    )
    # The serving image the stack builds (`test_cdk_serving_image.py`); no runtime model.
    assert flatten(container["Image"]).rsplit(":", 1)[1].startswith("serving-")
    assert "Environment" not in container  # no SAGEMAKER_TRITON_DEFAULT_MODEL_NAME on an MME
    variant = only(template, "AWS::SageMaker::EndpointConfig")["Properties"]["ProductionVariants"]
    assert variant[0]["InstanceType"] == "ml.g5.xlarge"
    assert variant[0]["InitialInstanceCount"] == 1
    template.has_resource_properties("AWS::SageMaker::Endpoint", {"EndpointName": "workshop-mme"})


def test_an_endpoint_with_a_serving_runtime_records_it_for_prepare(infra):
    from workshop_infra.endpoint import MultiModelEndpoint
    from workshop_infra.sagemaker_role import SageMakerExecutionRole
    from workshop_infra.storage import Storage

    from helpers.infra.aws.endpoint import RUNTIME_MODEL_ENV

    stack = cdk.Stack(cdk.App(), "Endpoint")
    storage = Storage(stack, "Storage")
    role = SageMakerExecutionRole(stack, "SageMaker", storage).role
    MultiModelEndpoint(
        stack, "Mme", storage, role, "workshop-mme", "ml.g5.xlarge", serving_runtime=RUNTIME
    )
    container = only(Template.from_stack(stack), "AWS::SageMaker::Model")["Properties"][
        "PrimaryContainer"
    ]
    assert container["Environment"] == {RUNTIME_MODEL_ENV: f"{RUNTIME}.tar.gz"}


def test_the_endpoint_is_optional(synthesized):
    for type_ in ("Model", "EndpointConfig", "Endpoint"):
        synthesized.custom.resource_count_is(f"AWS::SageMaker::{type_}", 0)


# -------------------------------------------------------------------- cdk-nag


def test_cdk_nag_finds_nothing_unacknowledged(synthesized):
    assert failed_nag_reports(synthesized.outdir) == []
    errors = Annotations.from_stack(synthesized.default_stack).find_error(
        "*", Match.string_like_regexp("AwsSolutions-.*")
    )
    assert errors == []


def test_every_acknowledgment_says_why(synthesized):
    found = {}
    for template in (synthesized.default, synthesized.custom):
        for name, resource in template.to_json()["Resources"].items():
            for rule in (
                resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
            ):
                found[(name, rule["id"])] = rule["reason"]
    assert {rule.split("[")[0] for _, rule in found} == ACKNOWLEDGED_RULES
    for (name, rule), reason in found.items():
        assert len(reason.split()) >= 10, f"{rule} on {name}: {reason!r}"


def test_acknowledging_without_a_reason_is_refused(infra):
    from workshop_infra.nag import acknowledge

    with pytest.raises(ValueError, match="AwsSolutions-S1"):
        acknowledge(cdk.App(), "AwsSolutions-S1", "fine")


# -------------------------------------------------------------------- the functions' bundle


def test_the_bundle_holds_helpers_and_model_code_where_packaging_finds_it(synthesized):
    template = synthesized.default
    _, package = function(template, "helpers.lambdas.workflow.package_handler")
    _, api = function(template, "helpers.lambdas.api_handler.handler")
    key = package["Properties"]["Code"]["S3Key"]
    assert api["Properties"]["Code"]["S3Key"] == key  # one bundle for both
    bundle = synthesized.outdir / f"asset.{key.removesuffix('.zip')}"
    assert (bundle / "helpers" / "lambdas" / "workflow.py").is_file()
    assert (bundle / "model_code" / "train_dreambooth_lora.py").is_file()
    assert not list(bundle.rglob("__pycache__"))
    # As in Lambda: the bundle first on the path, model_code/ named by the environment.
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "import helpers, helpers.services.packaging as p, helpers.infra.aws.jobs as j; "
            "print(helpers.__file__, p.MODEL_CODE, j.CODE_DIR, sep='\\n')",
        ],
        env={
            **os.environ,
            "PYTHONPATH": str(bundle),
            "WORKSHOP_MODEL_CODE_DIR": str(bundle / "model_code"),
        },
        cwd=bundle,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert found == [
        str(bundle / "helpers" / "__init__.py"),
        str(bundle / "model_code" / "triton_sd"),
        str(bundle / "model_code"),
    ]
    assert (bundle / "model_code" / "triton_sd" / "1" / "model.py").is_file()


def test_bundling_installs_wheels_for_lambdas_python_and_platform(infra, tmp_path, monkeypatch):
    bundling = infra.bundling
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bundling.subprocess, "run", run)
    bundling.LocalBundling(install=True).try_bundle(str(tmp_path), None)

    (command,) = commands
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "--only-binary=:all:" in command
    assert "manylinux2014_x86_64" in command
    assert command[command.index("--target") + 1] == str(tmp_path)
    assert command[command.index("--requirement") + 1] == str(bundling.REQUIREMENTS)
    assert (tmp_path / "helpers" / "lambdas" / "workflow.py").is_file()


def test_the_lambda_requirements_are_pinned_as_the_workshops(infra):
    def pins(path: Path) -> dict[str, str]:
        found = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==")
                found[name.split("[")[0].lower()] = version
        return found

    lambda_pins = pins(infra.bundling.REQUIREMENTS)
    workshop_pins = pins(CDK_DIR.parent / "requirements.txt")
    assert lambda_pins == {name: workshop_pins[name] for name in lambda_pins}
    assert {"fastapi", "mangum", "boto3", "pydantic-settings"} <= set(lambda_pins)
    assert not {"torch", "diffusers", "transformers"} & set(lambda_pins)


# -------------------------------------------------------------------- props and the app


def test_props_come_from_context_strings_and_name_bad_values(infra):
    props = infra.WorkshopProps.from_context(
        {
            "workshop:deploy_endpoint": "false",
            "workshop:throttling_burst_limit": "50",
            "workshop:throttling_rate_limit": "2.5",
            "workshop:bundle": False,
        }.get
    )
    assert props.deploy_endpoint is False and props.bundle is False
    assert props.throttling_burst_limit == 50 and props.throttling_rate_limit == 2.5
    with pytest.raises(ValueError, match="workshop:deploy_endpoint"):
        infra.WorkshopProps.from_context({"workshop:deploy_endpoint": "maybe"}.get)
    with pytest.raises(ValueError, match="endpoint_name"):
        infra.WorkshopProps(endpoint_name="Workshop_MME")
    with pytest.raises(ValueError, match="admin_key_sha256"):
        infra.WorkshopProps(admin_key_sha256="not-a-hash")


def test_the_app_builds_the_stack_from_its_context(infra, tmp_path):
    spec = importlib.util.spec_from_file_location("workshop_cdk_app", CDK_DIR / "app.py")
    app_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_module)

    app = app_module.build_app(
        {
            "workshop:bundle": "false",
            "workshop:deploy_endpoint": "false",
            "workshop:stack_name": "S",
        },
        outdir=str(tmp_path),
    )

    (stack,) = [c for c in app.node.children if isinstance(c, cdk.Stack)]
    assert stack.stack_name == "S"
    assert stack.props.deploy_endpoint is False and stack.endpoint is None


def test_the_api_function_may_delete_all_that_deleting_a_user_deletes(synthesized, tmp_path):
    """`DELETE /v1/users/me` deletes the user's photos, training outputs and code, endpoint
    archive and adapter: every key it deletes must be one the API's role may delete, or the
    route fails on AWS halfway (AccessDenied after the executions were stopped)."""
    from helpers.domain.paths import (
        ADAPTER_SUFFIX,
        adapter_prefix,
        code_prefix,
        endpoint_prefix,
        job_prefix,
        model_name,
        photos_prefix,
        training_photos_prefix,
    )
    from helpers.domain.records import ModelRecord, UserRecord
    from helpers.infra.local.metadata import SqliteMetadataStore
    from helpers.infra.local.store import LocalArtifactStore
    from helpers.ports.onboarding import Onboarding
    from helpers.services.onboarding import delete_user_data
    from helpers.settings import load_settings

    class Idle(Onboarding):
        def start(self, model): ...
        def resume(self): ...
        def cancel(self, model): ...
        def close(self): ...

    settings = load_settings(work_dir=tmp_path)
    store = LocalArtifactStore(settings.store_root)
    store.create_bucket(settings.bucket)
    metadata = SqliteMetadataStore(settings.metadata_path)
    metadata.create_table()
    metadata.put_user(UserRecord("ada"))
    metadata.create_model(ModelRecord("ada", "m1", training_job_name="ada-m1"))
    endpoint = endpoint_prefix(settings.bucket)
    written = [
        photos_prefix(settings.bucket, "ada") + "a.png",
        training_photos_prefix(settings.bucket, "ada", "m1") + "a.png",
        job_prefix(settings.bucket, "ada-m1") + "output/model.tar.gz",
        code_prefix(settings.bucket, "ada-m1") + "sourcedir.tar.gz",
        f"{endpoint}{model_name('ada', 'm1')}.tar.gz",
        f"{adapter_prefix(endpoint)}{model_name('ada', 'm1')}{ADAPTER_SUFFIX}",
    ]
    for uri in written:
        store.put_bytes(uri, b"x")

    delete_user_data(store, metadata, Idle(), settings, "ada")

    assert not [uri for uri in written if store.exists(uri)]
    template = synthesized.default
    api_id, _ = function(template, "helpers.lambdas.api_handler.handler")
    granted = role_statements(template, role_of(template, api_id))
    arn = f"<{{'Fn::GetAtt': ['{artifact_bucket_id(template)}', 'Arn']}}>/"
    patterns = [resource.removeprefix(arn) for resource in allowed(granted, "s3:DeleteObject")]
    keys = [uri.split("/", 3)[3] for uri in written]
    refused = [key for key in keys if not any(fnmatch.fnmatchcase(key, p) for p in patterns)]
    assert not refused, f"the API's role may delete only {patterns}"
