"""IAM enforced on the stack's components in tests: every AWS call that code makes under
`enforced(...)` is checked against the policies `cdk synth` attaches to a role, and a call they do
not allow fails as AWS would fail it (`AccessDenied`) and is recorded.

How:
- `synthesize` builds the stack of `cdk/` (offline, without bundling), `Deployment` resolves
  the template's intrinsics (`Ref`, `Fn::GetAtt`, `Fn::Join`, the pseudo parameters) for a test
  account, region, bucket and table, and `role_statements` gives a role's policy statements;
- `enforced` wraps `botocore.client.BaseClient._make_api_call`, so every client (made before
  or after, in any thread) passes through it: each call is turned into the IAM requests AWS
  authorizes for it (action, resource ARN, condition keys; `requests_of`) and each request is
  evaluated against the statements (`is_allowed`) before moto answers; and, as S3 does, a
  `GetObject`/`HeadObject` of a missing key needs `s3:ListBucket` too (403 instead of 404).

Why not moto's own IAM enforcement (`set_initial_no_auth_action_count`): moto 5 authorizes S3,
SQS, IAM and STS calls against their resource, but every other service's call against the
resource `"*"` (`moto/core/responses.py`, `call_action`), so a statement scoped to a table or a
state machine never matches and least-privilege policies would deny every DynamoDB, Step
Functions and SageMaker call; nor does it evaluate condition keys such as
`sagemaker:TargetModel`. One evaluator for every service keeps "a call the policy does not allow
fails the test" true for all of them.

An operation `requests_of` does not know fails the test too: the harness is taught it first,
so that no call goes unchecked. A request signed by the role but sent outside botocore (a
presigned POST form) is checked by the test calling `Enforcer.authorize` for it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CDK_DIR = Path(__file__).resolve().parents[1] / "cdk"
#: moto's default account, so that ARNs moto builds (state machines, executions) match.
ACCOUNT = "123456789012"
PARTITION = "aws"
#: The property that tells the artifact bucket: the one bucket whose access is logged.
_ARTIFACTS = "LoggingConfiguration"
#: Where cdk-nag writes its findings, in the synthesis's outdir.
NAG_REPORT = "validation-report.json"


# ------------------------------------------------------------------------------- synthesis


def import_infra():
    """The `workshop_infra` package of `cdk/` (not installed: the CDK app is not a library)."""
    import pytest

    # On the path while importing only: the package's own imports find the rest.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(CDK_DIR))
        import workshop_infra
        import workshop_infra.bundling  # the tests patch its pip call

    return workshop_infra


def synthesize_with_nag(infra, app, outdir: Path) -> None:
    """Synthesize `app` (whose outdir is `outdir`) under cdk-nag's checks; a failure fails the
    test with nag's report."""
    import pytest

    infra.add_nag_checks(app)
    try:
        app.synth()
    except RuntimeError as error:
        report = outdir / NAG_REPORT
        pytest.fail(f"synthesis failed: {error}\n{report.read_text() if report.exists() else ''}")


def failed_nag_reports(outdir: Path) -> list[dict]:
    """The cdk-nag plugin reports of the synthesis into `outdir` that did not succeed."""
    report = json.loads((outdir / NAG_REPORT).read_text())
    return [plugin for plugin in report["pluginReports"] if plugin["conclusion"] != "success"]


def synthesize(outdir: Path, **props: Any) -> dict:
    """The template (JSON) of the workshop stack with `props`, synthesized without bundling."""
    import aws_cdk as cdk
    from aws_cdk.assertions import Template

    infra = import_infra()
    app = cdk.App(outdir=str(outdir))
    stack = infra.WorkshopStack(app, "Workshop", props=infra.WorkshopProps(bundle=False, **props))
    return Template.from_stack(stack).to_json()


