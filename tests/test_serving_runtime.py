"""The serving runtime: the packages and base model a SageMaker endpoint's Triton image lacks,
delivered as one more model on the endpoint's prefix."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from helpers.domain.runtime import ServingRuntime, read_status, status_request
from helpers.infra.local.store import LocalArtifactStore
from helpers.services.packaging import build_archive, load_model_code, render_config
from helpers.services.serving import render_shared_config
from helpers.services.serving_runtime import (
    RUNTIME_CODE,
    build_site_packages,
    package_runtime,
    runtime_files,
    runtime_for,
    serving_base_model,
)

BUCKET = "workshop-test"
PREFIX = f"s3://{BUCKET}/endpoints/test/models/"


def runtime_model():
    return load_model_code(RUNTIME_CODE / "1" / "model.py", "triton_runtime_model")


def make_wheel(directory: Path, name: str = "workshop_marker", version: str = "0.1") -> Path:
    """A pure-Python wheel built by hand (no build backend, no index): a module saying hello."""
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"GREETING = 'hello from the runtime'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture
def site_packages(tmp_path) -> Path:
    folder = tmp_path / "site-packages" / "workshop_marker"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("GREETING = 'hello from the runtime'\n")
    return folder.parent


def test_site_packages_are_built_for_the_image_python_from_wheels_only(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("workshop-marker==0.1\n")
    offline = ("--no-index", "--find-links", str(wheels))

    built = build_site_packages(tmp_path / "runtime", requirements, "3.12", pip_args=offline)
    assert (built / "workshop_marker" / "__init__.py").read_text().startswith("GREETING")
    with pytest.raises(FileExistsError, match="exists"):
        build_site_packages(built, requirements, pip_args=offline)

    requirements.write_text("workshop-marker==0.2\n")  # no such wheel
    with pytest.raises(RuntimeError, match="pip could not install"):
        build_site_packages(tmp_path / "broken", requirements, pip_args=offline)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requirements.txt", "runtime", "wheels"]


def test_the_runtime_is_named_by_its_content_and_never_replaced(
    tmp_path, site_packages, tiny_pipeline_dir
):
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    first = package_runtime(store, PREFIX, site_packages, tiny_pipeline_dir)
    assert first.name.startswith("runtime-") and first.uri == f"{PREFIX}{first.name}.tar.gz"
    assert first.base_model == f"/tmp/workshop-runtime/{first.name}/base_model"
    again = package_runtime(store, PREFIX, site_packages, tiny_pipeline_dir)
    assert again == first

    (site_packages / "workshop_marker" / "__init__.py").write_text("GREETING = 'changed'\n")
    changed = package_runtime(store, PREFIX, site_packages, tiny_pipeline_dir)
    without_base = package_runtime(store, PREFIX, site_packages)
    assert len({first.name, changed.name, without_base.name}) == 3
    assert store.exists(first.uri) and store.exists(changed.uri)
    with pytest.raises(ValueError, match="no base model"):
        _ = without_base.base_model


def test_the_notebook_runtime_reuses_built_packages_and_carries_a_base_directory(
    tmp_path, site_packages, tiny_pipeline_dir
):
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    work_dir = tmp_path / "work"
    (work_dir / "serving-runtime").mkdir(parents=True)
    site_packages.rename(work_dir / "serving-runtime" / "site-packages")  # built before

    with_base = runtime_for(store, PREFIX, work_dir, str(tiny_pipeline_dir))
    hub = runtime_for(store, PREFIX, work_dir, "org/model")
    assert with_base.has_base_model and not hub.has_base_model
    assert store.exists(with_base.uri) and store.exists(hub.uri)


def test_a_base_model_of_symbolic_links_is_carried_as_its_files(tmp_path, site_packages):
    """A hub cache's snapshot links each file to a blob: the runtime carries the blobs."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    (snapshot / "unet").mkdir(parents=True)
    (blobs / "a1").write_text("{}")
    (blobs / "b2").write_bytes(b"weights")
    (snapshot / "model_index.json").symlink_to(blobs / "a1")
    (snapshot / "unet" / "weights.safetensors").symlink_to(blobs / "b2")

    files = runtime_files(site_packages, snapshot)
    assert files["1/base_model/model_index.json"].read_text() == "{}"
    assert files["1/base_model/unet/weights.safetensors"].read_bytes() == b"weights"
    with pytest.raises(ValueError, match=r"base_model: .* is not a directory"):
        runtime_files(site_packages, tmp_path / "missing")


def test_users_models_name_the_runtime_in_their_config():
    runtime = "/tmp/workshop-runtime/runtime-0123456789ab"
    assert f'key: "runtime", value: {{ string_value: "{runtime}" }}' in render_config(
        f"{runtime}/base_model", runtime=runtime
    )
    assert f'value: {{ string_value: "{runtime}" }}' in render_shared_config(
        "org/model", "s3://b/adapters/", runtime=runtime
    )
    assert 'key: "runtime", value: { string_value: "" }' in render_config("org/model")
    with pytest.raises(ValueError, match="runtime"):
        render_config("org/model", runtime='/tmp/x" }')


def test_the_endpoint_reads_a_base_directory_from_the_runtime_and_a_hub_id_as_it_is(
    tiny_pipeline_dir,
):
    runtime = "/tmp/workshop-runtime/runtime-0123456789ab"
    assert serving_base_model(str(tiny_pipeline_dir), runtime) == f"{runtime}/base_model"
    assert serving_base_model("s3://b/base-models/tiny/", runtime) == f"{runtime}/base_model"
    assert serving_base_model("org/model", runtime) == "org/model"
    assert serving_base_model(str(tiny_pipeline_dir), "") == str(tiny_pipeline_dir)


