"""The SageMaker Studio role: the README's list of permissions is the one the tests enforce, the
kernel hook enforces it on a whole process, and without one of its statements notebook 01 stops
with the fix.

Notebook 01 runs with papermill against a moto server, its kernel under the Studio policy
(`tests/studio_role.py`) through `tests/iam_kernel/sitecustomize.py`: every AWS call of the
kernel is authorized first, and every refused one is recorded even if the notebook's code
swallows the error (provisioning checks do). Without `s3:CreateBucket` the notebook stops at
provisioning, and its output tells the attendee which permission to add. That every notebook
needs nothing beyond the list, and notebook 01 each statement marked for it, is
`test_notebooks_sagemaker.py`'s to show: it runs all four under the whole policy.
"""

from __future__ import annotations

import json
import re

import iam_enforced
import pytest
from iam_kernel import kernel_enforcement
from studio_role import (
    PERMISSIONS,
    create_execution_role,
    readme_block,
    render_readme,
    studio_policy,
)

from helpers.settings import PROJECT_ROOT
from helpers.workshop.notebooks import run_notebook, workshop_notebooks

REGION = "eu-west-1"
BUCKET = "workshop-studio-role"
TABLE = "workshop-models"  # the settings' default: notebook 01 has no parameter for it
ROLE_NAME = "workshop-sagemaker"
ROLE_ARN = f"arn:aws:iam::{iam_enforced.ACCOUNT}:role/{ROLE_NAME}"
SETUP = workshop_notebooks()[0]
_ACTION = re.compile(r"\b(?:s3|dynamodb|iam|sagemaker|cloudwatch|sts):[A-Za-z]+\b")


def _policy(**options) -> list[dict]:
    return studio_policy(BUCKET, TABLE, REGION, iam_enforced.ACCOUNT, ROLE_ARN, **options)


def _requests(records: list[dict]) -> list[iam_enforced.Request]:
    return [iam_enforced.Request(r["action"], r["resource"], r["context"]) for r in records]


def _text(path) -> str:
    notebook = json.loads(path.read_text())
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            for text in (output.get("text"), output.get("data", {}).get("text/plain")):
                parts.append("".join(text) if isinstance(text, list) else text or "")
            parts.append(output.get("evalue", ""))
    return "".join(parts)


# ------------------------------------------------------------------------------- the list


def test_readme_states_the_policy_the_tests_enforce():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert readme_block(readme) == render_readme(), (
        "the README's Studio role block is stale: paste `python tests/studio_role.py` over it"
    )


def test_the_studio_policy_is_least_privilege():
    statements = _policy()
    assert len({s["Sid"] for s in statements}) == len(statements) == len(PERMISSIONS)
    for statement in statements:
        assert statement["Effect"] == "Allow"
        assert all("*" not in action for action in statement["Action"]), statement
        for resource in statement["Resource"]:
            # Only CloudWatch's metric reads, which have no resource-level permissions, are
            # on "*"; everything else names the workshop's resources.
            if resource == "*":
                assert statement["Action"] == ["cloudwatch:GetMetricStatistics"]
                continue
            named = (BUCKET, TABLE, ROLE_ARN, "workshop-mme", "training-job/", "cdk-hnb659fds-")
            assert any(name in resource for name in named), resource
    (passing,) = [s for s in statements if s["Action"] == ["iam:PassRole"]]
    assert passing["Resource"] == [ROLE_ARN]
    assert passing["Condition"] == {
        "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}
    }
    assert {s["Sid"] for s in _policy(notebooks=["01"])} == {
        "CreateArtifactBucket",
        "ListArtifactBucket",
        "StoreRoundTrip",
        "CreateMetadataTable",
        "ReadExecutionRole",
    }


