"""The onboarding state machine under the IAM policies `cdk synth` gives its role
(`tests/iam_enforced.py`), against moto: the synthesized definition runs in a small JSONata
interpreter (`tests/step_functions.py`) that makes the calls Step Functions makes for each
state (DynamoDB `UpdateItem`; the `.sync` training job's managed EventBridge rule,
`CreateTrainingJob` with its tags and `iam:PassRole`, `DescribeTrainingJob`; the packaging
function's invocation), each one authorized against the role first.

A model is requested through the API Lambda (as the journey of `test_iam_enforced.py` does);
the execution then runs with the input and name the API gave Step Functions. The packaging
function runs in this process under its own role; the training job writes its output as an
administrator (the SageMaker execution role's check is another test's).

Removing any one statement of the role (but log delivery's and X-Ray's) makes the execution
fail with that refusal: every statement is needed. The tests that synthesize the stack are slow
(about 10 s for synthesis, 1.5 s per onboarding).
"""

from __future__ import annotations

import hashlib
import json
import re

import boto3
import pytest

from helpers.workshop.aws_stack import node_problem

if (_NODE_PROBLEM := node_problem()) is not None:  # importing aws_cdk starts node
    pytest.skip(f"the CDK needs Node.js: {_NODE_PROBLEM}", allow_module_level=True)

import iam_enforced
import step_functions
from step_functions import TaskFailed, evaluate, run_execution
from test_api_lambda import event, multipart
from test_iam_enforced import (
    ADMIN_KEY,
    API_HANDLER,
    BUCKET,
    PACKAGE_HANDLER,
    REGION,
    TABLE,
    deployed,
)

ACCOUNT = iam_enforced.ACCOUNT
#: The onboarding's states, in order, when all goes well.
HAPPY_PATH = ["MarkTraining", "Train", "MarkPackaging", "Package", "MarkAvailable"]
#: What a training job's script leaves in its `FailureReason`: internal detail (paths, the
#: exception) that operators need and users must not see.
ALGORITHM_ERROR = (
    'AlgorithmError: ExecuteUserScriptError:\nExitCode 1\nErrorMessage "torch.OutOfMemoryError: '
    'CUDA out of memory. Tried to allocate 20.00 MiB"\nCommand "/opt/conda/bin/python3.12 '
    'train_dreambooth_lora.py --instance_data_dir /opt/ml/input/data/instance", exit code: 1'
)


# ------------------------------------------------------------------------------- the stack


def state_machine(deployment) -> dict:
    """The state machine's resource properties."""
    machine_id = iam_enforced.onboarding_machine_id(deployment.template)
    return deployment.template["Resources"][machine_id]["Properties"]


def definition(deployment) -> dict:
    return json.loads(deployment.resolve(state_machine(deployment)["DefinitionString"]))


def machine_role(deployment) -> str:
    return state_machine(deployment)["RoleArn"]["Fn::GetAtt"][0]


def is_service_only(statement: dict) -> bool:
    """Log delivery and X-Ray statements: Step Functions' service itself uses them (for the
    state machine's logging and tracing configuration), never a state of the definition, so
    no execution can show they are needed; cdk-nag's acknowledgement in `workflow.py` says
    why they name `*`."""
    actions = (
        statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
    )
    return all(a.startswith(("logs:", "xray:")) for a in actions)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> iam_enforced.Deployment:
    """The stack with the default props (as `test_iam_enforced.py` synthesizes it)."""
    template = iam_enforced.synthesize(
        tmp_path_factory.mktemp("cdk.out"),
        admin_key_sha256=hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
    )
    return iam_enforced.Deployment(template, REGION, BUCKET, TABLE)


@pytest.fixture
def statements(deployment) -> list[dict]:
    return deployment.role_statements(machine_role(deployment))


@pytest.fixture
def aws(deployment, monkeypatch, tmp_path):
    with deployed(deployment, monkeypatch, tmp_path) as backend:
        yield backend


# ------------------------------------------------------------------------------- onboarding