def test_a_user_model_uses_an_installed_runtime_and_explains_a_missing_one(tmp_path):
    model = load_model_code()
    runtime = tmp_path / "runtime-0123456789ab"
    with pytest.raises(RuntimeError, match=r"invoke its model \(runtime-0123456789ab\) once first"):
        model.use_runtime(str(runtime))
    (runtime / "site-packages").mkdir(parents=True)
    (runtime / "runtime.json").write_text("{}")
    saved = list(sys.path)
    try:
        model.use_runtime(str(runtime))
        model.use_runtime(str(runtime))
        assert sys.path[0] == str(runtime / "site-packages")
        assert sys.path.count(str(runtime / "site-packages")) == 1
    finally:
        sys.path[:] = saved
    model.use_runtime("")  # no runtime: nothing to do
    assert sys.path == saved


def install_from(source: Path, root: Path) -> str:
    return str(runtime_model().install(source, root, "runtime-0123456789ab"))


def test_concurrent_installs_leave_one_whole_runtime(tmp_path, site_packages):
    source = site_packages.parent
    (source / "base_model").mkdir()
    (source / "base_model" / "model_index.json").write_text("{}")
    root = tmp_path / "instance"
    stale = root / "runtime-0123456789ab"  # an earlier attempt that died half way
    stale.mkdir(parents=True)
    (stale / "half-copied").write_text("")
    with ProcessPoolExecutor(4) as pool:
        targets = set(pool.map(install_from, [source] * 4, [root] * 4))
    assert targets == {str(stale)}
    assert not (stale / "half-copied").exists()
    info = json.loads((stale / "runtime.json").read_text())
    assert info["parts"] == ["site-packages", "base_model"]
    assert (stale / "site-packages" / "workshop_marker" / "__init__.py").exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [stale.name]


@pytest.mark.slow
def test_on_a_real_triton_the_runtime_installs_itself_and_serves_a_user_model(
    tmp_path, site_packages, tiny_pipeline_dir, lora_weights
):
    """The SageMaker path on the local endpoint: the base model reaches the instance only
    through the runtime, and the user's model loads it from there."""
    from helpers.domain.generation import invoke_model
    from helpers.infra.local.endpoint import LocalEndpoint

    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    root = str(tmp_path / "instance")
    runtime = package_runtime(store, PREFIX, site_packages, tiny_pipeline_dir, root=root)
    archive = build_archive(
        "demo-ada--m1",
        lora_weights,
        runtime.base_model,
        tmp_path / "user.tar.gz",
        runtime=runtime.path,
    )
    store.put_file(f"{PREFIX}demo-ada--m1.tar.gz", archive)
    with LocalEndpoint(store, PREFIX, tmp_path / "endpoint", max_loaded_models=2) as endpoint:
        client = endpoint.runtime_client()
        with pytest.raises(ClientError, match="not installed on this instance"):
            invoke_model(client, endpoint.name, "demo-ada--m1.tar.gz", "a photo of sks toy")

        body, content_type = status_request()
        answer = client.invoke_endpoint(
            EndpointName=endpoint.name,
            TargetModel=runtime.target_model,
            ContentType=content_type,
            Body=body,
        )
        status = read_status(answer["Body"].read())
        assert status["path"] == runtime.path and status["parts"] == ["site-packages", "base_model"]
        assert (Path(runtime.base_model) / "model_index.json").is_file()

        images = invoke_model(
            client,
            endpoint.name,
            "demo-ada--m1.tar.gz",
            "a photo of sks toy",
            num_inference_steps=1,
        )
        assert len(images) == 1 and images[0].size == (64, 64)


def test_a_sagemaker_endpoint_records_its_runtime_and_prepare_loads_it(monkeypatch, site_packages):
    import io

    import boto3
    from aws_fakes import fake_aws
    from botocore.response import StreamingBody
    from botocore.stub import Stubber
    from moto import mock_aws
    from moto.sagemaker.models import FakeEndpointConfig

    from helpers.infra.aws.endpoint import SageMakerEndpoint
    from helpers.infra.aws.store import S3ArtifactStore

    fake_aws(monkeypatch, "eu-west-1")
    monkeypatch.setattr(FakeEndpointConfig, "validate_instance_type", lambda self, _: None)
    with mock_aws():
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        endpoint = SageMakerEndpoint("eu-west-1", "arn:aws:iam::123456789012:role/workshop")
        missing = ServingRuntime(
            "runtime-000000000000", f"{PREFIX}runtime-000000000000.tar.gz", 1, False
        )
        with pytest.raises(ValueError, match="package it first"):
            endpoint.deploy("workshop-mme", PREFIX, runtime=missing)

        runtime = package_runtime(S3ArtifactStore("eu-west-1"), PREFIX, site_packages)
        endpoint.deploy("workshop-mme", PREFIX, runtime=runtime)
        endpoint.wait("workshop-mme", timeout=5, poll=0.1)

        answer = {"name": runtime.name, "path": runtime.path, "parts": ["site-packages"]}
        body = json.dumps(
            {
                "outputs": [
                    {
                        "name": "runtime",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [json.dumps(answer)],
                    }
                ]
            }
        ).encode()
        request, content_type = status_request()
        with Stubber(endpoint.runtime) as stubber:
            stubber.add_response(
                "invoke_endpoint",
                {"Body": StreamingBody(io.BytesIO(body), len(body))},
                {
                    "EndpointName": "workshop-mme",
                    "TargetModel": runtime.target_model,
                    "ContentType": content_type,
                    "Body": request,
                },
            )
            assert endpoint.prepare("workshop-mme") == answer
            stubber.assert_no_pending_responses()

        endpoint.deploy("plain-mme", PREFIX)
        assert endpoint.prepare("plain-mme") is None  # no runtime recorded: nothing to load
