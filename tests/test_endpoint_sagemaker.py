"""The SageMaker multi-model endpoint adapter, against moto."""

from __future__ import annotations

import json

import boto3
import pytest
from aws_fakes import fake_aws

from helpers.infra.aws.endpoint import SageMakerEndpoint, triton_image_uri

REGION = "eu-west-1"
PREFIX = "s3://workshop-test/endpoints/workshop-mme/models/"


@pytest.fixture
def endpoint(monkeypatch):
    from moto import mock_aws
    from moto.sagemaker.models import FakeEndpointConfig

    fake_aws(monkeypatch, REGION)
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
    assert endpoint.serving("workshop-mme").mode == "per-user"

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
    from helpers.domain.generation import build_request

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


@pytest.mark.parametrize(
    ("region", "registry"),
    [
        ("eu-west-1", "763104351884.dkr.ecr.eu-west-1.amazonaws.com"),
        ("af-south-1", "626614931356.dkr.ecr.af-south-1.amazonaws.com"),
        ("ap-southeast-3", "907027046896.dkr.ecr.ap-southeast-3.amazonaws.com"),
        ("eu-central-2", "380420809688.dkr.ecr.eu-central-2.amazonaws.com"),
        ("cn-north-1", "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn"),
    ],
)
def test_the_triton_image_comes_from_the_regions_dlc_registry(region, registry):
    assert triton_image_uri(region) == f"{registry}/sagemaker-tritonserver:25.09-py3"


def test_a_region_without_the_triton_image_is_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match="for region 'us-gov-west-1'") as caught:
        triton_image_uri("us-gov-west-1")
    assert "eu-west-1" in str(caught.value) and "cn-north-1" in str(caught.value)
    with pytest.raises(ValueError, match="'mars-1'"):
        SageMakerEndpoint("mars-1", "arn:aws:iam::123456789012:role/workshop-sagemaker")


def triton_answer(pngs: list[bytes]) -> tuple[bytes, str]:
    """What SageMaker's Triton container answers for the `images` output: a JSON header, then
    the BYTES tensor (each element a 4-byte little-endian length and its bytes)."""
    import numpy as np
    from tritonclient.utils import serialize_byte_tensor

    data = serialize_byte_tensor(np.array(pngs, dtype=np.object_)).item()  # a 0-d array
    header = json.dumps(
        {
            "model_name": "demo-ada--m1",
            "model_version": "1",
            "outputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [len(pngs)],
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
        }
    ).encode()
    content_type = f"application/vnd.sagemaker-triton.binary+json;json-header-size={len(header)}"
    return header + data, content_type


def test_invoke_decodes_the_images_of_tritons_answer(endpoint):
    import io

    from botocore.response import StreamingBody
    from botocore.stub import ANY, Stubber
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30)]
    pngs = []
    for colour in colours:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    body, content_type = triton_answer(pngs)
    stubber = Stubber(endpoint.runtime)
    stubber.add_response(
        "invoke_endpoint",
        {
            "Body": StreamingBody(io.BytesIO(body), len(body)),
            "ContentType": content_type,
            "InvokedProductionVariant": "AllTraffic",
        },
        {
            "EndpointName": "workshop-mme",
            "TargetModel": "demo-ada--m1.tar.gz",
            "ContentType": ANY,
            "Accept": "application/vnd.sagemaker-triton.binary+json",
            "Body": ANY,
        },
    )
    with stubber:
        images = endpoint.invoke(
            "workshop-mme", "demo-ada--m1.tar.gz", "a photo of sks toy", seed=3, num_images=2
        )
    stubber.assert_no_pending_responses()
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert [image.convert("RGB").getpixel((10, 10)) for image in images] == colours


def test_bad_arguments_are_refused_before_any_call(endpoint):
    with pytest.raises(ValueError, match="role_arn"):
        SageMakerEndpoint(REGION, "workshop-sagemaker")
    with pytest.raises(ValueError, match="model_prefix_uri"):
        endpoint.deploy("workshop-mme", "s3://workshop-test/models")
    with pytest.raises(ValueError, match="instance_type"):
        endpoint.deploy("workshop-mme", PREFIX, instance_type="g5.xlarge")
    assert boto3.client("sagemaker", region_name=REGION).list_models()["Models"] == []


def test_shared_base_mode_deploys_as_an_mme_holding_the_shared_model(endpoint, lora_weights):
    import io
    import tarfile

    from botocore.stub import Stubber

    from helpers.domain.serving import SharedBase
    from helpers.infra.aws.store import S3ArtifactStore
    from helpers.services.packaging import load_model_code
    from helpers.services.serving import (
        SHARED_MODEL_CODE,
        adapter_prefix,
        adapter_source,
        package_shared_base,
        publish_adapter,
    )

    store = S3ArtifactStore(REGION)
    store.create_bucket("workshop-test")
    adapters = adapter_prefix(PREFIX)
    publish_adapter(store, lora_weights, adapters, "demo-ada", "m1")
    with pytest.raises(ValueError, match="does not exist: package it first"):
        endpoint.deploy("workshop-mme", PREFIX, serving=SharedBase("shared-base-0"))
    assert endpoint.client.list_models()["Models"] == []

    source = adapter_source(store, adapters)
    assert source == "s3://workshop-test/endpoints/workshop-mme/adapters/"
    shared = package_shared_base(
        store, PREFIX, "stabilityai/stable-diffusion-2-1-base", source, gpu=True, region=REGION
    )
    serving = SharedBase(shared.name)
    description = endpoint.deploy("workshop-mme", PREFIX, serving=serving)
    assert description.status == "InService"
    container = endpoint.client.describe_model(ModelName="workshop-mme")["PrimaryContainer"]
    assert container["Mode"] == "MultiModel" and container["ModelDataUrl"] == PREFIX
    assert endpoint.serving("workshop-mme") == serving

    # what the container gets: the shared model, which reads the adapters from S3 itself
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(shared.uri))) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    config = files[f"{shared.name}/config.pbtxt"].decode()
    assert f'key: "adapter_source", value: {{ string_value: "{source}" }}' in config
    assert f'key: "aws_region", value: {{ string_value: "{REGION}" }}' in config
    assert "KIND_GPU" in config and not any(name.endswith(".safetensors") for name in files)
    shared_py = load_model_code(SHARED_MODEL_CODE / "1" / "model.py", "shared_model_parts")
    adapter_store = shared_py.open_adapter_source(source, REGION)
    assert adapter_store.fetch("demo-ada--m1") == lora_weights.read_bytes()
    with pytest.raises(shared_py.AdapterNotFound, match="unknown adapter 'demo-zed--m1'"):
        adapter_store.fetch("demo-zed--m1")

    # a user's request: the shared model is the target, the user's model name the adapter
    captured = {}
    endpoint.runtime.meta.events.register(
        "provide-client-params.*.InvokeEndpoint", lambda params, **_: captured.update(params)
    )
    stubber = Stubber(endpoint.runtime)
    stubber.add_client_error("invoke_endpoint", "ModelError", http_status_code=424)
    with stubber, pytest.raises(Exception, match="ModelError"):
        serving.invoke(endpoint.runtime, "workshop-mme", "demo-ada--m1", "a photo", seed=3)
    assert captured["TargetModel"] == f"{shared.name}.tar.gz"
    content_type = captured["ContentType"]
    header = json.loads(captured["Body"][: int(content_type.rsplit("=", 1)[1])])
    assert {i["name"] for i in header["inputs"]} == {"prompt", "seed", "adapter"}
    assert b"demo-ada--m1" in captured["Body"]
