"""One `Endpoint` interface, two backends: the SageMaker adapter against moto and botocore's
Stubber (fast), the local one on a real tritonserver (slow)."""

from __future__ import annotations

import ast
import csv
import datetime
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aws_fakes import fake_aws

from helpers.domain.runtime import ServingRuntime, status_request
from helpers.domain.serving import PerUserModels
from helpers.infra.aws.endpoint import (
    INSTANCE_NAMESPACES,
    LOADING_NAMESPACE,
    RUNTIME_MODEL_ENV,
    SageMakerEndpoint,
)
from helpers.infra.local.endpoint import LocalEndpoint
from helpers.ports.endpoint import IN_SERVICE, NOT_DEPLOYED, Endpoint, EndpointDescription
from helpers.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REGION = "eu-west-1"
ROLE = "arn:aws:iam::123456789012:role/workshop-sagemaker"
BUCKET = "workshop-test"
PREFIX = f"s3://{BUCKET}/endpoints/workshop-mme/models/"
RUNTIME = ServingRuntime("runtime-0123456789ab", f"{PREFIX}runtime-0123456789ab.tar.gz", 1, False)


# ------------------------------------------------------------------------------ the port


def test_the_port_imports_neither_boto3_nor_any_backend():
    code = (
        "import sys, helpers.ports.endpoint; "
        "bad = [m for m in sys.modules if m == 'boto3' or m.startswith(('helpers.infra', "
        "'helpers.services'))]; sys.exit(str(bad) if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tree = ast.parse((ROOT / "src/helpers/ports/endpoint.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("helpers.infra", "helpers.services"))]


def test_both_endpoints_are_the_interface_with_its_verbs():
    verbs = {"deploy", "wait", "describe", "runtime_client", "runtime_client_options", "stop"}
    verbs |= {"loaded_models", "evictions", "metrics", "unload_all"}
    for cls in (LocalEndpoint, SageMakerEndpoint):
        assert issubclass(cls, Endpoint) and not cls.__abstractmethods__
        assert verbs <= set(dir(cls))
    assert LocalEndpoint.can_unload and not SageMakerEndpoint.can_unload
    assert SageMakerEndpoint.metrics_period_s == 60 and LocalEndpoint.metrics_period_s == 1
    text = str(
        EndpointDescription("e", IN_SERVICE, instance_type="ml.g5.xlarge", runtime={"name": "r"})
    )
    assert text == "endpoint e: InService on ml.g5.xlarge; serving runtime r loaded"


def test_a_local_endpoint_not_started_says_so_without_starting(tmp_path):
    from helpers.infra.local.store import LocalArtifactStore

    endpoint = LocalEndpoint(LocalArtifactStore(tmp_path / "store"), PREFIX, tmp_path / "e")
    assert endpoint.describe().status == NOT_DEPLOYED and endpoint.url.startswith("http://127.")
    assert endpoint.loaded_models() == [] and endpoint.evictions() == []
    assert endpoint.metrics() == {} and endpoint.unload_all() == []
    with pytest.raises(RuntimeError, match="deploy"):
        endpoint.wait()
    endpoint.stop()  # nothing to stop: fine
    options = endpoint.runtime_client_options()
    assert options["endpoint_url"] == endpoint.url
    assert endpoint.runtime_client().meta.endpoint_url == endpoint.url


# ----------------------------------------------------------------------- SageMaker, moto


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws
    from moto.sagemaker.models import FakeEndpointConfig

    fake_aws(monkeypatch, REGION)
    # moto's allow-list of instance types stops before the g5 family.
    monkeypatch.setattr(FakeEndpointConfig, "validate_instance_type", lambda self, _: None)
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_object(Bucket=BUCKET, Key=RUNTIME.uri.split("/", 3)[3], Body=b"runtime")
        yield


def settings(tmp_path, **values) -> Settings:
    values = {"role_arn": ROLE, **values}
    return Settings(
        backend="sagemaker",
        work_dir=tmp_path,
        base_model="org/model",
        region=REGION,
        bucket=BUCKET,
        **values,
    )


def status_answer(report: dict) -> bytes:
    data = [json.dumps(report)]
    outputs = [{"name": "runtime", "datatype": "BYTES", "shape": [1], "data": data}]
    return json.dumps({"outputs": outputs}).encode()


