"""Every notebook on the `sagemaker` backend, in order, as an attendee in SageMaker Studio runs
them, against an AWS emulated on this machine:

- S3, DynamoDB, IAM, Step Functions and SageMaker's control plane: a moto server (`moto_server`);
- training jobs: the training script itself, run by moto's CreateTrainingJob under SageMaker's
  folder contract from the job's channels in the emulated S3 (`sagemaker_platform`);
- the multi-model endpoint: the local router over a real `tritonserver`, loading the archives the
  notebooks put in the emulated S3 (`sagemaker_endpoint_platform`);
- notebook 04's deployed stack: the synthesized template's state machine, functions and endpoint
  (`emulated_stack`).

Each notebook's kernel runs under exactly the Studio role's policy that the README lists
(`studio_role`, enforced in the kernel by `iam_kernel`): a call it does not allow is refused and
journaled, and the test fails on any refusal. The API and packaging functions run under their
synthesized roles the same way. What is not emulated, and how it is checked instead, is listed in
the README ("Running it in SageMaker Studio").
"""

from __future__ import annotations

import boto3
import iam_enforced
import nbformat
import pytest
from emulated_stack import deploy_stack
from iam_kernel import kernel_enforcement
from sagemaker_endpoint_platform import emulate_serving_runtime, install_endpoint_platform
from sagemaker_platform import install_training_platform
from studio_role import create_execution_role, studio_policy

from helpers.workshop.aws_stack import node_problem
from helpers.workshop.notebooks import run_notebook, workshop_notebooks

REGION = "eu-west-1"
BUCKET = "workshop-studio-test"
TABLE = "workshop-models"
ACCOUNT = "123456789012"
#: As the console makes Studio's roles: under service-role/.
ROLE_NAME = "AmazonSageMaker-ExecutionRole-test"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/service-role/{ROLE_NAME}"