def test_provisioning_fixes_name_the_listed_permissions(tmp_path):
    """What a failed provisioning check tells the attendee to allow is what the list grants
    for it, action for action."""
    from helpers import load_settings
    from helpers.backend import open_backend

    backend = open_backend(load_settings(backend="sagemaker", work_dir=tmp_path, bucket=BUCKET))
    actions = {p.sid: set(p.actions) for p in PERMISSIONS}
    assert set(_ACTION.findall(backend.store_place().fix)) == actions["CreateArtifactBucket"]
    assert set(_ACTION.findall(backend.metadata_place().fix)) == actions["CreateMetadataTable"]
    assert set(_ACTION.findall(backend.round_trip_fix())) == (
        actions["StoreRoundTrip"] | actions["ListArtifactBucket"]
    )


# --------------------------------------------------------------------- the kernels' check

_CHILD = """
import boto3
from botocore.exceptions import ClientError
from moto import mock_aws

with mock_aws():
    s3 = boto3.client("s3", region_name="eu-west-1")
    try:
        s3.list_objects_v2(Bucket="mine", Prefix="users/")
    except ClientError as error:
        print("list:", error.response["Error"]["Code"])
    try:
        s3.put_object(Bucket="mine", Key="users/a", Body=b"x")
    except ClientError as error:
        print("put:", error.response["Error"]["Code"])
    try:
        boto3.client("ec2", region_name="eu-west-1").describe_instances()
    except NotImplementedError:
        print("ec2: untaught")
"""


