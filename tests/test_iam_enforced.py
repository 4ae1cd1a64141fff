"""The API Lambda and the packaging Lambda under the IAM policies `cdk synth` gives their roles
(`tests/iam_enforced.py`), against moto: a user's whole journey, each call authorized first.

The journey runs the API as `helpers.lambdas.api_handler` builds it, with the environment the
stack sets (resolved for a test account), through every route a user uses: create the user
(admin), upload photos, presigned upload forms and collecting them, fine-tune, the model's
status, generation, key rotation and deleting the account. Between fine-tuning and generation
the packaging Lambda packages the training job's output under its own role; what the state
machine and the training job do in between (write the output, mark the model) happens as an
administrator, outside this check.

It runs for the default stack and for one whose endpoint has another name. Removing any one
statement of either role (but the log group's) makes the journey fail on one of its actions:
every statement is needed, none is broader than the journey shows.

The tests that synthesize the stack are slow (about 10 s for synthesis, 2 s per journey).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re

import boto3
import pytest
from aws_fakes import fake_aws

from helpers.workshop.aws_stack import node_problem

if (_NODE_PROBLEM := node_problem()) is not None:  # importing aws_cdk starts node
    pytest.skip(f"the CDK needs Node.js: {_NODE_PROBLEM}", allow_module_level=True)

import iam_enforced
from test_api_lambda import event, multipart

REGION = "eu-west-1"
BUCKET = "workshop-iam"
TABLE = "workshop-iam-models"
ADMIN_KEY = "operator-admin-key-0123456789"
API_HANDLER = "helpers.lambdas.api_handler.handler"
PACKAGE_HANDLER = "helpers.lambdas.workflow.package_handler"


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory) -> iam_enforced.Deployment:
    """The stack with the default props, or (parametrized) another endpoint name."""
    endpoint = {"endpoint_name": request.param} if hasattr(request, "param") else {}
    template = iam_enforced.synthesize(
        tmp_path_factory.mktemp("cdk.out"),
        admin_key_sha256=hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
        **endpoint,
    )
    return iam_enforced.Deployment(template, REGION, BUCKET, TABLE)


@pytest.fixture
def roles(deployment) -> dict[str, list[dict]]:
    """Each Lambda's policy statements, by handler."""
    return {
        handler: deployment.role_statements(deployment.function_role(handler))
        for handler in (API_HANDLER, PACKAGE_HANDLER)
    }


@pytest.fixture
def aws(deployment, monkeypatch, tmp_path):
    with deployed(deployment, monkeypatch, tmp_path) as backend:
        yield backend


@contextlib.contextmanager
def deployed(deployment, monkeypatch, tmp_path):
    """moto with what the stack creates (bucket, table, state machine), made as an
    administrator, and the API function's environment as the stack sets it."""
    from moto import mock_aws

    fake_aws(monkeypatch, REGION)
    environment = deployment.function_environment(API_HANDLER)
    # The bundle's folder (/var/task/...) is the checkout's here; Lambda's /tmp is tmp_path.
    del environment["WORKSHOP_MODEL_CODE_DIR"]
    environment["WORKSHOP_WORK_DIR"] = str(tmp_path)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        from helpers.backend import open_backend
        from helpers.settings import load_settings

        backend = open_backend(load_settings())
        backend.store.create_bucket(BUCKET)
        backend.metadata.create_table()
        trust = {"Version": "2012-10-17", "Statement": []}
        role = boto3.client("iam").create_role(
            RoleName="states", AssumeRolePolicyDocument=json.dumps(trust)
        )
        machine = boto3.client("stepfunctions").create_state_machine(
            name=deployment.state_machine_name(),
            definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}),
            roleArn=role["Role"]["Arn"],
        )["stateMachineArn"]
        assert machine == environment["WORKSHOP_STATE_MACHINE_ARN"]
        yield backend


def triton_answer(png: bytes) -> tuple[bytes, str]:
    """The endpoint's binary+json answer with one image, as Triton writes it."""
    import numpy as np
    from tritonclient.utils import serialize_byte_tensor

    data = serialize_byte_tensor(np.array([png], dtype=np.object_)).item()
    header = json.dumps(
        {
            "model_name": "ada--m1",
            "model_version": "1",
            "outputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
        }
    ).encode()
    content_type = f"application/vnd.sagemaker-triton.binary+json;json-header-size={len(header)}"
    return header + data, content_type