# ------------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Deployment:
    """A synthesized template as deployed to a test `region` with the artifact bucket `bucket`
    and the metadata table `table`; other resources are named after their logical ids."""

    template: dict
    region: str
    bucket: str
    table: str
    account: str = ACCOUNT

    def resolve(self, value: Any) -> Any:
        """`value` with every intrinsic replaced by its value in this deployment.

        Raises:
            ValueError: an intrinsic or resource type this harness does not resolve (named).
        """
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "Ref" in value:
            return self._ref(value["Ref"])
        if "Fn::GetAtt" in value:
            logical_id, attribute = value["Fn::GetAtt"]
            return self._attributes(logical_id)[attribute]
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(str(self.resolve(part)) for part in parts)
        if "Fn::Split" in value:  # CDK's repository URIs split the repository's ARN
            separator, text = value["Fn::Split"]
            return str(self.resolve(text)).split(separator)
        if "Fn::Select" in value:
            index, items = value["Fn::Select"]
            return self.resolve(items)[int(index)]
        if "Fn::Sub" in value:  # CDK's asset buckets: `cdk-...-${AWS::AccountId}-${AWS::Region}`
            text, variables = value["Fn::Sub"], {}
            if isinstance(text, list):
                text, variables = text

            def substitute(match: re.Match) -> str:
                name = match.group(1)
                if name in variables:
                    return str(self.resolve(variables[name]))
                if "." in name and not name.startswith("AWS::"):
                    logical_id, attribute = name.split(".", 1)
                    return str(self._attributes(logical_id)[attribute])
                return str(self._ref(name))

            return re.sub(r"\$\{([^}!][^}]*)\}", substitute, text)
        intrinsic = [key for key in value if key.startswith("Fn::")]
        if intrinsic:
            raise ValueError(f"the IAM harness does not resolve {intrinsic[0]}: {value}")
        return {key: self.resolve(v) for key, v in value.items()}

    def _ref(self, name: str) -> str:
        pseudo = {
            "AWS::Region": self.region,
            "AWS::AccountId": self.account,
            "AWS::Partition": PARTITION,
            "AWS::URLSuffix": "amazonaws.com",
        }
        if name in pseudo:
            return pseudo[name]
        return self._attributes(name)["Ref"]

    def _attributes(self, logical_id: str) -> dict[str, str]:
        """`Ref` and the `Fn::GetAtt` attributes of a resource, as a deployment would name it."""
        resource = self.template["Resources"][logical_id]
        kind, properties = resource["Type"], resource.get("Properties", {})
        region, account = self.region, self.account
        if kind == "AWS::S3::Bucket":
            name = self.bucket if _ARTIFACTS in properties else f"{self.bucket}-{logical_id}"
            name = name.lower()
            return {"Ref": name, "Arn": f"arn:{PARTITION}:s3:::{name}"}
        if kind == "AWS::DynamoDB::Table":
            arn = f"arn:{PARTITION}:dynamodb:{region}:{account}:table/{self.table}"
            return {"Ref": self.table, "Arn": arn}
        if kind == "AWS::StepFunctions::StateMachine":
            name = self.resolve(properties.get("StateMachineName", logical_id))
            arn = f"arn:{PARTITION}:states:{region}:{account}:stateMachine:{name}"
            return {"Ref": arn, "Arn": arn, "Name": name}
        if kind == "AWS::Lambda::Function":
            arn = f"arn:{PARTITION}:lambda:{region}:{account}:function:{logical_id}"
            return {"Ref": logical_id, "Arn": arn}
        if kind == "AWS::IAM::Role":
            arn = f"arn:{PARTITION}:iam::{account}:role/{logical_id}"
            return {"Ref": logical_id, "Arn": arn}
        if kind in SAGEMAKER_RESOURCES:  # `Ref` is the ARN, the name an attribute
            resource, attribute = SAGEMAKER_RESOURCES[kind]
            name = self.resolve(properties.get(attribute, logical_id))
            arn = f"arn:{PARTITION}:sagemaker:{region}:{account}:{resource}/{name.lower()}"
            return {"Ref": arn, attribute: name}
        if kind == "AWS::CodeBuild::Project":
            arn = f"arn:{PARTITION}:codebuild:{region}:{account}:project/{logical_id}"
            return {"Ref": logical_id, "Arn": arn}
        if kind == "AWS::ECR::Repository":  # CloudFormation names it in lower case
            name = self.resolve(properties.get("RepositoryName", logical_id.lower()))
            arn = f"arn:{PARTITION}:ecr:{region}:{account}:repository/{name}"
            uri = f"{account}.dkr.ecr.{region}.amazonaws.com/{name}"
            return {"Ref": name, "Arn": arn, "RepositoryUri": uri}
        if kind == "AWS::Logs::LogGroup":
            name = f"/workshop/{logical_id}"
            arn = f"arn:{PARTITION}:logs:{region}:{account}:log-group:{name}:*"
            return {"Ref": name, "Arn": arn}
        raise ValueError(f"the IAM harness does not name resources of type {kind} ({logical_id})")

    def function_id(self, handler: str) -> str:
        """The logical id of the Lambda function whose handler is `handler`."""
        found = [
            name
            for name, resource in self.template["Resources"].items()
            if resource["Type"] == "AWS::Lambda::Function"
            and resource["Properties"].get("Handler") == handler
        ]
        if len(found) != 1:
            raise ValueError(f"expected one function with handler {handler}, found {found}")
        return found[0]

    def function_environment(self, handler: str) -> dict[str, str]:
        """The environment the stack gives the function `handler`, resolved."""
        properties = self.template["Resources"][self.function_id(handler)]["Properties"]
        return self.resolve(properties["Environment"]["Variables"])

    def function_role(self, handler: str) -> str:
        """The logical id of the role the function `handler` runs as."""
        properties = self.template["Resources"][self.function_id(handler)]["Properties"]
        return properties["Role"]["Fn::GetAtt"][0]

    def role_statements(self, role_id: str) -> list[dict]:
        """Every statement of every policy the role `role_id` carries, resolved.

        Raises:
            ValueError: the role has managed policies (their documents are not in the
                template).
        """
        role = self.template["Resources"][role_id]["Properties"]
        if role.get("ManagedPolicyArns"):
            raise ValueError(f"{role_id} has managed policies {role['ManagedPolicyArns']}")
        found = [s for inline in role.get("Policies", []) for s in _statements(inline)]
        for resource in self.template["Resources"].values():
            roles = resource.get("Properties", {}).get("Roles", [])
            if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in roles:
                found += _statements(resource["Properties"])
        return self.resolve(found)

    def state_machine_name(self) -> str:
        return self._attributes(onboarding_machine_id(self.template))["Name"]