def request_model(deployment) -> tuple[str, dict, str]:
    """A user, their photos and a model requested through the API Lambda (not checked here:
    `test_iam_enforced.py` checks the API's role): `(api key, execution input, execution
    name)` as the API started the execution."""
    from helpers.lambdas.api_handler import make_handler
    from helpers.workshop.demo_subjects import get_demo_subject, subject_images
    from helpers.workshop.personalization import png_bytes

    handler = make_handler()

    def call(method, path, key=None, body=None, content_type=None, expected=200) -> dict:
        answer = handler(event(method, path, key, body, content_type), None)
        assert answer["statusCode"] == expected, (path, answer["body"][:300])
        return json.loads(answer["body"]) if answer["body"] else {}

    images = [png_bytes(im) for im in subject_images(get_demo_subject("demo-ada"), count=3)]
    key = call("POST", "/v1/users", ADMIN_KEY, {"user_id": "ada"}, expected=201)["api_key"]
    body, content_type = multipart([(f"{i}.png", png) for i, png in enumerate(images)])
    call("POST", "/v1/photos", key, body, content_type, expected=201)
    call("POST", "/v1/models", key, {"max_train_steps": 400}, expected=202)
    sfn = boto3.client("stepfunctions", region_name=REGION)
    machine = deployment.function_environment(API_HANDLER)["WORKSHOP_STATE_MACHINE_ARN"]
    [started] = sfn.list_executions(stateMachineArn=machine)["executions"]
    given = sfn.describe_execution(executionArn=started["executionArn"])["input"]
    return key, json.loads(given), started["name"]


def onboard(
    deployment, statements, monkeypatch, run_training_job=None
) -> tuple[step_functions.Execution, iam_enforced.Enforcer, str]:
    """Request a model, then run its onboarding execution with the state machine's role
    `statements` enforced: `(execution, enforcer, api key)`."""
    from helpers.lambdas.workflow import package_handler

    key, given, name = request_model(deployment)
    package_role = deployment.role_statements(deployment.function_role(PACKAGE_HANDLER))
    package_arn = deployment.resolve(
        {"Fn::GetAtt": [deployment.function_id(PACKAGE_HANDLER), "Arn"]}
    )
    with iam_enforced.enforced(statements, REGION) as enforcer:

        def package(payload):
            """The packaging Lambda: its environment and its role."""
            for variable, value in deployment.function_environment(PACKAGE_HANDLER).items():
                if variable != "WORKSHOP_MODEL_CODE_DIR":  # the bundle's folder: the checkout
                    monkeypatch.setenv(variable, value)
            enforcer.statements = package_role
            try:
                return package_handler(payload)
            finally:
                enforcer.statements = statements

        integrations = step_functions.AwsIntegrations(
            REGION, {package_arn: package}, run_training_job, enforcer
        )
        execution = run_execution(
            definition(deployment),
            given,
            name,
            integrations,
            state_machine_arn=deployment.resolve(
                {"Ref": iam_enforced.onboarding_machine_id(deployment.template)}
            ),
            role_arn=deployment.resolve({"Fn::GetAtt": [machine_role(deployment), "Arn"]}),
        )
    return execution, enforcer, key


def model_as_its_user_reads_it(key: str) -> dict:
    from helpers.lambdas.api_handler import make_handler

    answer = make_handler()(event("GET", "/v1/models/m1", key), None)
    assert answer["statusCode"] == 200, answer["body"]
    return json.loads(answer["body"])


def refusal(statement: dict) -> str:
    """The refusal of one of `statement`'s actions, as the execution's cause quotes it."""
    actions = (
        statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
    )
    return rf"not authorized to perform: ({'|'.join(re.escape(a) for a in actions)}) on "


