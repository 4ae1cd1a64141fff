"""The onboarding state machine's packaging function, against S3 in moto.

The tests that package real LoRA weights (two training steps, a session fixture) are slow.
"""

from __future__ import annotations

import pytest
from aws_fakes import fake_aws

from helpers.domain.archives import safe_extract, write_tar_gz
from helpers.lambdas.workflow import package_handler
from helpers.ports.store import ObjectNotFound
from helpers.services.packaging import MODEL_CODE, WEIGHTS
from helpers.settings import SettingsError

BUCKET = "workshop-lambdas"
REGION = "eu-west-1"
BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"
OUTPUT = f"s3://{BUCKET}/jobs/ada-m1-1a2b3c4d/output/model.tar.gz"
PREFIX = f"s3://{BUCKET}/endpoints/workshop-mme/models/"


def event(**changes) -> dict:
    return {"user_id": "ada", "model_id": "m1", "training_output_uri": OUTPUT, **changes}


@pytest.fixture
def store(monkeypatch):
    """S3 in moto with the workshop's bucket, and the function's environment."""
    from moto import mock_aws

    from helpers.infra.aws.store import S3ArtifactStore

    fake_aws(monkeypatch, REGION)
    # What the stack sets on the function (cdk/workshop_infra/stack.py).
    monkeypatch.setenv("WORKSHOP_BACKEND", "sagemaker")
    monkeypatch.setenv("WORKSHOP_BUCKET", BUCKET)
    monkeypatch.setenv("WORKSHOP_REGION", REGION)
    monkeypatch.setenv("WORKSHOP_BASE_MODEL", BASE_MODEL)
    monkeypatch.setenv("WORKSHOP_ENDPOINT_NAME", "workshop-mme")
    monkeypatch.setenv("WORKSHOP_ENDPOINT_GPU", "true")
    with mock_aws():
        store = S3ArtifactStore(REGION)
        store.create_bucket(BUCKET)
        yield store


@pytest.fixture
def trained(store, tmp_path, lora_weights):
    """A training job's `model.tar.gz` at `OUTPUT`, real LoRA weights at its root."""
    store.put_file(OUTPUT, write_tar_gz(tmp_path / "model.tar.gz", {WEIGHTS: lora_weights}))
    return store


def unpack(store, uri, tmp_path):
    store.get_file(uri, tmp_path / "archive.tar.gz")
    return safe_extract(tmp_path / "archive.tar.gz", tmp_path / "archive")


@pytest.mark.slow
def test_the_users_triton_model_lands_on_the_endpoint_prefix(trained, tmp_path, lora_weights):
    answer = package_handler(event(), None)

    assert answer == {
        "endpoint_model_name": "ada--m1",
        "model_artifact_uri": f"{PREFIX}ada--m1.tar.gz",
    }
    assert trained.list(PREFIX) == [f"{PREFIX}ada--m1.tar.gz"]
    model = unpack(trained, answer["model_artifact_uri"], tmp_path) / "ada--m1"
    assert (model / "1" / WEIGHTS).read_bytes() == lora_weights.read_bytes()
    assert (model / "1" / "model.py").read_bytes() == (MODEL_CODE / "1" / "model.py").read_bytes()
    config = (model / "config.pbtxt").read_text()
    assert f'string_value: "{BASE_MODEL}"' in config
    assert "KIND_GPU" in config and "KIND_CPU" not in config
    # and the user's adapter, for an endpoint that serves the shared base instead
    adapter = f"s3://{BUCKET}/endpoints/workshop-mme/adapters/ada--m1.safetensors"
    assert trained.get_bytes(adapter) == lora_weights.read_bytes()


@pytest.mark.slow
def test_a_cpu_endpoint_gets_cpu_instances(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKSHOP_ENDPOINT_GPU", "false")

    answer = package_handler(event(), None)

    config = unpack(trained, answer["model_artifact_uri"], tmp_path) / "ada--m1" / "config.pbtxt"
    assert "KIND_CPU" in config.read_text()


@pytest.mark.slow
def test_with_a_serving_runtime_the_model_finds_its_packages_there(trained, tmp_path, monkeypatch):
    runtime = "/tmp/workshop-runtime/runtime-0123456789ab"
    monkeypatch.setenv("WORKSHOP_SERVING_RUNTIME", runtime)

    answer = package_handler(event(), None)

    config = unpack(trained, answer["model_artifact_uri"], tmp_path) / "ada--m1" / "config.pbtxt"
    assert f'key: "runtime", value: {{ string_value: "{runtime}" }}' in config.read_text()
    assert f'key: "base_model", value: {{ string_value: "{BASE_MODEL}" }}' in config.read_text()


@pytest.mark.slow
def test_a_retry_answers_the_same_and_keeps_the_first_archive(trained):
    first = package_handler(event(), None)
    archive = trained.get_bytes(first["model_artifact_uri"])

    assert package_handler(event(), None) == first
    assert trained.get_bytes(first["model_artifact_uri"]) == archive


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"user_id": None}, "user_id"),
        ({"user_id": "Ada Lovelace"}, "user_id"),
        ({"model_id": "../m1"}, "model_id"),
        ({"training_output_uri": "/tmp/model.tar.gz"}, "training_output_uri"),
        ({"training_output_uri": f"s3://{BUCKET}"}, "training_output_uri"),
        ({"training_output_uri": "s3://someone-elses/model.tar.gz"}, "training_output_uri"),
    ],
)
def test_a_bad_event_names_the_field_and_packages_nothing(store, bad, field):
    with pytest.raises(ValueError, match=field):
        package_handler(event(**bad), None)
    assert store.list(PREFIX) == []


@pytest.mark.parametrize("missing", ["user_id", "model_id", "training_output_uri"])
def test_a_missing_field_is_named(store, missing):
    incomplete = event()
    del incomplete[missing]
    with pytest.raises(ValueError, match=f"event has no {missing}"):
        package_handler(incomplete, None)


def test_an_event_that_is_not_an_object_is_refused(store):
    with pytest.raises(ValueError, match="event must be an object"):
        package_handler(["ada", "m1", OUTPUT], None)


def test_a_missing_training_output_fails_and_leaves_nothing(store):
    with pytest.raises(ObjectNotFound):
        package_handler(event(training_output_uri=f"s3://{BUCKET}/jobs/none/model.tar.gz"), None)
    assert store.list(PREFIX) == []


def test_a_training_output_without_weights_fails_naming_them(store, tmp_path):
    store.put_file(OUTPUT, write_tar_gz(tmp_path / "model.tar.gz", {"README.md": "no weights"}))
    with pytest.raises(ValueError, match=WEIGHTS):
        package_handler(event(), None)
    assert store.list(PREFIX) == []


def test_without_the_endpoint_name_the_error_names_the_setting(store, monkeypatch):
    monkeypatch.delenv("WORKSHOP_ENDPOINT_NAME")
    with pytest.raises(SettingsError, match="WORKSHOP_ENDPOINT_NAME"):
        package_handler(event(), None)
