"""The SageMaker multi-model endpoint adapter, against moto."""

from __future__ import annotations

import json

import boto3
import pytest

from helpers.adapters.sagemaker_endpoint import SageMakerEndpoint, triton_image_uri

REGION = "eu-west-1"
PREFIX = "s3://workshop-test/endpoints/workshop-mme/models/"


@pytest.fixture
def endpoint(monkeypatch):
    from moto import mock_aws
    from moto.sagemaker.models import FakeEndpointConfig

    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    # moto's allow-list of instance types stops before the g5 family.
    monkeypatch.setattr(FakeEndpointConfig, "validate_instance_type", lambda self, _: None)
    with mock_aws():
        yield SageMakerEndpoint(REGION, "arn:aws:iam::123456789012:role/workshop-sagemaker")


def test_deploy_creates_a_triton_multi_model_endpoint_and_delete_removes_it(endpoint):
    description = endpoint.deploy("workshop-mme", PREFIX)
    assert description.status == "InService" and description.instance_type == "ml.g5.xlarge"
    model = endpoint.client.describe_model(ModelName="workshop-mme")
    container = model["PrimaryContainer"]
    assert container["Mode"] == "MultiModel" and container["ModelDataUrl"] == PREFIX
    assert container["Image"] == triton_image_uri(REGION)
    assert container["Image"].startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/")
    assert model["ExecutionRoleArn"].endswith(":role/workshop-sagemaker")
    config = endpoint.client.describe_endpoint_config(EndpointConfigName="workshop-mme")
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.g5.xlarge"
    assert endpoint.wait("workshop-mme", timeout=5, poll=0.1).status == "InService"

    endpoint.delete("workshop-mme")
    assert endpoint.client.list_endpoints()["Endpoints"] == []
    assert endpoint.client.list_models()["Models"] == []


def test_invoke_names_the_target_model_and_sends_triton_binary_json(endpoint):
    from botocore.stub import Stubber

    stubber = Stubber(endpoint.runtime)
    captured = {}

    def keep(params, **_):
        captured.update(params)

    endpoint.runtime.meta.events.register("provide-client-params.*.InvokeEndpoint", keep)
    from helpers.mme_client import build_request

    _, content_type = build_request("a photo of sks toy", seed=3)
    stubber.add_client_error("invoke_endpoint", "ModelError", http_status_code=424)
    with stubber, pytest.raises(Exception, match="ModelError"):
        endpoint.invoke("workshop-mme", "demo-ada--m1.tar.gz", "a photo of sks toy", seed=3)
    assert captured["TargetModel"] == "demo-ada--m1.tar.gz"
    assert captured["ContentType"] == content_type
    assert content_type.startswith("application/vnd.sagemaker-triton.binary+json;json-header-size=")
    header = json.loads(captured["Body"][: int(content_type.rsplit("=", 1)[1])])
    assert {i["name"] for i in header["inputs"]} == {"prompt", "seed"}
    assert header["outputs"] == [{"name": "images", "parameters": {"binary_data": True}}]


def test_bad_arguments_are_refused_before_any_call(endpoint):
    with pytest.raises(ValueError, match="role_arn"):
        SageMakerEndpoint(REGION, "workshop-sagemaker")
    with pytest.raises(ValueError, match="model_prefix_uri"):
        endpoint.deploy("workshop-mme", "s3://workshop-test/models")
    with pytest.raises(ValueError, match="instance_type"):
        endpoint.deploy("workshop-mme", PREFIX, instance_type="g5.xlarge")
    assert boto3.client("sagemaker", region_name=REGION).list_models()["Models"] == []