# ------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_a_models_onboarding_needs_nothing_the_role_does_not_allow(
    aws, deployment, statements, monkeypatch
):
    execution, enforcer, key = onboard(deployment, statements, monkeypatch)

    assert not enforcer.denied, [str(r) for r in enforcer.denied]
    assert execution.status == "SUCCEEDED", (execution.error, execution.cause)
    assert execution.states == HAPPY_PATH
    assert not execution.retries
    model = model_as_its_user_reads_it(key)
    assert model["status"] == "AVAILABLE"
    record = aws.metadata.get_model("ada", "m1")
    assert record.endpoint_model_name == "ada--m1"
    endpoint = deployment.function_environment(PACKAGE_HANDLER)["WORKSHOP_ENDPOINT_NAME"]
    models = f"s3://{BUCKET}/endpoints/{endpoint}/models/"
    assert record.model_artifact_uri.startswith(models)
    assert record.model_artifact_uri in aws.store.list(models)
    assert record.training_job_name == execution.input["training_job"]["TrainingJobName"]
    actions = {r.action for r in enforcer.allowed}
    assert {
        "dynamodb:UpdateItem",
        "events:DescribeRule",
        "events:PutRule",
        "events:PutTargets",
        "sagemaker:CreateTrainingJob",
        "sagemaker:AddTags",
        "iam:PassRole",
        "sagemaker:DescribeTrainingJob",
        "lambda:InvokeFunction",
    } <= actions


@pytest.mark.slow
def test_a_failed_training_job_fails_the_model_with_a_reason_for_its_user(
    aws, deployment, statements, monkeypatch
):
    from helpers.domain import failures

    execution, enforcer, key = onboard(
        deployment, statements, monkeypatch, run_training_job=lambda config: ALGORITHM_ERROR
    )

    assert not enforcer.denied, [str(r) for r in enforcer.denied]
    assert execution.states == ["MarkTraining", "Train", "MarkFailed", "Failed"]
    model = model_as_its_user_reads_it(key)
    assert model["status"] == "FAILED"
    assert model["failure_reason"] == f"{failures.TRAINING_FAILED} (ref {execution.name})"
    for internal in ("CUDA", "AlgorithmError", "/opt/", BUCKET, "States."):
        assert internal not in model["failure_reason"]
    # The operator's detail is the execution's cause: the job's FailureReason, not its whole
    # description.
    assert execution.error == "OnboardingFailed"
    assert execution.cause.startswith("training failed: States.TaskFailed: AlgorithmError: ")
    assert "CUDA out of memory" in execution.cause
    assert "HyperParameters" not in execution.cause


@pytest.mark.slow
def test_every_statement_of_the_state_machine_role_is_needed(deployment, statements, tmp_path):
    """Least privilege, checked: the onboarding fails without any one statement the
    definition's states use, and says which request was refused."""
    checked = 0
    for index, statement in enumerate(statements):
        if is_service_only(statement):
            continue
        work = tmp_path / str(index)
        work.mkdir()
        with pytest.MonkeyPatch.context() as patch, deployed(deployment, patch, work):
            trial = iam_enforced.without(statements, index)
            execution, enforcer, _ = onboard(deployment, trial, patch)
        assert execution.status == "FAILED", statement
        assert re.search(refusal(statement), execution.cause), (statement, execution.cause)
        assert re.match(refusal(statement), f"not authorized to perform: {enforcer.denied[0]}")
        checked += 1
    assert checked == len(statements) - 2  # all but log delivery's and X-Ray's


def passed_to(service: str, statements: list[dict]) -> list[dict]:
    """`statements` with the PassRole statement's `iam:PassedToService` `service`."""
    index = iam_enforced.find_statement(statements, "iam:PassRole", ":role/")
    changed = {
        **statements[index],
        "Condition": {"StringEquals": {"iam:PassedToService": service}},
    }
    return [changed if i == index else s for i, s in enumerate(statements)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("refused", "resource", "passed_to_service", "status", "last_state"),
    [
        # MarkFailed cannot write either: the model stays as it was, the execution fails there.
        ("dynamodb:UpdateItem", ":table/", None, "REQUESTED", "MarkFailed"),
        ("iam:PassRole", ":role/", None, "FAILED", "Failed"),
        ("iam:PassRole", ":role/", "lambda.amazonaws.com", "FAILED", "Failed"),
        ("lambda:InvokeFunction", ":function:", None, "FAILED", "Failed"),
    ],
    ids=["UpdateItem", "PassRole", "PassRole-to-another-service", "InvokeFunction"],
)
def test_without_one_permission_the_onboarding_fails(
    aws,
    deployment,
    statements,
    monkeypatch,
    refused,
    resource,
    passed_to_service,
    status,
    last_state,
):
    if passed_to_service:
        trial = passed_to(passed_to_service, statements)
    else:
        index = iam_enforced.find_statement(statements, refused, resource)
        trial = iam_enforced.without(statements, index)

    execution, enforcer, key = onboard(deployment, trial, monkeypatch)

    assert (execution.status, execution.states[-1]) == ("FAILED", last_state)
    assert enforcer.denied and enforcer.denied[0].action == refused
    assert f"not authorized to perform: {refused} on " in execution.cause
    assert model_as_its_user_reads_it(key)["status"] == status
    if refused == "lambda:InvokeFunction":  # Step Functions retries Lambda's own errors
        assert [r.state for r in execution.retries] == ["Package"] * 6


