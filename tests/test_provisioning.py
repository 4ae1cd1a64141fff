"""Provisioning the store, the metadata table and the execution role, locally and on AWS."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from helpers.backend import open_backend
from helpers.infra.aws.roles import resolve_execution_role
from helpers.settings import load_settings
from helpers.workshop.provisioning import check_provisioning, check_store_round_trip

TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "sts:AssumeRole",
                "Principal": {"Service": "sagemaker.amazonaws.com"},
            }
        ],
    }
)


@pytest.fixture
def aws(monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield


def test_local_provisioning_is_idempotent(tmp_path):
    settings = load_settings(work_dir=tmp_path)
    first = open_backend(settings).provision()
    first.store.put_bytes(settings.uri("keep/me.txt"), b"data")
    again = open_backend(settings).provision()
    assert (tmp_path / "store" / "workshop-artifacts").is_dir()
    assert settings.metadata_path.exists()
    assert again.store.get_bytes(settings.uri("keep/me.txt")) == b"data"  # nothing wiped
    assert "metadata.sqlite" in str(again)


def test_sagemaker_provisioning_creates_a_private_encrypted_bucket_and_table(aws, tmp_path):
    role = boto3.client("iam").create_role(RoleName="workshop-sm", AssumeRolePolicyDocument=TRUST)
    settings = load_settings(
        backend="sagemaker",
        bucket="workshop-prov-test",
        region="eu-west-1",
        role_arn=role["Role"]["Arn"],
        work_dir=tmp_path,
    )
    result = open_backend(settings).provision()
    open_backend(settings).provision()  # idempotent
    s3 = boto3.client("s3", region_name="eu-west-1")
    assert s3.get_bucket_encryption(Bucket="workshop-prov-test")[
        "ServerSideEncryptionConfiguration"
    ]["Rules"]
    assert all(
        s3.get_public_access_block(Bucket="workshop-prov-test")[
            "PublicAccessBlockConfiguration"
        ].values()
    )
    tables = boto3.client("dynamodb", region_name="eu-west-1").list_tables()["TableNames"]
    assert "workshop-models" in tables
    assert result.role_arn == role["Role"]["Arn"]
    assert "execution role" in str(result)


def test_missing_role_names_the_setting(aws):
    settings = load_settings(backend="sagemaker", region="eu-west-1")
    with pytest.raises(ValueError, match="WORKSHOP_ROLE_ARN"):
        resolve_execution_role(settings)
    wrong = load_settings(
        backend="sagemaker", region="eu-west-1", role_arn="arn:aws:iam::123456789012:role/absent"
    )
    with pytest.raises(ValueError, match="cannot be read through IAM"):
        resolve_execution_role(wrong)


def test_studio_role_is_found_from_the_assumed_role_session(aws):
    # The console makes Studio's roles under service-role/, which the session's ARN drops.
    role = boto3.client("iam").create_role(
        RoleName="studio-exec", Path="/service-role/", AssumeRolePolicyDocument=TRUST
    )
    creds = boto3.client("sts").assume_role(RoleArn=role["Role"]["Arn"], RoleSessionName="studio")[
        "Credentials"
    ]
    session = boto3.Session(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        region_name="eu-west-1",
    )
    settings = load_settings(backend="sagemaker", region="eu-west-1")
    assert resolve_execution_role(settings, session=session) == role["Role"]["Arn"]
    assert role["Role"]["Arn"].endswith(":role/service-role/studio-exec")


def test_provisioning_checks_pass_locally_and_the_round_trip_cleans_up(tmp_path):
    settings = load_settings(work_dir=tmp_path)
    report = check_provisioning(open_backend(settings))
    assert report.ok and [result.name for result in report.results] == [
        "artifact store",
        "metadata table",
    ]
    assert str(report).endswith("all 2 checks passed")
    assert str(settings.metadata_path) in report.results[1].detail
    result = check_store_round_trip(open_backend(settings), report.provisioned.store)
    assert result.ok and "read them back, listed and deleted them" in result.detail
    assert report.provisioned.store.list(settings.uri("workshop/")) == []


def test_provisioning_checks_fail_with_the_fix_and_never_raise(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the work directory should be")
    report = check_provisioning(open_backend(load_settings(work_dir=blocker)))
    assert not report.ok and report.provisioned is None
    assert [result.ok for result in report.results] == [False, False]
    assert all("WORKSHOP_WORK_DIR" in result.fix for result in report.results)
    assert "2 of 2 checks failed" in str(report)


def test_round_trip_reports_a_store_that_loses_objects(tmp_path):
    settings = load_settings(work_dir=tmp_path)
    store = open_backend(settings).provision().store

    class Forgetful(type(store)):
        def list(self, prefix_uri):
            return []

    result = check_store_round_trip(open_backend(settings), Forgetful(settings.store_root))
    assert not result.ok and "the listing does not show it" in result.detail
    assert str(settings.store_root) in result.fix
    store.delete_prefix(settings.uri("workshop/"))

    class Broken(type(store)):
        def put_bytes(self, uri, data):
            raise PermissionError("read-only file system")

    result = check_store_round_trip(open_backend(settings), Broken(settings.store_root))
    assert not result.ok and "PermissionError: read-only file system" in result.detail


def test_provisioning_checks_on_aws_name_the_missing_role(aws, tmp_path):
    settings = load_settings(
        backend="sagemaker", bucket="workshop-check-test", region="eu-west-1", work_dir=tmp_path
    )
    report = check_provisioning(open_backend(settings))
    assert [(result.name, result.ok) for result in report.results] == [
        ("artifact store", True),
        ("metadata table", True),
        ("execution role", False),
    ]
    assert "WORKSHOP_ROLE_ARN" in report.results[2].fix and report.provisioned is None
    role = boto3.client("iam").create_role(RoleName="workshop-sm", AssumeRolePolicyDocument=TRUST)
    settings = settings.model_copy(update={"role_arn": role["Role"]["Arn"]})
    report = check_provisioning(open_backend(settings))
    assert report.ok and report.provisioned.role_arn == role["Role"]["Arn"]
    assert check_store_round_trip(open_backend(settings), report.provisioned.store).ok
