"""The SageMaker execution role under the IAM policies `cdk synth` gives it
(`tests/iam_enforced.py`), with what the SageMaker platform does as that role done for real
(`tests/sagemaker_platform.py`) against moto.

- A training job, configured and its source uploaded by `SageMakerTrainingJobs` as an
  administrator would (the notebook, or the API's onboarding), runs the real training script on
  the tiny base model under the role: channels downloaded, logs and metrics written, the LoRA
  uploaded.
- The endpoint fetches, under the role, a user's model archive (packaged from that job's
  output), the shared base's and the serving runtime's, and the shared base's own code fetches
  the user's adapter; a fetch outside the artifact bucket's prefixes is refused.
- Without any one of the role's S3, logs or metrics statements, that journey fails on one of
  the statement's actions. The ECR statements are checked by the CDK assertions only
  (`tests/test_cdk_stack.py`): the image pull is SageMaker's before the container starts, and
  here the script runs in this machine's Python, so there is no pull to authorize.
- `install_training_platform`: with moto's SageMaker running jobs for real,
  `SageMakerTrainingJobs.submit` then `describe` reach COMPLETED with the model, `logs` shows
  the job's output, and a job whose script fails reaches FAILED with the script's reason; `stop`
  ends a job STOPPED with its script; jobs submitted to a `ThreadedMotoServer` of this process
  (as notebook kernels submit them) run too.

Slow: synthesis (about 10 s) and each training run (about 8 s on two cores); about 70 s in all
on an idle two-core machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import boto3
import pytest
from aws_fakes import fake_aws
from botocore.exceptions import ClientError

from helpers.workshop.aws_stack import node_problem

if (_NODE_PROBLEM := node_problem()) is not None:  # importing aws_cdk starts node
    pytest.skip(f"the CDK needs Node.js: {_NODE_PROBLEM}", allow_module_level=True)

import iam_enforced
import sagemaker_platform
from test_adapter_serving import pbtxt_parameters
from test_iam_enforced import refusal

from helpers.domain.paths import jobs_output_path, model_name, source_dir_uri
from helpers.ports.jobs import JobStatus, TrainingJobRequest

pytestmark = pytest.mark.slow

REGION = "eu-west-1"
BUCKET = "workshop-iam"
TABLE = "workshop-iam-models"
ENDPOINT = "workshop-mme"
USER = "demo-ada"
MODEL = "m1"
WEIGHTS = "pytorch_lora_weights.safetensors"
HYPERPARAMETERS = {
    "max_train_steps": 2,
    "learning_rate": 0.05,
    "num_validation_images": 1,
    "num_inference_steps": 2,
}


def sagemaker_role_id(template: dict) -> str:
    """The logical id of the only role SageMaker assumes."""
    found = [
        name
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::IAM::Role"
        and "sagemaker.amazonaws.com"
        in json.dumps(resource["Properties"]["AssumeRolePolicyDocument"])
    ]
    if len(found) != 1:
        raise ValueError(f"expected one role SageMaker assumes, found {found}")
    return found[0]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def object_requests(enforcer) -> set[tuple[str, str]]:
    """(action, first part of the key) of each S3 object request allowed: what was read or
    written where."""
    found = set()
    for request in enforcer.allowed:
        _, _, path = request.resource.partition(":::")
        if request.action.startswith("s3:") and "/" in path:
            found.add((request.action, path.split("/")[1]))
    return found


def model_data_url(deployment: iam_enforced.Deployment) -> str:
    """The multi-model endpoint's `ModelDataUrl`, as the stack sets it."""
    (model,) = [
        resource["Properties"]
        for resource in deployment.template["Resources"].values()
        if resource["Type"] == "AWS::SageMaker::Model"
    ]
    return deployment.resolve(model["PrimaryContainer"]["ModelDataUrl"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> iam_enforced.Deployment:
    template = iam_enforced.synthesize(
        tmp_path_factory.mktemp("cdk.out"), admin_key_sha256=hashlib.sha256(b"k").hexdigest()
    )
    return iam_enforced.Deployment(template, REGION, BUCKET, TABLE)


@pytest.fixture(scope="module")
def role(deployment) -> list[dict]:
    """The execution role's statements."""
    return deployment.role_statements(sagemaker_role_id(deployment.template))


@pytest.fixture(scope="module")
def world(deployment, tiny_pipeline_dir, tmp_path_factory):
    """moto with the artifact bucket, a user's training photos, and a training job's
    configuration and source uploaded as `SageMakerTrainingJobs.submit` does (administrator)."""
    from moto import mock_aws

    from helpers.infra.aws.jobs import SageMakerTrainingJobs, pack_source_dir
    from helpers.infra.aws.store import S3ArtifactStore
    from helpers.settings import Settings
    from helpers.workshop.demo_subjects import get_demo_subject, write_subject_images

    work = tmp_path_factory.mktemp("world")
    role_arn = deployment.resolve({"Fn::GetAtt": [sagemaker_role_id(deployment.template), "Arn"]})
    with pytest.MonkeyPatch.context() as patch, mock_aws():
        fake_aws(patch, REGION)
        settings = Settings(
            backend="sagemaker", work_dir=work, bucket=BUCKET, table_name=TABLE, region=REGION,
            base_model=str(tiny_pipeline_dir), role_arn=role_arn,
        )  # fmt: skip
        store = S3ArtifactStore(REGION)
        store.create_bucket(BUCKET)
        photos = f"s3://{BUCKET}/users/{USER}/training/{MODEL}/"
        for path in write_subject_images(get_demo_subject(USER), work / "photos", count=3):
            store.put_file(photos + path.name, path)
        jobs = SageMakerTrainingJobs(settings, store)
        request = jobs.with_training_base_model(
            TrainingJobRequest(
                job_name="demo-ada-m1-1",
                user_id=USER,
                model_id=MODEL,
                instance_data_uri=photos,
                base_model=settings.base_model,
                output_path=jobs_output_path(BUCKET),
                hyperparameters=HYPERPARAMETERS,
            )
        )
        source = source_dir_uri(BUCKET, request.job_name)
        store.put_bytes(source, pack_source_dir(jobs.code_dir))
        yield {
            "settings": settings,
            "store": store,
            "jobs": jobs,
            "config": jobs.training_job_config(request, source),
            "work": work,
            "url": model_data_url(deployment),
        }


def train(
    world, statements, name: str, validation: bool = True
) -> tuple[sagemaker_platform.TrainingOutcome, object]:
    """The job of `world`, renamed `name`, run under `statements` (without drawing validation
    images, which only take time, unless `validation`)."""
    config = {**world["config"], "TrainingJobName": name}
    if not validation:
        config["HyperParameters"] = {**config["HyperParameters"], "num_validation_images": "0"}
    with iam_enforced.enforced(statements, REGION) as enforcer:
        outcome = sagemaker_platform.run_training_job(config, world["work"] / name, REGION)
    return outcome, enforcer


@pytest.fixture(scope="module")
def trained(world, role):
    """The job run once under the role, and what the endpoint serves from it, packaged by the
    product's own packaging as the packaging Lambda and notebook 03 would (administrator)."""
    from helpers.domain.archives import safe_extract
    from helpers.services.packaging import package_user_model
    from helpers.services.serving import adapter_source, package_shared_base, publish_adapter
    from helpers.services.serving_runtime import package_runtime

    outcome, enforcer = train(world, role, "demo-ada-m1-1")
    store, work = world["store"], world["work"]
    prefix = f"s3://{BUCKET}/endpoints/{ENDPOINT}/models/"
    served = {}
    if outcome.status == "Completed":
        user = package_user_model(
            store, outcome.model_artifacts, prefix, USER, MODEL, "stabilityai/base"
        )
        archive = work / "training.tar.gz"
        store.get_file(outcome.model_artifacts, archive)
        weights = safe_extract(archive, work / "training") / WEIGHTS
        adapters = f"s3://{BUCKET}/endpoints/{ENDPOINT}/adapters/"
        publish_adapter(store, weights, adapters, USER, MODEL)
        shared = package_shared_base(
            store, prefix, "stabilityai/base", adapter_source(store, adapters), region=REGION
        )
        packages = work / "site-packages"
        (packages / "placeholder").mkdir(parents=True)
        (packages / "placeholder" / "__init__.py").write_text("")
        runtime = package_runtime(store, prefix, packages)
        served = {"user": user.name, "shared": shared.name, "runtime": runtime.name}
    return {"outcome": outcome, "enforcer": enforcer, "served": served}


def serve(world, statements, served: dict[str, str], url: str, tmp_path: Path):
    """What the endpoint does as the role: fetch each archive, and the user's adapter through
    the shared base's own code and configuration. The adapter's bytes."""
    from helpers.services.packaging import load_model_code

    with iam_enforced.enforced(statements, REGION) as enforcer:
        try:
            for kind, name in served.items():
                path = sagemaker_platform.fetch_model(
                    url, f"{name}.tar.gz", tmp_path / f"{name}.tar.gz", REGION
                )
                with tarfile.open(path) as archive:
                    assert f"{name}/config.pbtxt" in archive.getnames(), kind
            shared = served["shared"]
            with tarfile.open(tmp_path / f"{shared}.tar.gz") as archive:
                archive.extractall(tmp_path / "shared", filter="data")
            folder = tmp_path / "shared" / shared
            parameters = pbtxt_parameters((folder / "config.pbtxt").read_text())
            module = load_model_code(folder / "1" / "model.py", "shared_base_under_role")
            # What the model's `initialize` opens, from its packaged configuration.
            adapters = module.open_adapter_source(
                parameters["adapter_source"], parameters["aws_region"], shared
            )
            return adapters.fetch(model_name(USER, MODEL)), enforcer
        except Exception as error:
            if not enforcer.denied:
                raise
            raise AssertionError(f"refused: {[str(r) for r in enforcer.denied]}") from error


def journey(world, trained, statements, tmp_path: Path, name: str) -> None:
    """Serving, then a training job, under `statements`; `AssertionError` naming the refused
    requests at the first step that does not succeed."""
    serve(world, statements, trained["served"], world["url"], tmp_path)
    outcome, enforcer = train(world, statements, name, validation=False)
    if enforcer.denied:
        raise AssertionError(f"refused: {[str(r) for r in enforcer.denied]}")
    assert outcome.status == "Completed", outcome.failure_reason


# ------------------------------------------------------------------------------- tests


def test_a_training_job_runs_under_the_execution_role(world, trained):
    from safetensors import safe_open

    outcome, enforcer = trained["outcome"], trained["enforcer"]
    assert not enforcer.denied, [str(r) for r in enforcer.denied]
    assert outcome.status == "Completed", outcome.failure_reason
    assert outcome.model_artifacts == f"s3://{BUCKET}/jobs/demo-ada-m1-1/output/model.tar.gz"
    assert outcome.metrics["train:step"] == HYPERPARAMETERS["max_train_steps"]

    store, work = world["store"], world["work"]
    store.get_file(outcome.model_artifacts, work / "check.tar.gz")
    with tarfile.open(work / "check.tar.gz") as archive:
        assert WEIGHTS in archive.getnames()
        archive.extract(WEIGHTS, work / "check", filter="data")
    with safe_open(work / "check" / WEIGHTS, "pt") as weights:
        keys = list(weights.keys())
        assert keys and all("lora" in key for key in keys)
        assert any(weights.get_tensor(key).abs().sum() > 0 for key in keys)
    assert store.exists(f"s3://{BUCKET}/jobs/demo-ada-m1-1/output/output.tar.gz")

    # What the platform did, as the role: every input channel read, logs and metrics written.
    assert {
        ("s3:GetObject", "users"),
        ("s3:GetObject", "base-models"),
        ("s3:GetObject", "code"),
        ("s3:PutObject", "jobs"),
    } <= object_requests(enforcer)
    actions = {r.action for r in enforcer.allowed}
    assert {"s3:ListBucket", "logs:PutLogEvents", "cloudwatch:PutMetricData"} <= actions
    logs = boto3.client("logs", region_name=REGION)
    (stream,) = logs.describe_log_streams(
        logGroupName="/aws/sagemaker/TrainingJobs", logStreamNamePrefix="demo-ada-m1-1/"
    )["logStreams"]
    events = logs.get_log_events(
        logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream["logStreamName"]
    )["events"]
    assert any("step=2 loss=" in event["message"] for event in events)


def test_the_endpoint_fetches_its_models_and_adapters_and_nothing_else(
    world, role, trained, tmp_path
):
    served = trained["served"]
    assert served, f"nothing to serve: the training job failed ({trained['outcome']})"
    assert served["user"] == model_name(USER, MODEL)
    assert served["shared"].startswith("shared-base-")
    assert served["runtime"].startswith("runtime-")
    url = world["url"]
    assert url == f"s3://{BUCKET}/endpoints/{ENDPOINT}/models/"

    adapter, enforcer = serve(world, role, served, url, tmp_path)

    assert not enforcer.denied, [str(r) for r in enforcer.denied]
    published = f"s3://{BUCKET}/endpoints/{ENDPOINT}/adapters/{model_name(USER, MODEL)}"
    assert adapter == world["store"].get_bytes(published + ".safetensors")
    fetched = [r.resource for r in enforcer.allowed if r.action == "s3:GetObject"]
    assert len(fetched) == 4

    # Outside the artifact bucket's prefixes the role reads nothing.
    other = "other-bucket"
    world["store"].create_bucket(other)
    world["store"].put_bytes(f"s3://{other}/models/{served['user']}.tar.gz", b"x")
    world["store"].put_bytes(f"s3://{BUCKET}/models/{served['user']}.tar.gz", b"x")
    with iam_enforced.enforced(role, REGION) as enforcer:
        for outside in (f"s3://{other}/models/", f"s3://{BUCKET}/models/"):
            with pytest.raises(ClientError, match="AccessDenied"):
                sagemaker_platform.fetch_model(
                    outside, f"{served['user']}.tar.gz", tmp_path / "x.tar.gz", REGION
                )
    assert [r.action for r in enforcer.denied] == ["s3:GetObject", "s3:GetObject"]


def test_every_statement_of_the_role_is_needed(world, role, trained, tmp_path):
    """Least privilege, checked: without any one statement (but ECR's: no image is pulled
    here) serving or training fails on one of that statement's actions."""
    assert trained["outcome"].status == "Completed"  # with all of them it succeeds
    checked = 0
    for index, statement in enumerate(role):
        if any(action.startswith("ecr:") for action in as_list(statement["Action"])):
            continue
        work = tmp_path / f"without-{index}"
        work.mkdir()
        with pytest.raises(AssertionError, match=refusal(statement)):
            journey(world, trained, iam_enforced.without(role, index), work, f"without-{index}")
        checked += 1
    assert checked == len(role) - 2


def training_request(settings, job_name: str, base_model: str, **hyperparameters):
    return TrainingJobRequest(
        job_name=job_name,
        user_id=USER,
        model_id=job_name.replace("platform-", ""),
        instance_data_uri=f"s3://{settings.bucket}/users/{USER}/training/{MODEL}/",
        base_model=base_model,
        output_path=jobs_output_path(settings.bucket),
        hyperparameters={**HYPERPARAMETERS, "num_validation_images": 0, **hyperparameters},
    )


def test_moto_runs_submitted_jobs_for_real(world, tmp_path):
    from helpers.infra.aws.jobs import SageMakerTrainingJobs
    from helpers.infra.aws.metadata import DynamoDbMetadataStore

    settings, store = world["settings"], world["store"]
    metadata = DynamoDbMetadataStore(TABLE, REGION)
    metadata.create_table()
    jobs = SageMakerTrainingJobs(settings, store, metadata)
    broken = f"s3://{BUCKET}/base-models/broken/"
    store.put_bytes(broken + "model_index.json", b"{not a pipeline")

    with sagemaker_platform.install_training_platform(tmp_path) as platform:
        submitted = jobs.submit(training_request(settings, "platform-ok", settings.base_model))
        jobs.submit(training_request(settings, "platform-bad", broken))
        assert submitted.status == JobStatus.RUNNING
        platform.wait(timeout=120)
        done = jobs.describe("platform-ok", USER)
        bad = jobs.describe("platform-bad", USER)

    assert done.status == JobStatus.COMPLETED, done.failure_reason
    assert done.output_uri == f"s3://{BUCKET}/jobs/platform-ok/output/model.tar.gz"
    assert done.last_step == 2
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(done.output_uri))) as archive:
        assert WEIGHTS in archive.getnames()
    assert "step=2 loss=" in jobs.logs("platform-ok", USER)
    assert metadata.get_job(USER, "platform-ok").status == JobStatus.COMPLETED

    assert bad.status == JobStatus.FAILED
    assert bad.failure_reason.startswith("AlgorithmError: ")
    # The script's own reason (its failure file), naming the channel it could not load.
    assert "input/data/base_model" in bad.failure_reason