def onboarding_machine_id(template: Mapping) -> str:
    """The logical id of the onboarding state machine: the one the stack names. (The serving
    image's build brings another, the custom resource provider's waiter, which has no name.)"""
    (machine,) = [
        name
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::StepFunctions::StateMachine"
        and "StateMachineName" in resource["Properties"]
    ]
    return machine


#: SageMaker's resources in a template: their ARNs' resource type and their name's attribute.
SAGEMAKER_RESOURCES = {
    "AWS::SageMaker::Model": ("model", "ModelName"),
    "AWS::SageMaker::EndpointConfig": ("endpoint-config", "EndpointConfigName"),
    "AWS::SageMaker::Endpoint": ("endpoint", "EndpointName"),
}


def _statements(policy: Mapping) -> list[dict]:
    return list(policy["PolicyDocument"]["Statement"])


# ------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Request:
    """One IAM authorization: what a call needs allowed."""

    action: str
    resource: str
    context: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        context = f" with {dict(self.context)}" if self.context else ""
        return f"{self.action} on {self.resource}{context}"


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """IAM's wildcard match: `*` any characters (`/` included), `?` one."""
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, value, re.IGNORECASE if ignore_case else 0) is not None


_CONDITIONS = {
    "StringEquals": lambda expected, actual: actual == expected,
    "StringLike": lambda expected, actual: _wildcard(expected, actual),
    "ArnEquals": lambda expected, actual: actual == expected,
    "ArnLike": lambda expected, actual: _wildcard(expected, actual),
    "Bool": lambda expected, actual: actual.lower() == str(expected).lower(),
}