def journey(backend, deployment, roles, monkeypatch, tmp_path) -> iam_enforced.Enforcer:
    """A user's journey through the API, and the packaging of their model, each component under
    its role; an `AssertionError` naming the refused requests, if any, ends it at the first step
    that does not succeed."""
    with iam_enforced.enforced(roles[API_HANDLER], REGION) as enforcer:
        try:
            _steps(enforcer, backend, deployment, roles, monkeypatch, tmp_path)
        except Exception as error:
            if not enforcer.denied:
                raise
            denied = [str(r) for r in enforcer.denied]
            raise AssertionError(f"refused: {denied}") from error
    return enforcer


def _steps(enforcer, backend, deployment, roles, monkeypatch, tmp_path) -> None:
    import requests  # moto answers S3 for `requests` too
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    from helpers.domain.archives import write_tar_gz
    from helpers.domain.records import ModelStatus
    from helpers.lambdas.api_handler import make_handler
    from helpers.lambdas.workflow import package_handler
    from helpers.services.packaging import WEIGHTS
    from helpers.workshop.demo_subjects import get_demo_subject, subject_images
    from helpers.workshop.personalization import png_bytes

    images = [png_bytes(im) for im in subject_images(get_demo_subject("demo-ada"), count=6)]

    def call(method, path, key=None, body=None, content_type=None, expected=200) -> dict:
        answer = handler(event(method, path, key, body, content_type), None)
        assert answer["statusCode"] == expected, (
            f"{method} {path}: {answer['statusCode']} {answer['body'][:300]}; "
            f"denied: {[str(r) for r in enforcer.denied]}"
        )
        if answer.get("isBase64Encoded") or not answer["body"]:
            return {}
        return json.loads(answer["body"])

    handler = make_handler()
    assert call("GET", "/health")["backend"] == "sagemaker"
    key = call("POST", "/v1/users", ADMIN_KEY, {"user_id": "ada"}, expected=201)["api_key"]
    assert call("GET", "/v1/users/me", key)["user_id"] == "ada"
    body, content_type = multipart([(f"{i}.png", png) for i, png in enumerate(images[:3])])
    call("POST", "/v1/photos", key, body, content_type, expected=201)
    forms = call("POST", "/v1/photos/upload-urls", key, {"count": 3})["uploads"]
    for form, png in zip(forms, images[3:], strict=True):
        # S3 authorizes a presigned POST as the signer's (the API role's) PutObject.
        enforcer.authorize("s3", "PutObject", {"Bucket": BUCKET, "Key": form["fields"]["key"]})
        posted = requests.post(
            form["url"],
            data=form["fields"],
            files={"file": ("photo.png", png, "image/png")},
            timeout=10,
        )
        assert posted.status_code == 204, posted.text
    pending = call("GET", "/v1/photos/uploads", key)["uploads"]
    call("DELETE", f"/v1/photos/uploads/{pending[0]['id']}", key, expected=204)
    call("POST", "/v1/models", key, {"max_train_steps": 400}, expected=202)
    photos = call("GET", "/v1/photos", key)["photos"]
    assert len(photos) == 5
    call("DELETE", f"/v1/photos/{photos[0]['name']}", key, expected=204)
    assert [m["model_id"] for m in call("GET", "/v1/models", key)["models"]] == ["m1"]
    assert call("GET", "/v1/models/m1", key)["status"] == ModelStatus.REQUESTED.value

    with enforcer.as_admin():  # what the state machine and the training job do
        sfn = boto3.client("stepfunctions")
        [execution] = sfn.list_executions(
            stateMachineArn=deployment.function_environment(API_HANDLER)[
                "WORKSHOP_STATE_MACHINE_ARN"
            ]
        )["executions"]
        given = json.loads(sfn.describe_execution(executionArn=execution["executionArn"])["input"])
        weights = tmp_path / WEIGHTS
        weights.write_bytes(b"lora weights")
        output = given["training_output_uri"]
        backend.store.put_file(output, write_tar_gz(tmp_path / "model.tar.gz", {WEIGHTS: weights}))
        backend.metadata.update_model(
            "ada", "m1", expected_version=1, status=ModelStatus.TRAINING.value
        )
        backend.metadata.update_model(
            "ada", "m1", expected_version=2, status=ModelStatus.PACKAGING.value
        )

    # The state machine's Package state: the packaging Lambda, its environment and role.
    for name, value in deployment.function_environment(PACKAGE_HANDLER).items():
        if name != "WORKSHOP_MODEL_CODE_DIR":
            monkeypatch.setenv(name, value)
    enforcer.statements = roles[PACKAGE_HANDLER]
    packaged = package_handler({"user_id": "ada", "model_id": "m1", "training_output_uri": output})
    assert not enforcer.denied, [str(r) for r in enforcer.denied]
    enforcer.statements = roles[API_HANDLER]

    with enforcer.as_admin():  # the state machine's MarkAvailable
        backend.metadata.update_model(
            "ada", "m1", expected_version=3, status=ModelStatus.AVAILABLE.value, **packaged
        )
    assert call("GET", "/v1/models/m1", key)["status"] == ModelStatus.AVAILABLE.value

    answer, answer_type = triton_answer(images[0])
    runtime = sagemakerruntime_backends[DEFAULT_ACCOUNT_ID][REGION]
    runtime.results_queue.append((answer, answer_type, "AllTraffic", None))
    generated = handler(
        event("POST", "/v1/generations", key, {"prompt": "a photo of sks person"}), None
    )
    assert generated["statusCode"] == 200, (generated["body"], enforcer.denied)
    assert base64.b64decode(generated["body"]) == images[0]

    rotated = call("POST", "/v1/users/me/keys", key, expected=201)["api_key"]
    call("GET", "/v1/users/me", key, expected=401)
    call("DELETE", "/v1/users/me", rotated, expected=204)
    assert not enforcer.denied, [str(r) for r in enforcer.denied]

    # Nothing of the user is left: objects, records, executions.
    with enforcer.as_admin():
        leftovers = [
            uri
            for prefix in (
                f"s3://{BUCKET}/users/ada/",
                output.rsplit("/output/", 1)[0] + "/",
                f"s3://{BUCKET}/code/{given['training_job']['TrainingJobName']}/",
                f"s3://{BUCKET}/endpoints/",
            )
            for uri in backend.store.list(prefix)
        ]
        assert not leftovers
        assert backend.metadata.list_models("ada") == []
        stopped = sfn.describe_execution(executionArn=execution["executionArn"])
        assert stopped["status"] == "ABORTED"


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["workshop-mme", "other-mme"], indirect=True)
def test_a_users_journey_needs_nothing_the_roles_do_not_allow(
    aws, deployment, roles, monkeypatch, tmp_path
):
    enforcer = journey(aws, deployment, roles, monkeypatch, tmp_path)

    assert not enforcer.denied, [str(r) for r in enforcer.denied]
    actions = {r.action for r in enforcer.allowed}
    assert {
        "dynamodb:PutItem",
        "dynamodb:Query",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:ListBucket",
        "states:StartExecution",
        "states:StopExecution",
        "sagemaker:InvokeEndpoint",
    } <= actions