def _text(notebook) -> str:
    return "".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def _images(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def _requests(journal: list[dict]) -> list[iam_enforced.Request]:
    return [iam_enforced.Request(r["action"], r["resource"], r["context"]) for r in journal]


def _keys(prefix: str) -> list[str]:
    s3 = boto3.client("s3", region_name=REGION)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.skipif(
    node_problem() is not None, reason="notebook 04's stack needs the CDK's Node.js"
)
def test_every_notebook_runs_on_the_sagemaker_backend_under_the_studio_role(
    tmp_path, moto_server, monkeypatch
):
    assert create_execution_role(REGION, ROLE_NAME, path="/service-role/") == ROLE_ARN
    work_dir = tmp_path / "work"
    studio = kernel_enforcement(
        tmp_path / "iam-studio", studio_policy(BUCKET, TABLE, REGION, ACCOUNT, ROLE_ARN), REGION
    )
    common = {"backend": "sagemaker", "work_dir": str(work_dir), "bucket": BUCKET, "region": REGION}
    notebooks = workshop_notebooks()

    # Studio's kernels run as the execution role, assumed: the notebooks find it from there.
    session = boto3.client("sts", region_name=REGION).assume_role(
        RoleArn=ROLE_ARN, RoleSessionName="studio"
    )["Credentials"]
    identity = {
        "AWS_ACCESS_KEY_ID": session["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": session["SecretAccessKey"],
        "AWS_SESSION_TOKEN": session["SessionToken"],
        **studio.env,
    }

    def run(index: int, **parameters):
        with pytest.MonkeyPatch.context() as kernel:
            for name, value in identity.items():
                kernel.setenv(name, value)
            executed = run_notebook(
                notebooks[index], tmp_path / "executed", {**common, **parameters}, progress=False
            )
        assert studio.denials() == [], f"{notebooks[index].name}: {studio.denials()}"
        return nbformat.read(executed.output, as_version=4)

    emulate_serving_runtime(work_dir)  # the one part of the endpoint's software not emulated
    with (
        install_training_platform(tmp_path / "training"),
        install_endpoint_platform(tmp_path / "endpoints", synchronous=True) as endpoints,
    ):
        setup = run(0, role_arn="", check_triton=False)  # role_arn empty: the session's role
        setup_requests = _requests(studio.allowed())
        # Few steps and pictures: the local notebook tests judge the models; this, the path.
        finetune = run(1, role_arn="", max_train_steps=60, seeds="0,1")
        serving = run(
            2,
            role_arn="",
            extra_models=1,
            pictures_per_user=4,
            load_test_users=2,
            load_test_seconds=3,
            compare_modes=False,
            interactive=False,
        )
        assert endpoints.tritonserver_pids() == []  # notebook 03 stopped its endpoint

        # The operator deploys the stack with what notebooks 02 and 03 left in S3: the uploaded
        # base model and the serving runtime; the admin key is the operator's, in work_dir.
        [base_model] = {key.split("/")[1] for key in _keys("base-models/")}
        [runtime] = [
            key.rsplit("/", 1)[-1].removesuffix(".tar.gz")
            for key in _keys("endpoints/workshop-mme/models/runtime-")
        ]
        from helpers.api.auth import load_admin_key

        admin_key, _ = load_admin_key(work_dir, create=True)
        with deploy_stack(
            tmp_path / "stack",
            REGION,
            BUCKET,
            TABLE,
            admin_key,
            base_model=f"s3://{BUCKET}/base-models/{base_model}/",
            serving_runtime=runtime,
        ) as stack:
            api = run(
                3,
                api_url=stack.api_url,
                max_train_steps=30,
                num_inference_steps=4,
                synth_cdk=False,
            )
        assert stack.errors == [] and stack.denials() == {}
        assert [e.status for e in stack.executions] == ["SUCCEEDED"]
    assert endpoints.tritonserver_pids() == []

    # Notebook 01: an encrypted, private bucket and the table, and the role found by itself.
    assert f"s3://{BUCKET} in {REGION} (encrypted, private)" in _text(setup)
    s3 = boto3.client("s3", region_name=REGION)
    assert s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert all(s3.get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"].values())
    ttl = boto3.client("dynamodb", region_name=REGION).describe_time_to_live(TableName=TABLE)
    assert ttl["TimeToLiveDescription"]["TimeToLiveStatus"] in ("ENABLED", "ENABLING")
    assert iam_enforced.Request("iam:GetRole", ROLE_ARN) in setup_requests  # path included
    # Notebook 01 needs every statement the README marks for it, and no other.
    policy = studio_policy(BUCKET, TABLE, REGION, ACCOUNT, ROLE_ARN)
    own = studio_policy(BUCKET, TABLE, REGION, ACCOUNT, ROLE_ARN, notebooks=["01"])
    for index, statement in enumerate(policy):
        if statement["Sid"] in {s["Sid"] for s in own}:
            less = iam_enforced.without(policy, index)
            refused = [r for r in setup_requests if not iam_enforced.is_allowed(less, r)]
            assert refused, f"notebook 01 does not need {statement['Sid']}"
    assert [str(r) for r in setup_requests if not iam_enforced.is_allowed(own, r)] == []
    # Notebook 02: both demo users trained by SageMaker jobs and published, with pictures.
    text = _text(finetune)
    for user in ("demo-ada", "demo-bo"):
        assert f"{user}: trained in" in text and ", AVAILABLE" in text
    assert _images(finetune) >= 4  # photos, base, tuned pictures, loss curves
    # Notebook 03: every user's archive served from S3 by the endpoint, the load test clean.
    text = _text(serving)
    for user in ("demo-ada", "demo-bo"):
        assert f"{user}: cold" in text
        assert f"s3://{BUCKET}/endpoints/workshop-mme/models/{user}--m1.tar.gz" in text
    assert "'failures': 0" in text and "endpoint stopped: NotDeployed" in text
    # Notebook 04: a user onboarded through the deployed API, trained by the state machine.
    text = _text(api)
    assert "retry: 202, same model: True" in text and "AVAILABLE" in text
    assert "404  GET /v1/models/m1" in text and "warm" in text
    assert _images(api) >= 2