def test_a_stopped_job_ends_stopped_and_its_script_with_it(world, tmp_path):
    from helpers.infra.aws.jobs import SageMakerTrainingJobs

    settings, store = world["settings"], world["store"]
    jobs = SageMakerTrainingJobs(settings, store)
    client = boto3.client("sagemaker", region_name=REGION)
    with sagemaker_platform.install_training_platform(tmp_path) as platform:
        jobs.submit(training_request(settings, "platform-stop", settings.base_model))
        deadline = time.monotonic() + 30
        while (described := client.describe_training_job(TrainingJobName="platform-stop"))[
            "SecondaryStatus"
        ] != "Training" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert described["TrainingJobStatus"] == "InProgress"
        assert described["SecondaryStatus"] == "Training"

        assert jobs.stop("platform-stop", USER).status == JobStatus.RUNNING  # Stopping
        platform.wait(timeout=30)
        assert jobs.describe("platform-stop", USER).status == JobStatus.STOPPED
        with pytest.raises(ClientError, match="in status Stopped"):
            client.stop_training_job(TrainingJobName="platform-stop")
    assert not store.exists(f"s3://{BUCKET}/jobs/platform-stop/output/model.tar.gz")


def test_the_platform_serves_a_moto_server_of_this_process_too(moto_server, tmp_path):
    """As notebook kernels use it: jobs submitted over HTTP run, and their own calls reach the
    server (here a job whose base model folder is empty fails as SageMaker fails it)."""
    from helpers.infra.aws.jobs import SageMakerTrainingJobs
    from helpers.infra.aws.store import S3ArtifactStore
    from helpers.settings import Settings

    settings = Settings(
        backend="sagemaker", work_dir=tmp_path, bucket="server-bucket", region=REGION,
        role_arn="arn:aws:iam::123456789012:role/sagemaker",
    )  # fmt: skip
    store = S3ArtifactStore(REGION)
    store.create_bucket(settings.bucket)
    store.put_bytes(f"s3://{settings.bucket}/users/{USER}/training/{MODEL}/00.png", b"png")
    jobs = SageMakerTrainingJobs(settings, store)
    missing = f"s3://{settings.bucket}/base-models/missing/"
    with sagemaker_platform.install_training_platform(tmp_path / "jobs") as platform:
        jobs.submit(training_request(settings, "platform-server", missing))
        platform.wait(timeout=30)
        failed = jobs.describe("platform-server", USER)
    assert failed.status == JobStatus.FAILED
    assert failed.failure_reason.startswith(
        f'ClientError: No S3 objects found under S3 URL "{missing}"'
    )
    assert (
        tmp_path / "jobs" / "platform-server" / "input" / "data" / "instance" / "00.png"
    ).is_file()
