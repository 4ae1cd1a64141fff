"""The sagemaker backend's endpoint against an emulated SageMaker: moto's API, with each
endpoint served by the local router over a real tritonserver, from the archives in moto's S3
(`tests/sagemaker_endpoint_platform.py`). Notebook 03 on this platform is
`test_notebooks_sagemaker.py`'s."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.exceptions import ClientError
from sagemaker_endpoint_platform import (
    RUNTIME_URL_ENV,
    emulate_serving_runtime,
    install_endpoint_platform,
    training_output,
)

from helpers.infra.aws.endpoint import RUNTIME_MODEL_ENV, SageMakerEndpoint
from helpers.infra.aws.store import S3ArtifactStore
from helpers.ports.endpoint import NOT_DEPLOYED

pytestmark = pytest.mark.slow

BUCKET = "workshop-test"
PREFIX = f"s3://{BUCKET}/endpoints/workshop-mme/models/"
ROLE = "arn:aws:iam::123456789012:role/workshop-sagemaker"
PROMPT = "a photo of sks toy"
FAST = {"num_inference_steps": 2, "seed": 3}


def sagemaker_endpoint(region: str, name: str = "workshop-mme", **options) -> SageMakerEndpoint:
    """The product's endpoint, polling fast (the emulated one starts in seconds)."""
    return SageMakerEndpoint(
        region, ROLE, name=name, prefix_uri=PREFIX, poll_s=0.1, timeout_s=180, **options
    )


def wait_for(client, name: str, timeout: float = 120) -> dict:
    """DescribeEndpoint once it is no longer Creating or Updating."""
    deadline = time.monotonic() + timeout
    while True:
        answer = client.describe_endpoint(EndpointName=name)
        if answer["EndpointStatus"] not in ("Creating", "Updating"):
            return answer
        assert time.monotonic() < deadline, f"{name} still {answer['EndpointStatus']}"
        time.sleep(0.1)


def create_mme(client, name: str, prefix: str, environment: dict | None = None) -> None:
    """A MultiModel SageMaker model and endpoint config `name` on `prefix`."""
    client.create_model(
        ModelName=name,
        ExecutionRoleArn=ROLE,
        PrimaryContainer={
            "Image": "triton",
            "Mode": "MultiModel",
            "ModelDataUrl": prefix,
            "Environment": environment or {},
        },
    )
    client.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": name,
                "InstanceType": "ml.g5.xlarge",
                "InitialInstanceCount": 1,
            }
        ],
    )


def config_of(store, name: str) -> str:
    """The `config.pbtxt` in model `name`'s archive on the prefix."""
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(f"{PREFIX}{name}.tar.gz"))) as archive:
        return archive.extractfile(f"{name}/config.pbtxt").read().decode()


def environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def test_an_endpoint_creates_updates_fails_and_deletes_as_on_sagemaker(monkeypatch, tmp_path):
    """Under `mock_aws`: the lifecycle and the runtime path, with only the serving runtime's
    model (numpy, no torch) loaded."""
    from aws_fakes import fake_aws
    from moto import mock_aws
    from moto.sagemaker.models import SageMakerModelBackend

    from helpers.domain.runtime import read_status, status_request
    from helpers.infra.local.mme_router import CACHE_HEADER
    from helpers.services.serving_runtime import package_runtime

    region = "eu-west-1"
    fake_aws(monkeypatch, region)
    original_create = SageMakerModelBackend.create_endpoint
    with mock_aws(), install_endpoint_platform(tmp_path / "platform") as platform:
        store = S3ArtifactStore(region)
        store.create_bucket(BUCKET)
        site_packages = emulate_serving_runtime(tmp_path / "work")
        runtime = package_runtime(store, PREFIX, site_packages, root=str(tmp_path / "instance"))
        endpoint = sagemaker_endpoint(region)
        assert endpoint.runtime.meta.endpoint_url == platform.url

        assert endpoint.deploy(runtime=runtime).status == "Creating"
        described = endpoint.wait()
        assert described.status == "InService" and described.instance_type == "ml.g5.xlarge"
        # the runtime's model ran on Triton and installed it on the "instance"
        assert described.runtime["path"] == runtime.path
        assert described.runtime["parts"] == ["site-packages"]
        assert (Path(runtime.path) / "site-packages" / "EMULATED.txt").is_file()
        first = platform.local("workshop-mme")
        assert first.loaded_models() == [runtime.name]
        # the container's environment is the environment of Triton and its models
        assert environment_of(first.triton.pid)[RUNTIME_MODEL_ENV] == runtime.target_model

        body, content_type = status_request()
        answer = endpoint.runtime.invoke_endpoint(
            EndpointName="workshop-mme",
            TargetModel=runtime.target_model,
            ContentType=content_type,
            Body=body,
        )
        assert answer["InvokedProductionVariant"] == "AllTraffic"
        assert read_status(answer["Body"].read())["name"] == runtime.name
        assert CACHE_HEADER.lower() not in answer["ResponseMetadata"]["HTTPHeaders"]  # the router's
        with pytest.raises(ClientError, match="Endpoint missing-mme not found") as caught:
            endpoint.runtime.invoke_endpoint(
                EndpointName="missing-mme", TargetModel=runtime.target_model, Body=b"{}"
            )
        assert caught.value.response["Error"]["Code"] == "ValidationError"
        with pytest.raises(ClientError, match="Could not find model data") as caught:
            endpoint.runtime.invoke_endpoint(
                EndpointName="workshop-mme", TargetModel="demo-zed--m1.tar.gz", Body=b"{}"
            )
        assert caught.value.response["Error"]["Code"] == "ValidationError"

        # UpdateEndpoint: the new config starts beside the old one, which then stops
        client = endpoint.client
        other = f"s3://{BUCKET}/endpoints/other/models/"
        package_runtime(store, other, site_packages, root=str(tmp_path / "instance"))
        create_mme(client, "workshop-mme-v2", other, {RUNTIME_MODEL_ENV: runtime.target_model})
        client.update_endpoint(EndpointName="workshop-mme", EndpointConfigName="workshop-mme-v2")
        assert client.describe_endpoint(EndpointName="workshop-mme")["EndpointStatus"] in (
            "Updating",
            "InService",
        )
        updated = wait_for(client, "workshop-mme")
        assert updated["EndpointStatus"] == "InService", updated.get("FailureReason")
        assert updated["EndpointConfigName"] == "workshop-mme-v2"
        second = platform.local("workshop-mme")
        assert second is not first and second.prefix_uri == other
        assert not first.triton.is_running() and second.triton.is_running()
        assert endpoint.prepare()["path"] == runtime.path  # served by the new config

        # an update that cannot start rolls back: the endpoint serves as before
        create_mme(client, "no-bucket", "s3://no-such-bucket/models/")
        client.update_endpoint(EndpointName="workshop-mme", EndpointConfigName="no-bucket")
        rolled_back = wait_for(client, "workshop-mme")
        assert rolled_back["EndpointStatus"] == "InService"
        assert rolled_back["EndpointConfigName"] == "workshop-mme-v2"
        reason = rolled_back["FailureReason"]
        assert "Could not access model data at s3://no-such-bucket/" in reason
        assert platform.local("workshop-mme") is second and endpoint.prepare()

        # a new endpoint that cannot start: Failed, with SageMaker's reason
        broken = sagemaker_endpoint(region, name="broken-mme")
        client.create_endpoint(EndpointName="broken-mme", EndpointConfigName="no-bucket")
        with pytest.raises(RuntimeError, match=r"failed: .*Could not access model data"):
            broken.wait()
        with pytest.raises(ClientError, match="Cannot create already existing endpoint"):
            client.create_endpoint(EndpointName="broken-mme", EndpointConfigName="no-bucket")
        broken.stop()

        endpoint.stop()
        assert endpoint.describe().status == NOT_DEPLOYED
        assert not second.triton.is_running() and platform.tritonserver_pids() == []
    assert SageMakerModelBackend.create_endpoint is original_create
    assert RUNTIME_URL_ENV not in os.environ