def test_sagemaker_endpoint_deploys_waits_and_stops_through_the_interface(aws, tmp_path):
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from helpers.backend import open_backend

    backend = open_backend(settings(tmp_path))
    endpoint = backend.endpoint(max_loaded_models=2)  # SageMaker ignores the budget
    assert isinstance(endpoint, SageMakerEndpoint) and isinstance(endpoint, Endpoint)
    assert (endpoint.name, endpoint.prefix_uri) == ("workshop-mme", PREFIX)
    assert endpoint.describe().status == NOT_DEPLOYED and endpoint.url is None
    with pytest.raises(RuntimeError, match="not deployed"):
        endpoint.wait(timeout=1)

    deployed = endpoint.deploy(serving=PerUserModels(), runtime=RUNTIME)
    assert deployed.in_service and deployed.instance_type == "ml.g5.xlarge"
    container = endpoint.client.describe_model(ModelName="workshop-mme")["PrimaryContainer"]
    assert container["ModelDataUrl"] == PREFIX and container["Mode"] == "MultiModel"
    assert container["Environment"][RUNTIME_MODEL_ENV] == RUNTIME.target_model
    with pytest.raises(RuntimeError, match=r"exists \(InService\).*stop\(\)"):
        endpoint.deploy(serving=PerUserModels())

    # wait(): in service, then the serving runtime loaded by one request to its model
    report = {"name": RUNTIME.name, "path": RUNTIME.path, "parts": ["site-packages"]}
    body = status_answer(report)
    request, content_type = status_request()
    with Stubber(endpoint.runtime) as stubber:
        stubber.add_response(
            "invoke_endpoint",
            {"Body": StreamingBody(io.BytesIO(body), len(body))},
            {
                "EndpointName": "workshop-mme",
                "TargetModel": RUNTIME.target_model,
                "ContentType": content_type,
                "Body": request,
            },
        )
        ready = endpoint.wait(timeout=5)
        stubber.assert_no_pending_responses()
    assert ready.in_service and ready.runtime == report
    assert f"serving runtime {RUNTIME.name} loaded" in str(ready)

    assert endpoint.runtime_client() is endpoint.runtime
    assert endpoint.runtime_client_options() == {
        "region_name": REGION,
        "endpoint_url": f"https://runtime.sagemaker.{REGION}.amazonaws.com",
    }
    # what SageMaker cannot tell or do
    assert endpoint.loaded_models() is None and endpoint.evictions() is None
    assert endpoint.unload_all() is None

    endpoint.stop()
    client = endpoint.client
    assert client.list_endpoints()["Endpoints"] == [] and client.list_models()["Models"] == []
    assert client.list_endpoint_configs()["EndpointConfigs"] == []
    endpoint.stop()  # twice: fine
    assert endpoint.describe().status == NOT_DEPLOYED
    assert endpoint.deploy(serving=PerUserModels()).in_service  # deployed again
    assert endpoint.wait(timeout=5).runtime is None  # no runtime this time: nothing to load
    endpoint.stop()


def test_the_older_by_name_methods_still_act_on_any_endpoint(aws):
    endpoint = SageMakerEndpoint(REGION, ROLE)
    assert endpoint.deploy("other-mme", PREFIX, instance_type="ml.g5.2xlarge").in_service
    assert endpoint.wait("other-mme", timeout=5, poll=0.1).runtime is None  # polls only
    assert endpoint.describe("other-mme").instance_type == "ml.g5.2xlarge"
    assert endpoint.describe().status == NOT_DEPLOYED  # its own endpoint is another
    with pytest.raises(ValueError, match="model_prefix_uri"):
        endpoint.deploy()  # made without a prefix
    endpoint.delete("other-mme")


def test_a_sagemaker_role_comes_from_the_session_when_settings_name_none(aws, tmp_path):
    from helpers.backend import open_backend

    backend = open_backend(settings(tmp_path, role_arn=None))
    backend.execution_role = lambda: ROLE  # what Studio's session would give
    assert backend.endpoint().role_arn == ROLE
    assert backend.endpoint(role_arn=ROLE.replace("workshop", "x")).role_arn.endswith(
        "/x-sagemaker"
    )