def _conditions_hold(conditions: Mapping, context: Mapping[str, str]) -> bool:
    for operator, keys in conditions.items():
        if operator not in _CONDITIONS:
            raise ValueError(f"the IAM harness does not evaluate the condition {operator}")
        for key, expected in keys.items():
            actual = context.get(key)
            if actual is None:
                return False
            if not any(_CONDITIONS[operator](e, actual) for e in _as_list(expected)):
                return False
    return True


def is_allowed(statements: list[dict], request: Request) -> bool:
    """Whether identity-based `statements` allow `request`: an Allow matches it and no Deny
    does (no `NotAction`/`NotResource`: the stack writes none)."""
    allowed = False
    for statement in statements:
        if "NotAction" in statement or "NotResource" in statement:
            raise ValueError(
                f"the IAM harness does not evaluate NotAction/NotResource: {statement}"
            )
        if not any(_wildcard(a, request.action, True) for a in _as_list(statement["Action"])):
            continue
        if not any(_wildcard(r, request.resource) for r in _as_list(statement["Resource"])):
            continue
        if not _conditions_hold(statement.get("Condition", {}), request.context):
            continue
        if statement["Effect"] == "Deny":
            return False
        allowed = True
    return allowed


# ------------------------------------------------------------------------------- calls


def _s3_object(bucket: str, key: str) -> str:
    return f"arn:{PARTITION}:s3:::{bucket}/{key}"


_S3_OBJECT_ACTIONS = {
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "DeleteObject": "s3:DeleteObject",
}
#: DynamoDB operations authorized as themselves on the table (or its index).
_DYNAMODB_TABLE_ACTIONS = {
    "GetItem",
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "Query",
    "Scan",
    "DescribeTable",
    "DescribeTimeToLive",
    # provisioning the table (notebook 01)
    "CreateTable",
    "UpdateContinuousBackups",
    "DescribeContinuousBackups",
    "UpdateTimeToLive",
}
#: A transaction is authorized item by item, as the item's own action.
_TRANSACT_ACTIONS = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
    "Get": "GetItem",
}


def requests_of(service: str, operation: str, params: Mapping, region: str, account: str):
    """The IAM requests AWS authorizes for one call (as the service authorization reference
    lists them): each service's are taught by its own function in `_SERVICES`.

    Raises:
        NotImplementedError: an operation this harness has not been taught (named).
    """
    teach = _SERVICES.get(service)
    found = teach(operation, params, _Arns(region, account)) if teach else None
    if found is None:
        raise NotImplementedError(
            f"the IAM harness does not know what {service} {operation} needs; add it to requests_of"
        )
    return found


@dataclass(frozen=True)
class _Arns:
    region: str
    account: str

    def of(self, service: str, resource: str) -> str:
        return f"arn:{PARTITION}:{service}:{self.region}:{self.account}:{resource}"


def _s3_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    bucket = params.get("Bucket", "")
    if operation in _S3_OBJECT_ACTIONS:
        return [Request(_S3_OBJECT_ACTIONS[operation], _s3_object(bucket, params["Key"]))]
    if operation == "DeleteObjects":
        return [
            Request("s3:DeleteObject", _s3_object(bucket, item["Key"]))
            for item in params["Delete"]["Objects"]
        ]
    if operation in ("ListObjectsV2", "ListObjects"):
        context = {"s3:prefix": params["Prefix"]} if "Prefix" in params else {}
        return [Request("s3:ListBucket", f"arn:{PARTITION}:s3:::{bucket}", context)]
    if operation in _S3_BUCKET_ACTIONS:
        return [Request(_S3_BUCKET_ACTIONS[operation], f"arn:{PARTITION}:s3:::{bucket}")]
    return None


#: Bucket-level operations and the action each is authorized as, on the bucket's ARN (the
#: action names differ from the operations': the service authorization reference's).
_S3_BUCKET_ACTIONS = {
    "CreateBucket": "s3:CreateBucket",
    "HeadBucket": "s3:ListBucket",
    "GetBucketLocation": "s3:GetBucketLocation",
    "PutBucketEncryption": "s3:PutEncryptionConfiguration",
    "GetBucketEncryption": "s3:GetEncryptionConfiguration",
    "PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
    "GetPublicAccessBlock": "s3:GetBucketPublicAccessBlock",
}