def refusal(statement: dict) -> str:
    """What `journey` says when it is refused one of `statement`'s actions (the first call
    refused may need another action of the same statement)."""
    actions = statement["Action"]
    refused = "|".join(re.escape(a) for a in ([actions] if isinstance(actions, str) else actions))
    return rf"refused: \[['\"]({refused}) on "


@pytest.mark.slow
@pytest.mark.parametrize(
    ("handler", "action", "resource"),
    [
        (API_HANDLER, "dynamodb:PutItem", "table/"),
        (API_HANDLER, "s3:PutObject", "/users/"),
        (API_HANDLER, "states:StartExecution", ":stateMachine:"),
        (PACKAGE_HANDLER, "s3:PutObject", "/models/"),
    ],
)
def test_without_one_statement_the_journey_fails(
    aws, deployment, roles, monkeypatch, tmp_path, handler, action, resource
):
    statements = roles[handler]
    index = iam_enforced.find_statement(statements, action, resource)
    roles[handler] = iam_enforced.without(statements, index)

    with pytest.raises(AssertionError, match=refusal(statements[index])):
        journey(aws, deployment, roles, monkeypatch, tmp_path)


@pytest.mark.slow
def test_every_statement_of_both_roles_is_needed(deployment, roles, tmp_path):
    """Least privilege, checked: the journey fails without any one statement but the log
    group's (Lambda's runtime writes the logs, not the code under test)."""
    for handler, statements in roles.items():
        for index, statement in enumerate(statements):
            if str(statement["Action"]).startswith("['logs:"):
                continue
            trial = {**roles, handler: iam_enforced.without(statements, index)}
            work = tmp_path / f"{handler}-{index}"
            work.mkdir()
            with (
                pytest.MonkeyPatch.context() as patch,
                deployed(deployment, patch, work) as aws,
                pytest.raises(AssertionError, match=refusal(statement)),
            ):
                journey(aws, deployment, trial, patch, work)