# ------------------------------------------------------------------------------- units


def workflow_module():
    iam_enforced.import_infra()
    from workshop_infra import workflow

    return workflow


def describe_failed_job(reason: str) -> str:
    """A failed job's `DescribeTrainingJob` answer as the `.sync` task's cause (JSON)."""
    return json.dumps(
        {
            "TrainingJobName": "ada-m1-1",
            "TrainingJobStatus": "Failed",
            "SecondaryStatus": "Failed",
            "FailureReason": reason,
            "HyperParameters": {"max_train_steps": '"400"', "sagemaker_program": '"train.py"'},
            "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/jobs/"},
            "TrainingEndTime": 1764756000000,
        }
    )


def caught(expression: str, error: str, cause: str | None) -> str:
    """`expression` evaluated in a Catch of the execution `ada-m1`."""
    error_output = {"Error": error} if cause is None else {"Error": error, "Cause": cause}
    states = {"errorOutput": error_output, "context": {"Execution": {"Name": "ada-m1"}}}
    return evaluate(expression, states, {})


def test_the_users_reason_names_the_step_and_the_execution_and_nothing_else():
    from helpers.domain import failures

    workflow = workflow_module()
    cause = describe_failed_job(ALGORITHM_ERROR)

    training = caught(workflow.failure_reason("training"), "States.TaskFailed", cause)
    assert training == f"{failures.TRAINING_FAILED} (ref ada-m1)"
    assert failures.public_reason(training) == training
    packaging = caught(workflow.failure_reason("packaging"), "ValueError", "{}")
    assert packaging == f"{failures.PACKAGING_FAILED} (ref ada-m1)"
    other = caught(workflow.failure_reason("recording AVAILABLE"), "States.Timeout", None)
    assert other == f"{failures.ONBOARDING_FAILED} (ref ada-m1)"


def test_the_operators_detail_is_the_failure_reason_or_error_message_of_the_cause():
    workflow = workflow_module()
    detail = workflow.failure_detail

    sagemaker = caught(detail("training"), "States.TaskFailed", describe_failed_job("OOM"))
    assert sagemaker == "training failed: States.TaskFailed: OOM"
    lambda_cause = json.dumps({"errorMessage": "event has no user_id", "errorType": "ValueError"})
    assert caught(detail("packaging"), "ValueError", lambda_cause) == (
        "packaging failed: ValueError: event has no user_id"
    )
    sdk = "not authorized to perform: dynamodb:UpdateItem on t (Service: AmazonDynamoDBv2)"
    assert caught(detail("recording TRAINING"), "DynamoDB.AmazonDynamoDBException", sdk) == (
        f"recording TRAINING failed: DynamoDB.AmazonDynamoDBException: {sdk}"
    )
    assert caught(detail("training"), "States.Timeout", None) == "training failed: States.Timeout"
    long = caught(detail("training"), "States.TaskFailed", describe_failed_job("x" * 5000))
    assert len(long) == workflow.MAX_FAILURE_REASON


def test_the_operators_detail_keeps_a_whole_sagemaker_failure_reason():
    workflow = workflow_module()

    cause = describe_failed_job(ALGORITHM_ERROR)
    detail = caught(workflow.failure_detail("training"), "States.TaskFailed", cause)

    assert detail == f"training failed: States.TaskFailed: {ALGORITHM_ERROR}"