def test_the_kernel_hook_enforces_a_policy_on_a_whole_process(tmp_path):
    """What `sitecustomize` does in a process the test does not patch: the allowed request,
    the refused one and the untaught call each land in the journals, whatever the code does
    with the errors; without the policy variable the process is left alone."""
    import os
    import subprocess
    import sys

    statements = [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::mine"}]
    enforcement = kernel_enforcement(tmp_path, statements, REGION)
    env = {**os.environ, **enforcement.env, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    env.pop("AWS_ENDPOINT_URL", None)
    run = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.stdout.splitlines() == ["list: NoSuchBucket", "put: AccessDenied", "ec2: untaught"]
    assert [(r["action"], r["context"]) for r in enforcement.allowed()] == [
        ("s3:ListBucket", {"s3:prefix": "users/"})
    ]
    assert [(r["decision"], r["action"], r["resource"]) for r in enforcement.denials()] == [
        ("denied", "s3:PutObject", "arn:aws:s3:::mine/users/a"),
        ("unknown", "ec2:DescribeInstances", ""),
    ]

    env.pop("WORKSHOP_TEST_IAM_POLICY")
    probe = "import botocore.client as c; print(c.BaseClient._make_api_call.__qualname__)"
    plain = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert plain.stdout.strip() == "BaseClient._make_api_call"


# ------------------------------------------------------------------------------- notebook 01


@pytest.fixture
def execution_role(moto_server):
    """The SageMaker execution role, made in moto as an administrator (the test process is
    not under the policy; only the notebook's kernel is)."""
    assert create_execution_role(REGION, ROLE_NAME) == ROLE_ARN
    return ROLE_ARN


def _run_setup(tmp_path, monkeypatch, statements):
    enforcement = kernel_enforcement(tmp_path / "iam", statements, REGION)
    for name, value in enforcement.env.items():
        monkeypatch.setenv(name, value)
    parameters = {
        "backend": "sagemaker",
        "bucket": BUCKET,
        "region": REGION,
        "role_arn": ROLE_ARN,
        "check_triton": False,
        "work_dir": str(tmp_path / "work"),
    }
    return enforcement, lambda: run_notebook(
        SETUP, tmp_path / "executed", parameters, progress=False
    )


@pytest.mark.slow
@pytest.mark.notebook
def test_setup_notebook_without_create_bucket_stops_with_the_fix(
    tmp_path, monkeypatch, execution_role
):
    from papermill.exceptions import PapermillExecutionError

    statements = [s for s in _policy() if s["Sid"] != "CreateArtifactBucket"]
    enforcement, run = _run_setup(tmp_path, monkeypatch, statements)
    with pytest.raises(PapermillExecutionError) as failure:
        run()
    assert failure.value.ename == "ChecksFailed"
    assert [(d["action"], d["resource"]) for d in enforcement.denials()] == [
        ("s3:CreateBucket", f"arn:aws:s3:::{BUCKET}")
    ]
    # What the attendee reads: the check that failed, AWS's refusal, and the permissions to add.
    text = _text(tmp_path / "executed" / SETUP.name)
    assert f"FAIL  artifact store s3://{BUCKET} in {REGION}" in text
    assert "AccessDenied" in text and "s3:CreateBucket" in text
    assert "let this session create and configure the bucket (s3:CreateBucket" in text
    assert "PASS  metadata table" in text  # the other checks still ran


# ------------------------------------------------------------------------- notebooks 02-03


def test_training_and_endpoint_calls_of_notebooks_02_and_03_stay_within_the_list(
    tmp_path, monkeypatch
):
    """Notebook 02's and 03's AWS calls, made in this process as those notebooks make them
    (without the training itself, the serving runtime and the model archives, which need the
    emulated jobs and endpoint), under the Studio policy against moto: none refused, and every
    statement marked for them needed."""
    from aws_fakes import fake_aws
    from moto import mock_aws
    from moto.sagemaker.models import FakeEndpointConfig

    from helpers import load_settings
    from helpers.backend import open_backend
    from helpers.domain.records import UserRecord
    from helpers.services.onboarding import request_model, training_request
    from helpers.services.packaging import latest_completed_jobs
    from helpers.services.photos import add_photos
    from helpers.workshop.demo_subjects import get_demo_subject, subject_images
    from helpers.workshop.personalization import png_bytes

    fake_aws(monkeypatch, REGION)
    # moto's allow-list of instance types stops before the g5 family.
    monkeypatch.setattr(FakeEndpointConfig, "validate_instance_type", lambda self, _: None)
    settings = load_settings(
        backend="sagemaker", work_dir=tmp_path, bucket=BUCKET, region=REGION, role_arn=ROLE_ARN
    )
    photos = [png_bytes(image) for image in subject_images(get_demo_subject("demo-ada"), 3)]
    statements = _policy()
    with mock_aws():
        create_execution_role(REGION, ROLE_NAME)
        with iam_enforced.enforced(statements, REGION) as enforcer:
            # 02: provision, a user and their photos, a model, its training job.
            parts = open_backend(settings)
            parts.provision()
            if parts.metadata.get_user("demo-ada") is None:
                parts.metadata.put_user(UserRecord("demo-ada"))
            files = [(f"photo-{i}.png", data) for i, data in enumerate(photos)]
            add_photos(parts.store, settings, "demo-ada", files)
            hyperparameters = {"max_train_steps": 2, "num_validation_images": 0}
            model, _ = request_model(
                parts.metadata, parts.store, settings, "demo-ada", hyperparameters
            )
            job = parts.jobs.submit(training_request(settings, model))
            parts.jobs.wait(job.job_name, "demo-ada", timeout=5, poll=0.1)
            parts.close()
            # 03: provision, the completed jobs, the endpoint's whole life.
            parts = open_backend(settings)
            parts.provision()
            assert list(latest_completed_jobs(parts.jobs)) == ["demo-ada"]
            endpoint = parts.endpoint(max_loaded_models=2)
            endpoint.deploy()
            assert endpoint.wait().in_service
            runtime = endpoint.runtime_client()
            runtime.invoke_endpoint(
                EndpointName=endpoint.name, TargetModel="demo-ada--m1", Body=b"{}"
            )
            endpoint.metrics()
            endpoint.stop()
            parts.close()
    assert enforcer.denied == []
    unused = set()
    for index, statement in enumerate(statements):
        less = iam_enforced.without(statements, index)
        if all(iam_enforced.is_allowed(less, r) for r in enforcer.allowed):
            unused.add(statement["Sid"])
    # What these calls do not use: notebook 01's round trip and notebook 04's deployment; and
    # every statement they use is marked for notebook 02 or 03.
    assert unused == {"StoreRoundTrip", "CdkDeploy"}
    marked = {s["Sid"] for s in _policy(notebooks=["02", "03"])}
    assert {s["Sid"] for s in statements} - unused <= marked