def _dynamodb_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    table = arns.of("dynamodb", f"table/{params.get('TableName', '')}")
    if operation in _DYNAMODB_TABLE_ACTIONS:
        index = params.get("IndexName")
        return [Request(f"dynamodb:{operation}", f"{table}/index/{index}" if index else table)]
    if operation in ("BatchWriteItem", "BatchGetItem"):
        return [
            Request(f"dynamodb:{operation}", arns.of("dynamodb", f"table/{name}"))
            for name in params["RequestItems"]
        ]
    if operation in ("TransactWriteItems", "TransactGetItems"):
        found = []
        for item in params["TransactItems"]:
            ((kind, body),) = item.items()
            target = arns.of("dynamodb", f"table/{body['TableName']}")
            found.append(Request(f"dynamodb:{_TRANSACT_ACTIONS[kind]}", target))
        return found
    return None


def _stepfunctions_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    if operation in ("StartExecution", "ListExecutions", "DescribeStateMachine"):
        return [Request(f"states:{operation}", params["stateMachineArn"])]
    if operation in ("StopExecution", "DescribeExecution"):
        return [Request(f"states:{operation}", params["executionArn"])]
    return None


def _sagemaker_runtime_requests(
    operation: str, params: Mapping, arns: _Arns
) -> list[Request] | None:
    if operation == "InvokeEndpoint":
        endpoint = arns.of("sagemaker", f"endpoint/{params['EndpointName'].lower()}")
        context = (
            {"sagemaker:TargetModel": params["TargetModel"]} if "TargetModel" in params else {}
        )
        return [Request("sagemaker:InvokeEndpoint", endpoint, context)]
    return None


def _sts_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    return [] if operation == "GetCallerIdentity" else None  # always allowed


#: Where `enforced` hands `_iam_requests` the ARN of the role a GetRole names.
_ROLE_ARN = "_RoleArnWithPath"


def _iam_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    if operation == "GetRole":
        # IAM authorizes the role's whole ARN, its path included, which the name alone does
        # not give: `enforced` looks it up (`RoleArn`); a role that does not exist has none.
        role = f"arn:{PARTITION}:iam::{arns.account}:role/{params['RoleName']}"
        return [Request("iam:GetRole", params.get(_ROLE_ARN, role))]
    return None


#: What `iam:PassRole` is checked with when SageMaker is handed a role.
PASSED_TO_SAGEMAKER = {"iam:PassedToService": "sagemaker.amazonaws.com"}


def _cloudwatch_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    # CloudWatch's metric reads have no resource-level permissions.
    if operation in ("GetMetricStatistics", "GetMetricData", "ListMetrics"):
        return [Request(f"cloudwatch:{operation}", "*")]
    # Nor has PutMetricData; policies narrow it by namespace.
    if operation == "PutMetricData":
        context = {"cloudwatch:namespace": params["Namespace"]}
        return [Request("cloudwatch:PutMetricData", "*", context)]
    return None


def _logs_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    """Reading logs (the notebooks), and writing a job's streams (SageMaker's log agent)."""
    group = arns.of("logs", f"log-group:{params.get('logGroupName', '')}")
    if operation == "CreateLogGroup":
        return [Request("logs:CreateLogGroup", group)]
    if operation in ("DescribeLogStreams", "FilterLogEvents"):
        return [Request(f"logs:{operation}", f"{group}:*")]
    if operation in ("GetLogEvents", "CreateLogStream", "PutLogEvents"):
        stream = f"{group}:log-stream:{params['logStreamName']}"
        return [Request(f"logs:{operation}", stream)]
    return None


