"""The local onboarding worker over real training jobs: a model goes from REQUESTED to
AVAILABLE, survives a restart mid-training without being lost or trained twice, and a failed
job fails the model with a reason the user can read."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from helpers.backend import open_backend
from helpers.domain import failures
from helpers.domain.paths import endpoint_prefix
from helpers.domain.records import JobStatus, ModelStatus, UserRecord
from helpers.infra.local.jobs import LocalTrainingJobs
from helpers.services.local_onboarding import LocalOnboarding
from helpers.services.onboarding import request_model
from helpers.services.photos import add_photos
from helpers.settings import load_settings
from helpers.workshop.demo_subjects import get_demo_subject, subject_images
from helpers.workshop.personalization import png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def platform(tmp_path, tiny_pipeline_dir):
    settings = load_settings(work_dir=tmp_path, base_model=str(tiny_pipeline_dir))
    provisioned = open_backend(settings).provision()
    provisioned.metadata.put_user(UserRecord("ada"))
    images = subject_images(get_demo_subject("demo-ada"), count=3)
    add_photos(
        provisioned.store,
        settings,
        "ada",
        [(f"{i}.png", png_bytes(im)) for i, im in enumerate(images)],
    )
    return settings, provisioned.store, provisioned.metadata


def training_processes(job_dir) -> list[int]:
    """Processes running in the job's directory (its SM_MODEL_DIR is in their environment)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"SM_MODEL_DIR={job_dir}/model".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


@contextlib.contextmanager
def onboarding_service(settings, store, metadata, stop_jobs: bool = False):
    """The local jobs and the onboarding worker over them, closed on the way out (with
    `stop_jobs`, as a service that shuts down stops its jobs)."""
    jobs = LocalTrainingJobs(settings, store, metadata)
    worker = LocalOnboarding(settings, store, metadata, jobs)
    try:
        yield jobs, worker
    finally:
        worker.close()
        jobs.close(stop_jobs=stop_jobs)