def test_the_evaluator_reads_wildcards_conditions_and_denies():
    endpoint = f"arn:aws:sagemaker:{REGION}:123456789012:endpoint/workshop-mme"
    invoke = {
        "Effect": "Allow",
        "Action": "sagemaker:InvokeEndpoint",
        "Resource": endpoint,
        "Condition": {"StringLike": {"sagemaker:TargetModel": "*--*.tar.gz"}},
    }
    users = {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::b/users/*"}

    def request(action, resource, **context):
        return iam_enforced.Request(action, resource, context)

    def allowed(statements, r):
        return iam_enforced.is_allowed(statements, r)

    user_model = {"sagemaker:TargetModel": "ada--m1.tar.gz"}
    assert allowed([invoke], request("sagemaker:invokeendpoint", endpoint, **user_model))
    assert not allowed([invoke], request("sagemaker:InvokeEndpoint", endpoint))
    base = {"sagemaker:TargetModel": "base.tar.gz"}
    assert not allowed([invoke], request("sagemaker:InvokeEndpoint", endpoint, **base))
    assert not allowed([invoke], request("sagemaker:InvokeEndpoint", endpoint + "2", **user_model))
    assert allowed([users], request("s3:GetObject", "arn:aws:s3:::b/users/ada/photos/x.png"))
    assert not allowed([users], request("s3:GetObject", "arn:aws:s3:::b/jobs/x"))
    assert not allowed([users], request("s3:PutObject", "arn:aws:s3:::b/users/ada/x"))
    deny = {**users, "Effect": "Deny", "Resource": "arn:aws:s3:::b/users/bo/*"}
    assert not allowed([users, deny], request("s3:GetObject", "arn:aws:s3:::b/users/bo/x"))


def test_each_call_becomes_the_requests_aws_authorizes_and_an_unknown_one_fails():
    def requests(service, operation, **params):
        found = iam_enforced.requests_of(service, operation, params, REGION, "123456789012")
        return [str(r) for r in found]

    table = f"arn:aws:dynamodb:{REGION}:123456789012:table/t"
    transaction = [{"ConditionCheck": {"TableName": "t"}}, {"Put": {"TableName": "t"}}]
    assert requests("dynamodb", "TransactWriteItems", TransactItems=transaction) == [
        f"dynamodb:ConditionCheckItem on {table}",
        f"dynamodb:PutItem on {table}",
    ]
    deleted = {"Objects": [{"Key": "users/a"}, {"Key": "jobs/j"}]}
    assert requests("s3", "DeleteObjects", Bucket="b", Delete=deleted) == [
        "s3:DeleteObject on arn:aws:s3:::b/users/a",
        "s3:DeleteObject on arn:aws:s3:::b/jobs/j",
    ]
    assert requests("s3", "HeadObject", Bucket="b", Key="k") == ["s3:GetObject on arn:aws:s3:::b/k"]
    with pytest.raises(NotImplementedError, match="sagemaker CreateCluster"):
        requests("sagemaker", "CreateCluster", ClusterName="c")
