"""The composition root: `open_backend` picks every part by `settings.backend`, and it is the
only code (with the settings) that names a backend."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aws_fakes import fake_aws

from helpers.backend import LocalBackend, SageMakerBackend, open_backend
from helpers.infra.local.jobs import LocalTrainingJobs
from helpers.infra.local.metadata import SqliteMetadataStore
from helpers.infra.local.store import LocalArtifactStore
from helpers.services.local_onboarding import LocalOnboarding
from helpers.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REGION = "eu-west-1"


def test_local_backend_gives_files_sqlite_and_subprocess_jobs(tmp_path):
    with open_backend(Settings(work_dir=tmp_path, base_model=str(tmp_path))) as backend:
        assert isinstance(backend, LocalBackend)
        assert isinstance(backend.store, LocalArtifactStore)
        assert backend.store.root == tmp_path / "store"
        assert isinstance(backend.metadata, SqliteMetadataStore)
        assert backend.metadata.path == tmp_path / "metadata.sqlite"
        provisioned = backend.provision()
        assert provisioned.role_arn is None and provisioned.store is backend.store
        assert (tmp_path / "store" / "workshop-artifacts").is_dir()
        assert isinstance(backend.jobs, LocalTrainingJobs)
        assert backend.jobs.jobs_dir == tmp_path / "jobs"
        assert backend.store is backend.store  # opened once
        assert isinstance(backend.onboarding(), LocalOnboarding)
        with pytest.raises(ValueError, match="no onboarding state machine"):
            backend.onboarding(state_machine_arn="arn:aws:states:eu-west-1:1:stateMachine:x")
        assert type(backend.endpoint()).__name__ == "LocalEndpoint"
        assert backend.serving_runtime("s3://b/endpoints/e/models/") is None
    assert "jobs" not in backend.__dict__  # closed


def test_sagemaker_backend_gives_s3_dynamodb_and_sagemaker(tmp_path, monkeypatch):
    fake_aws(monkeypatch, REGION)
    settings = Settings(
        backend="sagemaker",
        work_dir=tmp_path,
        base_model="org/model",
        region=REGION,
        role_arn="arn:aws:iam::123456789012:role/workshop-sagemaker",
    )
    backend = open_backend(settings)
    assert isinstance(backend, SageMakerBackend)
    assert type(backend.store).__name__ == "S3ArtifactStore"
    assert (type(backend.metadata).__name__, backend.metadata.table_name) == (
        "DynamoDbMetadataStore",
        settings.table_name,
    )
    assert type(backend.jobs).__name__ == "SageMakerTrainingJobs"
    assert type(backend.endpoint()).__name__ == "SageMakerEndpoint"
    machine = "arn:aws:states:eu-west-1:123456789012:stateMachine:onboarding"
    onboarding = backend.onboarding(state_machine_arn=machine)
    assert type(onboarding).__name__ == "StepFunctionsOnboarding"
    # Without the stack's state machine, this process drives the SageMaker jobs itself.
    assert isinstance(backend.onboarding(), LocalOnboarding)


def test_an_unknown_backend_names_the_choices(tmp_path):
    settings = Settings(work_dir=tmp_path, base_model=str(tmp_path))
    object.__setattr__(settings, "backend", "azure")
    with pytest.raises(ValueError, match=r"\['local', 'sagemaker'\]"):
        open_backend(settings)


def test_ports_and_the_composition_root_never_import_boto3():
    # The API in Lambda imports the ports; boto3 must come only with the AWS parts.
    code = (
        "import sys, helpers.backend, helpers.ports.store, helpers.ports.metadata, "
        "helpers.ports.jobs; sys.exit('boto3' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


BACKEND_TEST = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](local|sagemaker)["']""")


def test_only_the_composition_root_and_settings_name_a_backend():
    allowed = {ROOT / "src/helpers/backend.py", ROOT / "src/helpers/settings.py"}
    places = [
        *(ROOT / "src").rglob("*.py"),
        *(ROOT / "notebooks").glob("*.ipynb"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in places
        if path not in allowed
        for line in path.read_text().splitlines()
        if BACKEND_TEST.search(line)
    ]
    assert found == []
