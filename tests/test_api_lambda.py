"""The API as AWS Lambda runs it (Mangum, API Gateway proxy events) against moto: S3, DynamoDB
and Step Functions. Onboarding on AWS starts the state machine with the training request."""

from __future__ import annotations

import base64
import hashlib
import json

import boto3
import pytest
from aws_fakes import fake_aws

from helpers.workshop.demo_subjects import get_demo_subject, subject_images
from helpers.workshop.personalization import png_bytes

REGION = "eu-west-1"
BUCKET = "workshop-artifacts"
ADMIN_KEY = "operator-admin-key-0123456789"


@pytest.fixture
def lambda_env(monkeypatch, tmp_path):
    from moto import mock_aws

    fake_aws(monkeypatch, REGION)
    with mock_aws():
        iam = boto3.client("iam", region_name=REGION)
        trust = {"Version": "2012-10-17", "Statement": []}
        role = iam.create_role(RoleName="sm", AssumeRolePolicyDocument=json.dumps(trust))
        role_arn = role["Role"]["Arn"]
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        machine = boto3.client("stepfunctions", region_name=REGION).create_state_machine(
            name="onboarding",
            definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}),
            roleArn=role_arn,
        )["stateMachineArn"]
        env = {
            "WORKSHOP_BACKEND": "sagemaker",
            "WORKSHOP_BUCKET": BUCKET,
            "WORKSHOP_REGION": REGION,
            "WORKSHOP_TABLE_NAME": "workshop-models",
            "WORKSHOP_BASE_MODEL": "stabilityai/stable-diffusion-2-1-base",
            "WORKSHOP_ROLE_ARN": role_arn,
            "WORKSHOP_WORK_DIR": str(tmp_path),
            "WORKSHOP_ENDPOINT_NAME": "workshop-mme",
            "WORKSHOP_STATE_MACHINE_ARN": machine,
            "WORKSHOP_ADMIN_KEY_SHA256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        from helpers.backend import open_backend
        from helpers.settings import load_settings

        open_backend(load_settings()).metadata.create_table()
        yield machine


def event(method: str, path: str, key: str | None = None, body=None, content_type=None) -> dict:
    """An API Gateway REST (v1) proxy event."""
    headers = {"host": "api.example.com"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    is_binary = isinstance(body, bytes)
    if body is not None and not is_binary:
        body = json.dumps(body)
        headers["content-type"] = "application/json"
    if content_type:
        headers["content-type"] = content_type
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": path,
            "stage": "prod",
            "requestId": "test",
            "identity": {"sourceIp": "127.0.0.1"},
        },
        "body": base64.b64encode(body).decode() if is_binary else body,
        "isBase64Encoded": is_binary,
    }


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "workshopboundary"
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_the_lambda_serves_the_api_and_onboarding_starts_the_state_machine(lambda_env):
    from helpers.lambdas.api_handler import make_handler

    handler = make_handler()
    assert json.loads(handler(event("GET", "/health"), None)["body"])["backend"] == "sagemaker"
    created = handler(event("POST", "/v1/users", ADMIN_KEY, {"user_id": "ada"}), None)
    assert created["statusCode"] == 201
    key = json.loads(created["body"])["api_key"]
    images = subject_images(get_demo_subject("demo-ada"), count=3)
    body, content_type = multipart([(f"{i}.png", png_bytes(im)) for i, im in enumerate(images)])
    uploaded = handler(event("POST", "/v1/photos", key, body, content_type), None)
    assert uploaded["statusCode"] == 201, uploaded["body"]
    started = handler(event("POST", "/v1/models", key, {"max_train_steps": 400}), None)
    assert started["statusCode"] == 202, started["body"]

    sfn = boto3.client("stepfunctions", region_name=REGION)
    [execution] = sfn.list_executions(stateMachineArn=lambda_env)["executions"]
    assert execution["name"] == "ada-m1"
    given = json.loads(sfn.describe_execution(executionArn=execution["executionArn"])["input"])
    job = given["training_job"]
    assert (given["user_id"], given["model_id"]) == ("ada", "m1")
    assert job["HyperParameters"]["max_train_steps"] == "400"
    assert job["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"].startswith(
        f"s3://{BUCKET}/users/ada/training/m1/"
    )
    assert given["training_output_uri"].endswith("/output/model.tar.gz")
    s3 = boto3.client("s3", region_name=REGION)
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="users/ada/training/m1/")["KeyCount"] == 3

    deleted = handler(event("DELETE", "/v1/users/me", key), None)
    assert deleted["statusCode"] == 204
    stopped = sfn.describe_execution(executionArn=execution["executionArn"])
    assert stopped["status"] == "ABORTED"  # Step Functions stops the .sync training job with it
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="users/ada/")["KeyCount"] == 0


