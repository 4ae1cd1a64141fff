"""SageMaker training jobs against moto: the CreateTrainingJob request, and the status mapping
(moto's jobs are Completed at once; other states are set on its backend's job)."""

from __future__ import annotations

import copy
import io
import json
import tarfile
import time

import boto3
import pytest
from aws_fakes import fake_aws
from botocore.stub import Stubber

from helpers.ports.jobs import METRIC_DEFINITIONS, JobExists, JobStatus, TrainingJobRequest
from helpers.ports.metadata import NotFound
from helpers.settings import Settings, SettingsError

REGION = "eu-west-1"
BUCKET = "workshop-artifacts"
TABLE = "workshop-models"
USER = "demo-ada"
IMAGES = f"s3://{BUCKET}/users/{USER}/images"
OUTPUT = f"s3://{BUCKET}/jobs"
IMAGE = (
    f"763104351884.dkr.ecr.{REGION}.amazonaws.com/"
    "huggingface-pytorch-training:2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04"
)


@pytest.fixture
def aws(monkeypatch, tmp_path):
    from moto import mock_aws

    from helpers.infra.aws.metadata import DynamoDbMetadataStore
    from helpers.infra.aws.store import S3ArtifactStore

    fake_aws(monkeypatch, REGION)
    with mock_aws():
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "sagemaker.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        role = boto3.client("iam", region_name=REGION).create_role(
            RoleName="workshop-sagemaker", AssumeRolePolicyDocument=json.dumps(trust)
        )["Role"]["Arn"]
        settings = Settings(
            backend="sagemaker", work_dir=tmp_path, base_model="org/model", region=REGION,
            role_arn=role,
        )  # fmt: skip
        store = S3ArtifactStore(REGION)
        store.create_bucket(BUCKET)
        store.put_bytes(f"{IMAGES}/00.png", b"not really a png")
        metadata = DynamoDbMetadataStore(TABLE, REGION)
        metadata.create_table()
        client = boto3.client("sagemaker", region_name=REGION)
        requests: list[dict] = []
        client.meta.events.register(
            "provide-client-params.sagemaker.CreateTrainingJob",
            lambda params, **_: requests.append(copy.deepcopy(params)),
        )
        yield settings, store, metadata, client, requests


def jobs_for(aws, **kwargs):
    from helpers.infra.aws.jobs import SageMakerTrainingJobs

    settings, store, metadata, client, _ = aws
    kwargs.setdefault("metadata", metadata)
    return SageMakerTrainingJobs(settings, store, client=client, **kwargs)


def request(name: str = "ada-m1-1", **changes) -> TrainingJobRequest:
    values = {
        "job_name": name,
        "user_id": USER,
        "model_id": "m1",
        "instance_data_uri": IMAGES,
        "base_model": "org/model",
        "output_path": OUTPUT,
        "hyperparameters": {"max_train_steps": 3, "learning_rate": 1e-4, "random_flip": True},
        **changes,
    }
    return TrainingJobRequest(**values)


def moto_job(name: str):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION].training_jobs[name]