#: SageMaker operations on one resource: its type, the parameter that names it (ARNs carry the
#: name in lower case), and the parameter holding a role SageMaker is handed (`iam:PassRole`).
_SAGEMAKER = {
    "CreateTrainingJob": ("training-job", "TrainingJobName", "RoleArn"),
    "DescribeTrainingJob": ("training-job", "TrainingJobName", None),
    "StopTrainingJob": ("training-job", "TrainingJobName", None),
    "CreateModel": ("model", "ModelName", "ExecutionRoleArn"),
    "DescribeModel": ("model", "ModelName", None),
    "DeleteModel": ("model", "ModelName", None),
    "CreateEndpointConfig": ("endpoint-config", "EndpointConfigName", None),
    "DescribeEndpointConfig": ("endpoint-config", "EndpointConfigName", None),
    "DeleteEndpointConfig": ("endpoint-config", "EndpointConfigName", None),
    "CreateEndpoint": ("endpoint", "EndpointName", None),
    "UpdateEndpoint": ("endpoint", "EndpointName", None),
    "DescribeEndpoint": ("endpoint", "EndpointName", None),
    "DeleteEndpoint": ("endpoint", "EndpointName", None),
}
#: SageMaker's list operations: no resource-level permissions.
_SAGEMAKER_LISTS = {"ListModels", "ListEndpointConfigs", "ListEndpoints"}


def _sagemaker_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    """SageMaker's training jobs, the endpoint's control plane, and tags."""
    if operation in ("AddTags", "ListTags", "DeleteTags"):
        return [Request(f"sagemaker:{operation}", params["ResourceArn"])]
    if operation in _SAGEMAKER_LISTS:
        return [Request(f"sagemaker:{operation}", "*")]
    if operation not in _SAGEMAKER:
        return None
    kind, key, role = _SAGEMAKER[operation]
    resource = arns.of("sagemaker", f"{kind}/{params[key].lower()}")
    found = [Request(f"sagemaker:{operation}", resource)]
    if operation in ("CreateEndpoint", "UpdateEndpoint"):
        # Both are authorized on the endpoint config they name too.
        config = arns.of("sagemaker", f"endpoint-config/{params['EndpointConfigName'].lower()}")
        found.append(Request(f"sagemaker:{operation}", config))
    if params.get("Tags"):  # tagging on create needs sagemaker:AddTags as well
        found.append(Request("sagemaker:AddTags", resource))
    if role:
        found.append(Request("iam:PassRole", params[role], PASSED_TO_SAGEMAKER))
    return found


#: EventBridge rule operations, and the parameter that names the rule.
_EVENTS_RULES = {
    "PutRule": "Name",
    "DescribeRule": "Name",
    "DeleteRule": "Name",
    "EnableRule": "Name",
    "DisableRule": "Name",
    "PutTargets": "Rule",
    "RemoveTargets": "Rule",
    "ListTargetsByRule": "Rule",
}


def _events_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    if operation not in _EVENTS_RULES:
        return None
    # A rule of the default bus is `rule/<name>`; of another bus, `rule/<bus>/<name>`.
    bus = params.get("EventBusName", "default")
    rule = params[_EVENTS_RULES[operation]]
    rule = rule if bus == "default" else f"{bus}/{rule}"
    return [Request(f"events:{operation}", arns.of("events", f"rule/{rule}"))]


#: Lambda operations on one function, and the action each is authorized as.
_LAMBDA_FUNCTIONS = {
    "Invoke": "lambda:InvokeFunction",
    "GetFunction": "lambda:GetFunction",
    "GetFunctionConfiguration": "lambda:GetFunctionConfiguration",
}


def _lambda_requests(operation: str, params: Mapping, arns: _Arns) -> list[Request] | None:
    if operation not in _LAMBDA_FUNCTIONS:
        return None
    # `FunctionName` is a name (`f`, `f:alias`), a partial ARN (`123456789012:function:f`) or
    # an ARN; a qualifier (version or alias) makes the ARN a qualified one.
    name = params["FunctionName"]
    if name.startswith("arn:"):
        function = name
    elif ":function:" in name:
        function = f"arn:{PARTITION}:lambda:{arns.region}:{name}"
    else:
        function = arns.of("lambda", f"function:{name}")
    if params.get("Qualifier"):
        function = f"{function}:{params['Qualifier']}"
    return [Request(_LAMBDA_FUNCTIONS[operation], function)]