def definition_of(**states) -> dict:
    first = next(iter(states))
    return {"QueryLanguage": "JSONata", "StartAt": first, "States": states}


def failing(*errors: str):
    """An integration that fails with `errors` in turn, then succeeds with `{"a": 1}`."""
    remaining = list(errors)

    def integration(arguments):
        if remaining:
            raise TaskFailed(remaining.pop(0), json.dumps({"errorMessage": "boom"}))
        return {"a": 1, "arguments": arguments}

    return integration


def test_the_interpreter_retries_then_catches_with_the_error_output_and_assigns():
    task = {
        "Type": "Task",
        "Resource": "r",
        "Arguments": {"name": "{% $states.context.Execution.Name %}", "literal": "x"},
        "Retry": [
            {"ErrorEquals": ["Other"], "MaxAttempts": 5},
            {
                "ErrorEquals": ["Lambda.ServiceException"],
                "IntervalSeconds": 2,
                "BackoffRate": 3.0,
                "MaxAttempts": 2,
            },
        ],
        "Catch": [
            {
                "ErrorEquals": ["States.ALL"],
                "Assign": {"why": "{% $states.errorOutput.Error %}"},
                "Next": "Failed",
            }
        ],
        "Next": "Done",
    }
    states = {
        "Work": task,
        "Done": {"Type": "Succeed"},
        "Failed": {"Type": "Fail", "Error": "Stopped", "Cause": "{% 'because ' & $why %}"},
    }
    errors = ["Lambda.ServiceException"] * 3
    execution = run_execution(definition_of(**states), {}, "e1", {"r": failing(*errors)})

    assert (execution.status, execution.error, execution.cause) == (
        "FAILED",
        "Stopped",
        "because Lambda.ServiceException",
    )
    assert [r.detail["delay_seconds"] for r in execution.retries] == [2, 6]
    assert execution.states == ["Work", "Failed"]

    recovered = run_execution(definition_of(**states), {}, "e2", {"r": failing(*errors[:2])})
    assert recovered.status == "SUCCEEDED"
    assert recovered.output == {"a": 1, "arguments": {"name": "e2", "literal": "x"}}


def test_output_sees_the_variables_as_they_were_and_the_next_state_sees_the_new():
    states = {
        "One": {
            "Type": "Task",
            "Resource": "r",
            "Arguments": {},
            "Assign": {"x": 1},
            "Next": "Two",
        },
        "Two": {
            "Type": "Task",
            "Resource": "r",
            "Arguments": {},
            "Assign": {"x": "{% $x + $states.result.a %}"},
            "Output": "{% $x %}",
            "Next": "End",
        },
        "End": {"Type": "Succeed", "Output": "{% [$states.input, $x] %}"},
    }

    execution = run_execution(definition_of(**states), {}, "e", {"r": failing()})

    assert execution.output == [1, 2]


def test_task_failed_matches_every_error_but_a_timeout_and_a_bad_expression_is_an_error():
    def run(error: str, catch: list[str]) -> step_functions.Execution:
        states = {
            "Work": {
                "Type": "Task",
                "Resource": "r",
                "Arguments": {},
                "Catch": [{"ErrorEquals": catch, "Next": "Caught"}],
                "End": True,
            },
            "Caught": {"Type": "Succeed", "Output": "{% $states.input.Error %}"},
        }
        return run_execution(definition_of(**states), {}, "e", {"r": failing(error)})

    assert run("DynamoDB.ConditionalCheckFailedException", ["States.TaskFailed"]).output == (
        "DynamoDB.ConditionalCheckFailedException"
    )
    assert run("States.Timeout", ["States.TaskFailed"]).status == "FAILED"
    assert run("States.Timeout", ["States.ALL"]).output == "States.Timeout"

    bad = {
        "Work": {
            "Type": "Task",
            "Resource": "r",
            "Arguments": "{% $states.input.missing %}",
            "End": True,
        }
    }
    execution = run_execution(definition_of(**bad), {}, "e", {"r": failing()})
    assert (execution.status, execution.error) == ("FAILED", "States.QueryEvaluationError")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"Work": {"Type": "Choice", "Choices": []}}, "Choice states"),
        ({"Work": {"Type": "Task", "Resource": "r", "Parameters": {}, "End": True}}, "Parameters"),
        ({"Work": {"Type": "Task", "Resource": "other", "Arguments": {}, "End": True}}, "other"),
        (
            {
                "Work": {
                    "Type": "Task",
                    "Resource": "r",
                    "Arguments": {},
                    "TimeoutSeconds": 5,
                    "End": True,
                }
            },
            "TimeoutSeconds",
        ),
        ({"Work": {"Type": "Pass", "End": True}}, "Pass states"),
    ],
)
def test_the_interpreter_names_what_it_does_not_run(change, named):
    with pytest.raises(NotImplementedError, match=re.escape(named)):
        run_execution(definition_of(**change), {}, "e", {"r": failing()})
    jsonpath = {**definition_of(**change), "QueryLanguage": "JSONPath"}
    with pytest.raises(NotImplementedError, match="JSONPath"):
        run_execution(jsonpath, {}, "e", {"r": failing()})