def test_submit_sends_a_script_mode_training_job(aws):
    settings, store, metadata, _, requests = aws
    jobs = jobs_for(aws)
    done = jobs.submit(request())
    (sent,) = requests
    assert sent["TrainingJobName"] == "ada-m1-1"
    assert sent["AlgorithmSpecification"] == {
        "TrainingImage": IMAGE,
        "TrainingInputMode": "File",
        "MetricDefinitions": list(METRIC_DEFINITIONS),
    }
    assert sent["RoleArn"] == settings.role_arn
    assert [c["ChannelName"] for c in sent["InputDataConfig"]] == ["instance"]
    assert sent["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == IMAGES
    assert sent["OutputDataConfig"] == {"S3OutputPath": OUTPUT}
    assert sent["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    assert sent["EnableManagedSpotTraining"] is False
    hyperparameters = sent["HyperParameters"]
    assert all(isinstance(value, str) for value in hyperparameters.values())
    decoded = {name: json.loads(value) for name, value in hyperparameters.items()}
    assert decoded["sagemaker_program"] == "train_dreambooth_lora.py"
    assert decoded["sagemaker_region"] == REGION
    assert decoded["pretrained_model_name_or_path"] == "org/model"  # a hub id: no channel
    assert (decoded["max_train_steps"], decoded["learning_rate"]) == (3, 1e-4)
    assert decoded["random_flip"] is True

    # The source directory is in S3 and holds the entry script at its root, with the rules it
    # imports beside it.
    source = decoded["sagemaker_submit_directory"]
    assert source == f"s3://{BUCKET}/code/ada-m1-1/sourcedir.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(source))) as archive:
        assert {"train_dreambooth_lora.py", "hyperparameters.py"} <= set(archive.getnames())

    # moto completes jobs at once: the mapping, SageMaker's output layout, the record.
    assert done.status == JobStatus.COMPLETED
    assert done.output_uri == f"{OUTPUT}/ada-m1-1/output/model.tar.gz"
    assert done.max_steps == 3
    record = metadata.get_job(USER, "ada-m1-1")
    assert (record.status, record.output_uri) == (JobStatus.COMPLETED, done.output_uri)
    assert [d.job_name for d in jobs.list(USER)] == ["ada-m1-1"]
    assert jobs.stop("ada-m1-1", USER).status == JobStatus.COMPLETED  # ended: no call
    with pytest.raises(JobExists, match="ada-m1-1"):
        jobs.submit(request())
    with pytest.raises(NotFound):
        jobs.describe("ada-m1-1", "someone-else")


def test_an_s3_base_model_is_a_channel_and_spot_waits_and_checkpoints(aws):
    requests = aws[4]
    jobs = jobs_for(aws, metadata=None, use_spot=True, instance_type="ml.g5.xlarge")
    base = f"s3://{BUCKET}/base-models/tiny"
    jobs.submit(request(base_model=base))
    sent = requests[-1]
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in sent["InputDataConfig"]
    }
    assert channels == {"instance": IMAGES, "base_model": base}
    assert "pretrained_model_name_or_path" not in sent["HyperParameters"]
    assert sent["EnableManagedSpotTraining"] is True
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 14400}
    assert sent["CheckpointConfig"]["S3Uri"] == f"{OUTPUT}/ada-m1-1/checkpoints"
    assert json.loads(sent["HyperParameters"]["checkpoints_dir"]) == "/opt/ml/checkpoints"
    assert sent["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    # Without a metadata store the owner comes from the job's tags.
    assert jobs.describe("ada-m1-1", USER).status == JobStatus.COMPLETED
    assert [d.job_name for d in jobs.list(USER)] == ["ada-m1-1"]
    assert jobs.list("someone-else") == []
    with pytest.raises(NotFound):
        jobs.describe("ada-m1-1", "someone-else")
    with pytest.raises(JobExists):
        jobs.submit(request(base_model=base))


def test_failed_and_in_progress_jobs_map_to_our_statuses(aws, monkeypatch):
    from moto.sagemaker.models import FakeTrainingJob

    _, _, metadata, _, _ = aws
    created = FakeTrainingJob.__init__

    def in_progress(self, *args, **kwargs):
        created(self, *args, **kwargs)
        self.training_job_status = "InProgress"

    monkeypatch.setattr(FakeTrainingJob, "__init__", in_progress)
    jobs = jobs_for(aws)
    assert jobs.submit(request()).status == JobStatus.RUNNING
    assert metadata.get_job(USER, "ada-m1-1").status == JobStatus.RUNNING
    job = moto_job("ada-m1-1")
    job.training_job_status = "Failed"
    job.failure_reason = "AlgorithmError: CUDA out of memory"
    failed = jobs.wait("ada-m1-1", USER, timeout=5, poll=0.01)
    assert (failed.status, failed.failure_reason) == (
        JobStatus.FAILED,
        "AlgorithmError: CUDA out of memory",
    )
    record = metadata.get_job(USER, "ada-m1-1")
    assert (record.status, record.failure_reason) == (JobStatus.FAILED, failed.failure_reason)


def test_stop_calls_stop_training_job(aws, tmp_path):
    # moto has no StopTrainingJob: the calls are checked with botocore's Stubber instead.
    from helpers.infra.aws.jobs import SageMakerTrainingJobs
    from helpers.infra.local.metadata import SqliteMetadataStore

    settings, store, _, _, _ = aws
    metadata = SqliteMetadataStore(tmp_path / "metadata.sqlite")
    metadata.create_table()
    metadata.put_job(request().to_record())
    metadata.update_job(USER, "ada-m1-1", status="RUNNING")
    client = boto3.client("sagemaker", region_name=REGION)
    jobs = SageMakerTrainingJobs(settings, store, metadata, client=client)

    def described(status: str) -> dict:
        return {
            "TrainingJobName": "ada-m1-1",
            "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:123456789012:training-job/ada-m1-1",
            "TrainingJobStatus": status,
            "SecondaryStatus": status,
            "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "ModelArtifacts": {"S3ModelArtifacts": f"{OUTPUT}/ada-m1-1/output/model.tar.gz"},
            "ResourceConfig": {"InstanceCount": 1, "VolumeSizeInGB": 50},
            "StoppingCondition": {"MaxRuntimeInSeconds": 7200},
            "CreationTime": "2026-01-01T00:00:00Z",
        }

    name = {"TrainingJobName": "ada-m1-1"}
    with Stubber(client) as stub:
        stub.add_response("describe_training_job", described("InProgress"), name)
        stub.add_response("stop_training_job", {}, name)
        stub.add_response("describe_training_job", described("Stopping"), name)
        stub.add_response("describe_training_job", described("Stopped"), name)
        assert jobs.stop("ada-m1-1", USER).status == JobStatus.RUNNING  # Stopping
        assert jobs.describe("ada-m1-1", USER).status == JobStatus.STOPPED
        stub.assert_no_pending_responses()
    assert metadata.get_job(USER, "ada-m1-1").status == JobStatus.STOPPED


def test_logs_come_from_cloudwatch_or_say_why_not(aws):
    jobs = jobs_for(aws)
    jobs.submit(request())
    assert "no logs of job ada-m1-1" in jobs.logs("ada-m1-1", USER)
    logs = boto3.client("logs", region_name=REGION)
    now = int(time.time() * 1000)  # CloudWatch refuses events older than 14 days
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    logs.create_log_stream(
        logGroupName="/aws/sagemaker/TrainingJobs", logStreamName="ada-m1-1/algo-1-1"
    )
    logs.put_log_events(
        logGroupName="/aws/sagemaker/TrainingJobs",
        logStreamName="ada-m1-1/algo-1-1",
        logEvents=[
            {"timestamp": now, "message": "step=1 loss=0.5"},
            {"timestamp": now + 1, "message": "step=2 loss=0.4"},
        ],
    )
    assert jobs.logs("ada-m1-1", USER) == "step=1 loss=0.5\nstep=2 loss=0.4"


def test_submit_without_a_role_names_the_setting_and_creates_nothing(aws):
    from helpers.infra.aws.jobs import SageMakerTrainingJobs

    settings, store, metadata, client, requests = aws
    no_role = Settings(**{**settings.model_dump(), "role_arn": None})
    jobs = SageMakerTrainingJobs(no_role, store, metadata, client=client)
    with pytest.raises(SettingsError, match="WORKSHOP_ROLE_ARN"):
        jobs.submit(request())
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        jobs.submit(request(hyperparameters={"epochs": 3}))
    assert requests == [] and metadata.list_jobs() == []
    assert store.list(f"s3://{BUCKET}/code") == []


def test_without_a_role_setting_a_job_runs_as_the_sessions_role(aws):
    """SageMaker Studio: `role_arn` left empty, the execution role is the notebook's own."""
    from helpers.infra.aws.jobs import SageMakerTrainingJobs

    settings, store, metadata, client, requests = aws
    no_role = Settings(**{**settings.model_dump(), "role_arn": None})
    found = []

    def studio_role() -> str:
        found.append(settings.role_arn)
        return settings.role_arn

    jobs = SageMakerTrainingJobs(
        no_role, store, metadata, client=client, execution_role=studio_role
    )
    jobs.submit(request())
    jobs.submit(request("ada-m2-1", model_id="m2"))
    assert [sent["RoleArn"] for sent in requests] == [settings.role_arn] * 2
    assert len(found) == 1  # looked up once


@pytest.mark.parametrize(
    ("region", "registry"),
    [
        ("us-west-2", "763104351884.dkr.ecr.us-west-2.amazonaws.com"),
        ("eu-south-1", "692866216735.dkr.ecr.eu-south-1.amazonaws.com"),
        ("me-central-1", "914824155844.dkr.ecr.me-central-1.amazonaws.com"),
        ("cn-northwest-1", "727897471807.dkr.ecr.cn-northwest-1.amazonaws.com.cn"),
        ("us-gov-east-1", "446045086412.dkr.ecr.us-gov-east-1.amazonaws.com"),
    ],
)
def test_the_training_image_comes_from_the_regions_dlc_registry(region, registry):
    from helpers.infra.aws.jobs import training_image_uri

    assert training_image_uri(region) == f"{registry}/{IMAGE.split('/', 1)[1]}"


def test_a_region_without_the_training_image_is_refused_naming_the_supported_ones():
    from helpers.infra.aws.jobs import training_image_uri

    with pytest.raises(ValueError, match="for region 'ap-southeast-5'") as caught:
        training_image_uri("ap-southeast-5")  # opened after this image was published
    assert "eu-west-1" in str(caught.value) and "us-gov-west-1" in str(caught.value)


def pipeline_dir(root, **files):
    """A stand-in pipeline directory: `files` by path (`__` for `/`), plus a hidden file."""
    for name, content in {"model_index.json": "{}", **files}.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (root / ".cache").mkdir(exist_ok=True)
    (root / ".cache" / "lock").write_text("not part of the model")
    return root


def channels_of(sent: dict) -> dict[str, str]:
    return {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in sent["InputDataConfig"]
    }


def test_a_local_base_model_is_uploaded_once_by_content_and_is_the_base_model_channel(
    aws, tmp_path, monkeypatch
):
    from helpers.domain.archives import content_name
    from helpers.infra.aws.base_model_upload import base_model_files

    _, store, metadata, _, requests = aws
    base = pipeline_dir(
        tmp_path / "tiny-sd-shapes", unet__config_json='{"x": 1}', unet__weights="w1"
    )
    uploaded: list[str] = []
    put_file = store.put_file
    monkeypatch.setattr(
        store, "put_file", lambda uri, path: (uploaded.append(uri), put_file(uri, path))
    )
    jobs = jobs_for(aws)

    jobs.submit(request("ada-m1-1", base_model=str(base)))
    digest = content_name("", base_model_files(base))
    folder = f"s3://{BUCKET}/base-models/tiny-sd-shapes-{digest}/"
    assert len(digest) == 12
    assert channels_of(requests[-1]) == {"instance": IMAGES, "base_model": folder}
    assert "pretrained_model_name_or_path" not in requests[-1]["HyperParameters"]
    expected = [folder + name for name in ("model_index.json", "unet/config_json", "unet/weights")]
    assert store.list(folder) == expected and sorted(uploaded) == expected  # no hidden files
    assert store.get_bytes(folder + "unet/weights") == b"w1"
    assert metadata.get_job(USER, "ada-m1-1").base_model == folder

    # The same files again: the same folder, nothing sent; a file missing is sent alone.
    uploaded.clear()
    jobs.submit(request("ada-m1-2", base_model=str(base)))
    assert uploaded == [] and channels_of(requests[-1])["base_model"] == folder
    store.delete(folder + "unet/weights")
    jobs.submit(request("ada-m1-3", base_model=str(base)))
    assert uploaded == [folder + "unet/weights"]

    # Changed content: a new folder, the old one left for the jobs that read it.
    (base / "unet" / "weights").write_text("w2")
    jobs.submit(request("ada-m1-4", base_model=str(base)))
    changed = channels_of(requests[-1])["base_model"]
    assert changed != folder and changed.startswith(f"s3://{BUCKET}/base-models/tiny-sd-shapes-")
    assert store.get_bytes(changed + "unet/weights") == b"w2"
    assert store.get_bytes(folder + "unet/weights") == b"w1"


def test_a_request_config_with_a_local_directory_is_refused_naming_the_fix(aws, tmp_path):
    jobs = jobs_for(aws)
    base = pipeline_dir(tmp_path / "tiny")
    with pytest.raises(ValueError, match="is a local directory, which a SageMaker job cannot"):
        jobs.training_job_config(request(base_model=str(base)), f"s3://{BUCKET}/code/x.tar.gz")


def test_describe_after_create_training_job_failed_returns_the_stored_failure(aws):
    from botocore.awsrequest import AWSResponse

    _, _, metadata, client, requests = aws
    refusal = {
        "Error": {
            "Code": "ResourceLimitExceeded",
            "Message": "The account-level service limit 'ml.g5.2xlarge for training job "
            "usage' is 0 Instances",
        }
    }

    def refuse(**_):
        return AWSResponse(f"https://api.sagemaker.{REGION}.amazonaws.com/", 400, {}, None), refusal

    client.meta.events.register("before-call.sagemaker.CreateTrainingJob", refuse)
    jobs = jobs_for(aws)
    with pytest.raises(client.exceptions.ResourceLimitExceeded):
        jobs.submit(request())
    client.meta.events.unregister("before-call.sagemaker.CreateTrainingJob", refuse)
    assert len(requests) == 1  # it was sent, and refused

    failed = jobs.describe("ada-m1-1", USER)  # SageMaker has no such job: what we stored
    assert failed.status == JobStatus.FAILED and failed.done
    assert failed.failure_reason.startswith("CreateTrainingJob failed: ")
    assert "ResourceLimitExceeded" in failed.failure_reason
    assert jobs.wait("ada-m1-1", USER, timeout=5, poll=0.01) == failed
    assert jobs.stop("ada-m1-1", USER) == failed
    assert jobs.list(USER) == [failed]
    assert metadata.get_job(USER, "ada-m1-1").status == JobStatus.FAILED
    with pytest.raises(NotFound):
        jobs.describe("ada-m1-1", "someone-else")