@pytest.fixture
def platform(moto_server, tmp_path):
    with install_endpoint_platform(tmp_path / "platform") as platform:
        yield platform
    assert platform.tritonserver_pids() == []


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_per_user_models_and_a_shared_base_serve_from_the_emulated_s3(
    platform, tmp_path, lora_weights, tiny_pipeline_dir
):
    """The notebook's sagemaker path: the product's packaging for a GPU endpoint puts a
    runtime, two users' models and their adapters in S3; the SageMakerEndpoint deploys, waits
    and serves real pictures; a shared-base endpoint on the same prefix fetches the adapters
    from S3 inside Triton and draws the same pictures; stop() leaves no process."""
    from helpers.domain.serving import PerUserModels, SharedBase
    from helpers.services.serving import (
        adapter_prefix,
        adapter_source,
        package_shared_base,
        publish_user_model,
    )
    from helpers.services.serving_runtime import runtime_for, serving_base_model
    from helpers.workshop.serving_comparison import synthetic_adapter

    region = "us-east-1"  # the moto server's
    store = S3ArtifactStore(region)
    store.create_bucket(BUCKET)
    work_dir = tmp_path / "work"
    emulate_serving_runtime(work_dir)
    runtime = runtime_for(store, PREFIX, work_dir, str(tiny_pipeline_dir))
    assert runtime.has_base_model
    base = serving_base_model(str(tiny_pipeline_dir), runtime.path)
    second_lora = tmp_path / "bo.safetensors"
    second_lora.write_bytes(synthetic_adapter(lora_weights.read_bytes(), seed=1))
    users = {"demo-ada": lora_weights, "demo-bo": second_lora}
    for user, weights in users.items():
        output = training_output(store, f"s3://{BUCKET}/training/{user}/model.tar.gz", weights)
        publish_user_model(store, output, PREFIX, user, "m1", base, gpu=True, runtime=runtime.path)
    assert "kind: KIND_GPU" in config_of(store, "demo-ada--m1")  # for the ml.g5 instances

    endpoint = sagemaker_endpoint(region)
    endpoint.deploy(runtime=runtime)
    assert endpoint.wait().runtime["parts"] == ["site-packages", "base_model"]
    client, per_user = endpoint.runtime_client(), PerUserModels()
    expected = {
        f"{user}--m1": pixels(
            per_user.invoke(client, endpoint.name, f"{user}--m1", PROMPT, **FAST)[0]
        )
        for user in users
    }
    ada, bo = expected.values()
    assert ada.shape == (64, 64, 3) and np.abs(ada - bo).max() > 8  # each user's own LoRA
    assert endpoint.describe().status == "InService"
    local = platform.local(endpoint.name)
    assert set(local.loaded_models()) == {runtime.name, "demo-ada--m1", "demo-bo--m1"}

    # the shared base: one more archive on the prefix, reading adapters from S3 itself
    source = adapter_source(store, adapter_prefix(PREFIX))
    assert source == f"s3://{BUCKET}/endpoints/workshop-mme/adapters/"
    shared = package_shared_base(
        store, PREFIX, base, source, gpu=True, region=region, runtime=runtime.path
    )
    serving = SharedBase(shared.name)
    shared_endpoint = sagemaker_endpoint(region, name="workshop-shared")
    shared_endpoint.deploy(serving=serving, runtime=runtime)
    shared_endpoint.wait()
    assert shared_endpoint.serving() == serving
    for name in [*expected, *expected]:
        images = serving.invoke(client, shared_endpoint.name, name, PROMPT, **FAST)
        assert np.abs(pixels(images[0]) - expected[name]).max() <= 1, name
    shared_local = platform.local(shared_endpoint.name)
    assert set(shared_local.loaded_models()) == {runtime.name, shared.name}

    shared_endpoint.stop()
    endpoint.stop()
    assert endpoint.describe().status == NOT_DEPLOYED
    assert not local.triton.is_running() and not shared_local.triton.is_running()
    assert platform.tritonserver_pids() == []
    assert boto3.client("sagemaker", region_name=region).list_endpoints()["Endpoints"] == []