def test_deploy_waits_out_a_deletion_in_progress():
    import boto3
    from botocore.stub import ANY, Stubber

    client = boto3.client(
        "sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    endpoint = SageMakerEndpoint(
        REGION, ROLE, client=client, s3=object(), prefix_uri=PREFIX, poll_s=0, image_uri="i"
    )
    config = {
        "EndpointConfigName": "workshop-mme",
        "EndpointConfigArn": "arn:aws:sagemaker:eu-west-1:1:endpoint-config/workshop-mme",
        "ProductionVariants": [
            {
                "VariantName": "AllTraffic",
                "ModelName": "workshop-mme",
                "InstanceType": "ml.g5.xlarge",
            }
        ],
        "CreationTime": datetime.datetime(2025, 1, 1),
    }

    def described(status: str) -> dict:
        return {
            "EndpointName": "workshop-mme",
            "EndpointArn": "arn:aws:sagemaker:eu-west-1:1:endpoint/workshop-mme",
            "EndpointConfigName": "workshop-mme",
            "EndpointStatus": status,
            "CreationTime": datetime.datetime(2025, 1, 1),
            "LastModifiedTime": datetime.datetime(2025, 1, 1),
        }

    name = {"EndpointName": "workshop-mme"}
    with Stubber(client) as stubber:
        stubber.add_response("describe_endpoint", described("Deleting"), name)
        stubber.add_response("describe_endpoint_config", config)
        stubber.add_client_error(
            "describe_endpoint",
            "ValidationException",
            'Could not find endpoint "workshop-mme".',
            expected_params=name,
        )
        stubber.add_response(
            "create_model", {"ModelArn": "arn:aws:sagemaker:eu-west-1:1:model/workshop-mme"}
        )
        stubber.add_response(
            "create_endpoint_config",
            {"EndpointConfigArn": "arn:aws:sagemaker:eu-west-1:1:endpoint-config/workshop-mme"},
        )
        stubber.add_response(
            "create_endpoint",
            {"EndpointArn": "arn:aws:sagemaker:eu-west-1:1:endpoint/workshop-mme"},
            {**name, "EndpointConfigName": ANY},
        )
        stubber.add_response("describe_endpoint", described("Creating"), name)
        stubber.add_response("describe_endpoint_config", config)
        assert endpoint.deploy().status == "Creating"
        stubber.assert_no_pending_responses()