def wait_for(condition, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_requested_model_becomes_available_on_the_endpoint_prefix(platform):
    settings, store, metadata = platform
    model, _ = request_model(metadata, store, settings, "ada", {"max_train_steps": 2})
    with onboarding_service(settings, store, metadata) as (jobs, worker):
        worker.start(model)
        worker.wait(timeout=240)
    done = metadata.get_model("ada", "m1")
    assert done.status == ModelStatus.AVAILABLE, done.failure_reason
    assert done.model_artifact_uri == f"{endpoint_prefix(settings.bucket)}ada--m1.tar.gz"
    assert store.exists(done.model_artifact_uri)
    assert [job.status for job in jobs.list("ada")] == [JobStatus.COMPLETED]


def test_a_restart_mid_training_resumes_without_losing_or_repeating_work(platform):
    settings, store, metadata = platform
    model, _ = request_model(metadata, store, settings, "ada", {"max_train_steps": 400})
    # the service stops while the model trains: its job with it
    with onboarding_service(settings, store, metadata, stop_jobs=True) as (jobs, worker):
        worker.start(model)
        wait_for(lambda: metadata.get_model("ada", "m1").status == ModelStatus.TRAINING)
    assert metadata.get_model("ada", "m1").status == ModelStatus.TRAINING

    metadata.update_model(  # a shorter second run keeps the test quick
        "ada",
        "m1",
        expected_version=metadata.get_model("ada", "m1").version,
        params={**model.params, "hyperparameters": {"max_train_steps": 2}},
    )
    with onboarding_service(settings, store, metadata) as (jobs, worker):
        assert worker.resume() == 1
        worker.wait(timeout=240)
    done = metadata.get_model("ada", "m1")
    assert done.status == ModelStatus.AVAILABLE, done.failure_reason
    statuses = [job.status for job in jobs.list("ada")]
    assert statuses == [JobStatus.STOPPED, JobStatus.COMPLETED]  # one retry, no duplicate
    assert done.training_job_name.endswith("-r2")
    assert len(store.list(endpoint_prefix(settings.bucket))) == 1


def test_a_failed_training_job_fails_the_model_with_its_reason(platform, tmp_path):
    settings, store, metadata = platform
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    broken = load_settings(work_dir=settings.work_dir, base_model=str(empty))
    model, _ = request_model(metadata, store, broken, "ada", {"max_train_steps": 2})
    with onboarding_service(broken, store, metadata) as (_, worker):
        worker.start(model)
        worker.wait(timeout=240)
    failed = metadata.get_model("ada", "m1")
    assert failed.status == ModelStatus.FAILED
    # The user reads a fixed phrase and a reference; the operator finds the details by it.
    reference = failed.params["failure"]["reference"]
    assert failed.failure_reason == f"{failures.TRAINING_FAILED} (ref {reference})"
    job = metadata.get_job("ada", failed.training_job_name)
    assert failed.params["failure"]["detail"] == job.failure_reason
    assert str(empty) in job.failure_reason  # the job's record keeps what went wrong
    assert not store.list(endpoint_prefix(settings.bucket))  # nothing half-published


class AnotherDriverFirst:
    """The metadata store as a second driver sees it: the first time this driver moves the
    model, the other has just made the same move (so this one's write conflicts)."""

    def __init__(self, metadata) -> None:
        self.metadata = metadata
        self.conflicts = 0

    def __getattr__(self, name):
        return getattr(self.metadata, name)

    def update_model(self, user_id, model_id, expected_version=None, **changes):
        if self.conflicts == 0:
            self.conflicts += 1
            current = self.metadata.get_model(user_id, model_id)
            self.metadata.update_model(
                user_id, model_id, expected_version=current.version, **changes
            )
        return self.metadata.update_model(
            user_id, model_id, expected_version=expected_version, **changes
        )


def test_a_model_moved_by_another_driver_is_read_again_not_failed(platform):
    settings, store, metadata = platform
    model, _ = request_model(metadata, store, settings, "ada", {"max_train_steps": 2})
    racing = AnotherDriverFirst(metadata)
    with onboarding_service(settings, store, racing) as (jobs, worker):
        worker.start(model)
        worker.wait(timeout=240)
    assert racing.conflicts == 1
    done = metadata.get_model("ada", "m1")
    assert done.status == ModelStatus.AVAILABLE, done.failure_reason
    assert [job.status for job in jobs.list("ada")] == [JobStatus.COMPLETED]


def test_deleting_a_user_mid_training_stops_the_job_and_leaves_nothing(platform):
    from helpers.services.onboarding import delete_user_data

    settings, store, metadata = platform
    model, _ = request_model(metadata, store, settings, "ada", {"max_train_steps": 2000})
    with onboarding_service(settings, store, metadata) as (jobs, worker):
        worker.start(model)
        wait_for(lambda: metadata.get_model("ada", "m1").status == ModelStatus.TRAINING)
        # RUNNING is recorded before the process starts: wait for the process itself.
        wait_for(lambda: bool(training_processes(jobs.job_dir(model.training_job_name))))
        delete_user_data(store, metadata, worker, settings, "ada")
        assert not worker._threads[("ada", "m1")].is_alive()  # nothing more will be written
    assert not training_processes(jobs.job_dir(model.training_job_name))
    assert jobs.list("ada") == []  # the job's record went with the user's
    assert metadata.get_user("ada") is None and metadata.list_models("ada") == []
    assert store.list(settings.uri("users/ada/")) == []
    assert store.list(endpoint_prefix(settings.bucket)) == []


def test_step_functions_onboarding_trains_on_a_local_base_model_uploaded_once(
    tmp_path, monkeypatch
):
    """The default base model is a local directory: the state machine's training job gets
    it as the `base_model` channel of its one upload, never as a hub id."""
    import json

    import boto3
    from aws_fakes import fake_aws
    from moto import mock_aws

    from helpers.backend import open_backend as open_aws_backend
    from helpers.domain.archives import base_model_files, content_name
    from helpers.domain.records import ModelRecord
    from helpers.infra.aws.store import S3ArtifactStore
    from helpers.settings import Settings

    region = "eu-west-1"
    base = tmp_path / "tiny-sd-shapes"
    (base / "unet").mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    fake_aws(monkeypatch, region)
    with mock_aws():
        settings = Settings(
            backend="sagemaker",
            work_dir=tmp_path / "work",
            base_model=str(base),
            region=region,
            role_arn="arn:aws:iam::123456789012:role/workshop-sagemaker",
        )
        store = S3ArtifactStore(region)
        store.create_bucket(settings.bucket)
        states = boto3.client("stepfunctions", region_name=region)
        machine = states.create_state_machine(
            name="onboarding",
            definition=json.dumps(
                {"StartAt": "Train", "States": {"Train": {"Type": "Pass", "End": True}}}
            ),
            roleArn="arn:aws:iam::123456789012:role/workshop-states",
        )["stateMachineArn"]
        backend = open_aws_backend(settings)
        backend.__dict__["store"] = store  # the one the test watches
        onboarding = backend.onboarding(state_machine_arn=machine, client=states)
        uploaded: list[str] = []
        put_file = store.put_file
        monkeypatch.setattr(
            store, "put_file", lambda uri, path: (uploaded.append(uri), put_file(uri, path))
        )
        for model_id in ("m1", "m2"):
            onboarding.start(ModelRecord("ada", model_id))
        executions = states.list_executions(stateMachineArn=machine)["executions"]
        inputs = [
            json.loads(states.describe_execution(executionArn=e["executionArn"])["input"])
            for e in executions
        ]

    name = content_name("tiny-sd-shapes-", base_model_files(base))
    folder = f"s3://{settings.bucket}/base-models/{name}/"
    assert len(inputs) == 2
    for execution in inputs:
        job = execution["training_job"]
        channels = {
            c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
            for c in job["InputDataConfig"]
        }
        assert channels["base_model"] == folder
        assert "pretrained_model_name_or_path" not in job["HyperParameters"]
    assert sorted(uploaded) == [
        folder + "model_index.json",
        folder + "unet/diffusion_pytorch_model.safetensors",
    ]  # once, for both models