#: Each service's teacher: the requests of one of its operations, or None if not taught.
_SERVICES = {
    "s3": _s3_requests,
    "dynamodb": _dynamodb_requests,
    "stepfunctions": _stepfunctions_requests,
    "sagemaker-runtime": _sagemaker_runtime_requests,
    "sts": _sts_requests,
    "iam": _iam_requests,
    "cloudwatch": _cloudwatch_requests,
    "logs": _logs_requests,
    "sagemaker": _sagemaker_requests,
    "events": _events_requests,
    "lambda": _lambda_requests,
}


class Enforcer:
    """The calls made under `enforced`, their requests, and the ones refused.

    Attributes:
        statements (`list[dict]`): the identity's policy statements (resolved).
        allowed (`list[Request]`): every request that was allowed, in order.
        denied (`list[Request]`): every request that was refused, in order (the code may
            swallow the error; the test must not).
    """

    def __init__(self, statements: list[dict], region: str, account: str = ACCOUNT) -> None:
        self.statements = statements
        self.region = region
        self.account = account
        self.allowed: list[Request] = []
        self.denied: list[Request] = []
        self._suspended = False

    def authorize(self, service: str, operation: str, params: Mapping) -> None:
        """Check one call; raise `ClientError` (`AccessDenied`, 403) if a request is refused."""
        from botocore.exceptions import ClientError

        if self._suspended:
            return
        for request in requests_of(service, operation, params, self.region, self.account):
            if not is_allowed(self.statements, request):
                self.denied.append(request)
                message = f"not authorized to perform: {request}"
                raise ClientError(
                    {
                        "Error": {"Code": "AccessDenied", "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 403},
                    },
                    operation,
                )
            self.allowed.append(request)

    @contextlib.contextmanager
    def as_admin(self) -> Iterator[None]:
        """Calls made inside the block are not checked: test setup, or what another component,
        outside this check, does in between."""
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False


@contextlib.contextmanager
def enforced(statements: list[dict], region: str, account: str = ACCOUNT) -> Iterator[Enforcer]:
    """Every botocore call made inside the block is authorized against `statements` first."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    enforcer = Enforcer(statements, region, account)
    original = BaseClient._make_api_call

    def checked(client, operation_name, api_params):
        service = client.meta.service_model.service_name
        if service == "iam" and operation_name == "GetRole":
            with contextlib.suppress(ClientError):  # the ARN it is authorized on: see GetRole
                role = original(client, operation_name, api_params)["Role"]["Arn"]
                api_params = {**api_params, _ROLE_ARN: role}
        enforcer.authorize(service, operation_name, api_params)
        api_params = {k: v for k, v in api_params.items() if k != _ROLE_ARN}
        try:
            return original(client, operation_name, api_params)
        except ClientError as error:
            # S3 tells a missing key (404) only to who may list the bucket; others get 403.
            missing = error.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound")
            if service == "s3" and operation_name in ("GetObject", "HeadObject") and missing:
                enforcer.authorize(service, "ListObjectsV2", {"Bucket": api_params["Bucket"]})
            raise

    BaseClient._make_api_call = checked
    try:
        yield enforcer
    finally:
        BaseClient._make_api_call = original


def without(statements: list[dict], index: int) -> list[dict]:
    """`statements` less the one at `index` (to prove the tests fail without it)."""
    return [s for i, s in enumerate(statements) if i != index]


def find_statement(statements: list[dict], action: str, resource_part: str = "") -> int:
    """The index of the only statement allowing `action` on a resource containing
    `resource_part`."""
    found = [
        i
        for i, s in enumerate(statements)
        if s["Effect"] == "Allow"
        and any(_wildcard(a, action, True) for a in _as_list(s["Action"]))
        and any(resource_part in r for r in _as_list(s["Resource"]))
    ]
    if len(found) != 1:
        raise ValueError(f"expected one statement allowing {action} on *{resource_part}*: {found}")
    return found[0]