def test_sagemaker_metrics_come_from_cloudwatch_and_are_empty_before_datapoints():
    import boto3
    from botocore.stub import ANY, Stubber

    cloudwatch = boto3.client(
        "cloudwatch", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    endpoint = SageMakerEndpoint(
        REGION,
        ROLE,
        client=object(),
        runtime=object(),
        s3=object(),
        cloudwatch=cloudwatch,
        image_uri="i",
    )
    dimensions = [
        {"Name": "EndpointName", "Value": "workshop-mme"},
        {"Name": "VariantName", "Value": "AllTraffic"},
    ]

    def expect(stubber, namespace, metric, statistics, datapoints):
        stubber.add_response(
            "get_metric_statistics",
            {"Label": metric, "Datapoints": datapoints},
            {
                "Namespace": namespace,
                "MetricName": metric,
                "Dimensions": dimensions,
                "StartTime": ANY,
                "EndTime": ANY,
                "Period": ANY,
                "Statistics": statistics,
            },
        )

    minute = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
    summed = ["ModelCacheHit", "ModelLoadingWaitTime", "ModelDownloadingTime"]
    summed += ["ModelLoadingTime", "ModelUnloadingTime"]
    with Stubber(cloudwatch) as stubber:  # nothing published yet: an empty mapping
        for namespace in INSTANCE_NAMESPACES:
            expect(stubber, namespace, "LoadedModelCount", ["Maximum"], [])
        for metric in summed:
            expect(stubber, LOADING_NAMESPACE, metric, ["Sum", "SampleCount"], [])
        assert endpoint.metrics() == {}
        stubber.assert_no_pending_responses()

    with Stubber(cloudwatch) as stubber:
        loaded = [
            {"Timestamp": minute, "Maximum": 2.0},
            {"Timestamp": minute + datetime.timedelta(minutes=1), "Maximum": 3.0},
        ]
        expect(stubber, INSTANCE_NAMESPACES[0], "LoadedModelCount", ["Maximum"], loaded)
        hits = [
            {"Timestamp": minute, "Sum": 1.0, "SampleCount": 4.0},
            {"Timestamp": minute, "Sum": 5.0, "SampleCount": 6.0},
        ]
        expect(stubber, LOADING_NAMESPACE, "ModelCacheHit", ["Sum", "SampleCount"], hits)
        loading = [{"Timestamp": minute, "Sum": 3e6, "SampleCount": 2.0}]
        expect(stubber, LOADING_NAMESPACE, "ModelLoadingWaitTime", ["Sum", "SampleCount"], loading)
        for metric in summed[2:]:
            expect(stubber, LOADING_NAMESPACE, metric, ["Sum", "SampleCount"], [])
        assert endpoint.metrics() == {
            "LoadedModelCount": 3.0,  # the newest minute's
            "ModelCacheHit_sum": 6.0,
            "ModelCacheHit_count": 10.0,
            "ModelLoadingWaitTime_sum": 3e6,
            "ModelLoadingWaitTime_count": 2.0,
        }
        stubber.assert_no_pending_responses()


def test_a_load_test_of_a_sagemaker_endpoint_invokes_through_boto3(
    moto_server, tmp_path, monkeypatch
):
    """A real locust run whose clients call `invoke_endpoint` through boto3 (moto answers);
    CloudWatch has no datapoints yet, so no metrics are sampled."""
    from moto.sagemaker.models import FakeEndpointConfig

    from helpers.workshop.loadtest import load_test

    monkeypatch.setattr(FakeEndpointConfig, "validate_instance_type", lambda self, _: None)
    endpoint = SageMakerEndpoint(REGION, ROLE, prefix_uri=PREFIX, poll_s=0.1)
    assert endpoint.runtime_client_options()["endpoint_url"] == moto_server
    endpoint.deploy(serving=PerUserModels())
    endpoint.wait(timeout=5)
    targets = ["demo-ada--m1.tar.gz", "demo-bo--m1.tar.gz"]
    result = load_test(endpoint, targets, tmp_path / "load", users=2, duration_s=2)
    endpoint.stop()
    assert result.requests >= 2 and result.failures == 0, result
    with (tmp_path / "load" / "requests.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {row["target"] for row in rows} <= set(targets)
    assert {row["status"] for row in rows} == {"200"} and {row["cache"] for row in rows} == {""}
    assert result.cache_hit_ratio is None and result.max_loaded_models is None
    history = (tmp_path / "load" / "locust_stats_history.csv").read_text()
    assert "invoke" in history  # locust counted the boto3 calls as requests


# --------------------------------------------------------------------- local, real Triton


@pytest.mark.slow
def test_a_local_endpoint_through_the_interface(tmp_path, lora_weights, tiny_pipeline_dir):
    import matplotlib

    from helpers.domain.generation import invoke_model
    from helpers.infra.local.store import LocalArtifactStore
    from helpers.services.packaging import build_archive
    from helpers.workshop.loadtest import load_test, plot_load_test

    matplotlib.use("Agg")
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    users = ["demo-ada", "demo-bo"]
    for user in users:
        archive = build_archive(
            f"{user}--m1", lora_weights, str(tiny_pipeline_dir), tmp_path / f"{user}.tar.gz"
        )
        store.put_file(f"{PREFIX}{user}--m1.tar.gz", archive)
    endpoint: Endpoint = LocalEndpoint(store, PREFIX, tmp_path / "endpoint", max_loaded_models=1)
    try:
        assert endpoint.deploy(serving=PerUserModels()).in_service
        assert endpoint.wait().url == endpoint.url
        runtime = endpoint.runtime_client()
        for user in users:
            invoke_model(
                runtime, endpoint.name, f"{user}--m1.tar.gz", "a toy", num_inference_steps=1
            )
        assert endpoint.loaded_models() == ["demo-bo--m1"]
        assert endpoint.evictions() == ["demo-ada--m1"]
        metrics = endpoint.metrics()
        assert metrics["LoadedModelCount"] == 1 and metrics["ModelCacheHit_count"] == 2
        assert metrics["ModelCacheHit_sum"] == 0 and metrics["ModelLoadingTime_count"] == 2
        assert endpoint.unload_all() == ["demo-bo--m1"] and endpoint.loaded_models() == []

        targets = [f"{user}--m1.tar.gz" for user in users]
        # Long enough for cold loads on a busy machine (one takes seconds) to be sampled.
        result = load_test(endpoint, targets, tmp_path / "load", users=2, duration_s=15)
        assert result.failures == 0 and result.requests >= 2
        assert result.max_loaded_models is not None and result.max_loaded_models <= 1
        assert result.cache_hit_ratio is not None and result.cold_median_ms is not None
        with (tmp_path / "load" / "metrics.csv").open() as file:
            samples = list(csv.DictReader(file))
        assert len(samples) >= 3 and float(samples[-1]["invocations"]) > 2
        assert len(plot_load_test({"local": result}).axes) == 4

        endpoint.stop()
        assert endpoint.describe().status == NOT_DEPLOYED and endpoint.metrics() == {}
        assert endpoint.deploy().in_service  # deployed again: nothing loaded
        assert endpoint.loaded_models() == []
    finally:
        endpoint.stop()
    assert not endpoint.triton.is_running()