def test_dynamodb_errors_become_the_states_errors(monkeypatch):
    from aws_fakes import fake_aws
    from moto import mock_aws

    fake_aws(monkeypatch, REGION)
    with mock_aws():
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        dynamodb.create_table(
            TableName="t",
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        update = step_functions.AwsIntegrations(REGION, {})["arn:aws:states:::dynamodb:updateItem"]
        arguments = {
            "TableName": "t",
            "Key": {"k": {"S": "a"}},
            "UpdateExpression": "SET v = :v",
            "ConditionExpression": "attribute_exists(k)",
            "ExpressionAttributeValues": {":v": {"S": "x"}},
        }
        with pytest.raises(TaskFailed) as conflict:
            update(arguments)
        assert conflict.value.error == "DynamoDB.ConditionalCheckFailedException"
        with iam_enforced.enforced([], REGION), pytest.raises(TaskFailed) as denied:
            update(arguments)
        assert denied.value.error == "DynamoDB.AmazonDynamoDBException"
        assert "not authorized to perform: dynamodb:UpdateItem on " in denied.value.cause


def test_the_harness_knows_the_training_job_rule_and_function_requests():
    def requests(service, operation, **params):
        found = iam_enforced.requests_of(service, operation, params, REGION, ACCOUNT)
        return [str(r) for r in found]

    job = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/ada-m1-1"
    role = f"arn:aws:iam::{ACCOUNT}:role/sm"
    tags = [{"Key": "user_id", "Value": "ada"}]
    assert requests(
        "sagemaker", "CreateTrainingJob", TrainingJobName="Ada-m1-1", RoleArn=role, Tags=tags
    ) == [
        f"sagemaker:CreateTrainingJob on {job}",
        f"sagemaker:AddTags on {job}",
        f"iam:PassRole on {role} with {{'iam:PassedToService': 'sagemaker.amazonaws.com'}}",
    ]
    assert requests("sagemaker", "DescribeTrainingJob", TrainingJobName="ada-m1-1") == [
        f"sagemaker:DescribeTrainingJob on {job}"
    ]
    assert requests("sagemaker", "ListTags", ResourceArn=job) == [f"sagemaker:ListTags on {job}"]
    rule = f"arn:aws:events:{REGION}:{ACCOUNT}:rule"
    assert requests("events", "PutTargets", Rule="R", Targets=[]) == [
        f"events:PutTargets on {rule}/R"
    ]
    assert requests("events", "PutRule", Name="R", EventBusName="bus") == [
        f"events:PutRule on {rule}/bus/R"
    ]
    function = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:f"
    for name, qualifier, resource in [
        ("f", None, function),
        ("f", "live", f"{function}:live"),
        (f"{ACCOUNT}:function:f", None, function),
        (f"{function}:3", None, f"{function}:3"),
    ]:
        params = {"FunctionName": name, **({"Qualifier": qualifier} if qualifier else {})}
        assert requests("lambda", "Invoke", **params) == [f"lambda:InvokeFunction on {resource}"]