def test_presigned_upload_urls_are_checked_when_fine_tuning_starts(lambda_env):
    import requests  # moto answers S3 for `requests` too

    from helpers.lambdas.api_handler import make_handler

    handler = make_handler()
    created = handler(event("POST", "/v1/users", ADMIN_KEY, {"user_id": "bo"}), None)
    key = json.loads(created["body"])["api_key"]
    body = {"count": 3, "content_type": "image/png"}
    answer = handler(event("POST", "/v1/photos/upload-urls", key, body), None)
    assert answer["statusCode"] == 200, answer["body"]
    uploads = json.loads(answer["body"])["uploads"]
    s3 = boto3.client("s3", region_name=REGION)
    images = subject_images(get_demo_subject("demo-bo"), count=3)
    for upload, image in zip(uploads, images, strict=True):
        assert upload["fields"]["key"] == f"users/bo/uploads/{upload['id']}"
        posted = requests.post(
            upload["url"],
            data=upload["fields"],
            files={"file": ("photo.png", png_bytes(image), "image/png")},
            timeout=10,
        )
        assert posted.status_code == 204, posted.text
    started = handler(event("POST", "/v1/models", key, {}), None)
    assert started["statusCode"] == 202, started["body"]
    photos = json.loads(handler(event("GET", "/v1/photos", key), None)["body"])
    assert photos["count"] == 3
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="users/bo/uploads/")["KeyCount"] == 0


def test_the_lambda_refuses_to_start_without_its_deployment_settings(monkeypatch):
    from helpers.lambdas.api_handler import deployment_env

    with pytest.raises(RuntimeError, match="WORKSHOP_STATE_MACHINE_ARN"):
        deployment_env({"WORKSHOP_ENDPOINT_NAME": "x"})


def test_the_serving_mode_comes_from_the_environment():
    from helpers.lambdas.api_handler import serving_from_env

    assert serving_from_env({}).route("ada--m1") == ("ada--m1.tar.gz", {})
    shared = {"WORKSHOP_SERVING_MODE": "shared-base", "WORKSHOP_SHARED_MODEL": "shared-base-ab"}
    assert serving_from_env(shared).route("ada--m1") == (
        "shared-base-ab.tar.gz",
        {"adapter": "ada--m1"},
    )
    with pytest.raises(RuntimeError, match="shared_model"):
        serving_from_env({"WORKSHOP_SERVING_MODE": "shared-base"})


def test_every_lambda_instance_counts_on_the_same_dynamodb_counters(lambda_env):
    from mangum import Mangum

    from helpers.api import create_app
    from helpers.api.quotas import QuotaLimits
    from helpers.infra.aws.quotas import DynamoDbQuotaCounters
    from helpers.lambdas.api_handler import services_from_env

    instances = []
    for _ in range(2):  # two cold starts: two apps, two clients, one table
        services = services_from_env()
        assert isinstance(services.counters, DynamoDbQuotaCounters)
        services.limits = QuotaLimits(admin_per_minute=3)
        instances.append(Mangum(create_app(services), lifespan="off"))
    answers = [
        instances[i % 2](event("POST", "/v1/users", ADMIN_KEY, {"user_id": f"u{i}"}), None)
        for i in range(4)
    ]
    assert [a["statusCode"] for a in answers] == [201, 201, 201, 429]
    assert int(answers[3]["headers"]["retry-after"]) >= 1
    error = json.loads(answers[3]["body"])["error"]
    assert (error["code"], error["field"]) == ("rate_limited", "admin_per_minute")


def test_the_lambda_counts_anonymous_requests_per_source_address(lambda_env):
    from mangum import Mangum

    from helpers.api import create_app
    from helpers.api.quotas import QuotaLimits
    from helpers.lambdas.api_handler import services_from_env

    services = services_from_env()
    services.limits = QuotaLimits(anonymous_per_minute=2)
    handler = Mangum(create_app(services), lifespan="off")

    def health(address: str, forwarded_for: str = "198.51.100.1") -> int:
        request = event("GET", "/health")
        request["requestContext"]["identity"]["sourceIp"] = address
        # A client writes X-Forwarded-For itself: it must not pick the counter.
        request["headers"]["x-forwarded-for"] = forwarded_for
        request["multiValueHeaders"]["x-forwarded-for"] = [forwarded_for]
        return handler(request, None)["statusCode"]

    assert [health("203.0.113.7", f"198.51.100.{i}") for i in range(3)] == [200, 200, 429]
    assert health("203.0.113.8") == 200  # another address has its own count
