"""The environment checks: each returns a result, with a fix when it fails, and never raises."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.infra.local import triton_server
from helpers.settings import PROJECT_ROOT, load_settings
from helpers.workshop import aws_stack, environment
from helpers.workshop.environment import (
    SUPPORTED_PYTHON,
    CheckResult,
    ChecksFailed,
    check_accelerator,
    check_aws_credentials,
    check_base_model,
    check_node,
    check_numpy,
    check_python,
    check_tritonserver,
    render_checks,
    require,
    run_checks,
)

_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@pytest.fixture
def pipeline_dir(tmp_path: Path) -> Path:
    """A directory shaped like a diffusers pipeline (contents are not read by the check)."""
    path = tmp_path / "pipeline"
    for name in environment.PIPELINE_SUBFOLDERS:
        (path / name).mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return path


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for name in _CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_result_renders_pass_and_fail_with_fix():
    assert str(CheckResult("Python", True, "3.11.7")) == "PASS  Python 3.11.7"
    failed = CheckResult("numpy", False, "2.1.0", fix='pip install "numpy<2"')
    assert str(failed) == 'FAIL  numpy 2.1.0 -> fix: pip install "numpy<2"'
    text = render_checks([CheckResult("Python", True, "3.11.7"), failed])
    assert text.splitlines() == [
        "PASS  Python 3.11.7",
        'FAIL  numpy  2.1.0 -> fix: pip install "numpy<2"',
        "1 of 2 checks failed",
    ]


def test_python(monkeypatch):
    assert check_python().ok
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    result = check_python()
    assert not result.ok
    assert "3.9.18" in result.detail and "3.10-3.12" in result.fix
    monkeypatch.setattr(sys, "version_info", (3, 13, 1, "final", 0))
    assert not check_python().ok  # numpy 1.26.4, the pin, has no wheels for 3.13


def test_supported_python_agrees_with_pyproject():
    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    spec = re.search(r'^requires-python = "(.+)"$', text, re.MULTILINE).group(1)
    (low, high) = SUPPORTED_PYTHON
    assert spec == f">={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}"


def test_numpy(monkeypatch):
    import numpy

    assert check_numpy().ok
    monkeypatch.setattr(numpy, "__version__", "2.1.3")
    result = check_numpy()
    assert not result.ok
    assert "numpy==1.26.4" in result.fix
    monkeypatch.setitem(sys.modules, "numpy", None)
    assert check_numpy() == CheckResult("numpy", False, "not installed", result.fix)


def test_accelerator_cpu_and_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = check_accelerator()
    assert result.ok and result.detail.startswith("CPU only")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = SimpleNamespace(name="NVIDIA A10G", total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    result = check_accelerator()
    assert result.ok and "NVIDIA A10G, 24 GiB" in result.detail


def test_accelerator_without_torch_fails_with_the_pin(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    result = check_accelerator()
    assert not result.ok and "torch==2.13.0" in result.fix


def test_aws_credentials_missing(no_aws_credentials):
    local = check_aws_credentials(needed=False)
    assert local.ok and "none found" in local.detail
    sagemaker = check_aws_credentials(needed=True)
    assert not sagemaker.ok
    assert "aws configure" in sagemaker.fix


def test_aws_credentials_present_are_not_printed(no_aws_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-testing")
    result = check_aws_credentials(needed=True)
    assert result.ok and "env" in result.detail
    assert "AKIATESTING" not in str(result) and "secret-testing" not in str(result)


def test_a_check_that_breaks_returns_a_failure(monkeypatch):
    import boto3

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(boto3, "Session", broken)
    result = check_aws_credentials(needed=False)
    assert not result.ok and "RuntimeError: boom" in result.detail and result.fix


def test_base_model(pipeline_dir, tmp_path):
    result = check_base_model(pipeline_dir)
    assert result.ok and "StableDiffusionPipeline" in result.detail
    (pipeline_dir / "vae").rmdir()
    result = check_base_model(pipeline_dir)
    assert not result.ok and result.detail.endswith("lacks vae")
    assert "make base-model" in result.fix
    assert not check_base_model(tmp_path / "missing").ok


def test_tritonserver_runs_for_real(tmp_path):
    settings = load_settings(work_dir=tmp_path, base_model=str(tmp_path))
    result = check_tritonserver(settings)
    assert result.ok, result
    assert result.detail.startswith("2.51")
    assert (tmp_path / "logs" / "check-tritonserver.log").is_file()


def test_tritonserver_failure_names_the_fix(tmp_path, monkeypatch):
    def no_libpython(home=None):
        raise triton_server.TritonServerError(
            "the Python-backend stub cannot start: ... libpython3.11.so.1.0: cannot open shared "
            "object file\nfix: install the shared Python library, e.g. `apt-get install "
            "libpython3.11` on Debian/Ubuntu"
        )

    monkeypatch.setattr(triton_server, "prepare_python_backend", no_libpython)
    result = check_tritonserver(load_settings(work_dir=tmp_path, base_model=str(tmp_path)))
    assert not result.ok
    assert "libpython3.11.so.1.0" in result.detail and "fix" not in result.detail
    assert "apt-get install libpython3.11" in result.fix


def test_run_checks_covers_everything(tmp_path, pipeline_dir, no_aws_credentials):
    settings = load_settings(work_dir=tmp_path, base_model=str(pipeline_dir))
    results = run_checks(settings)
    names = [result.name for result in results]
    assert names == [
        "Python",
        "numpy",
        "accelerator",
        "AWS credentials",
        "Node.js",
        "base model",
        "tritonserver",
    ]
    assert all(result.ok for result in results), render_checks(results)
    assert render_checks(results).endswith("all 7 checks passed")


def test_node_found(monkeypatch):
    monkeypatch.setattr(aws_stack, "node_version", lambda: "v20.20.2")
    result = check_node(needed=True)
    assert result.ok and result.detail.startswith("v20.20.2")


@pytest.mark.parametrize(("version", "found"), [(None, "not found"), ("v18.19.0", "too old")])
def test_node_missing_or_old(monkeypatch, version, found):
    monkeypatch.setattr(aws_stack, "node_version", lambda: version)
    local = check_node(needed=False)
    assert local.ok and found in local.detail  # the local backend runs without it
    assert "notebook 04 skips the CDK synthesis" in local.detail and "Node.js 20" in local.detail
    sagemaker = check_node(needed=True)
    assert not sagemaker.ok and found in sagemaker.detail
    assert "Node.js 20 or newer" in sagemaker.fix


def test_require_stops_on_a_failure_with_its_fix():
    require([CheckResult("Python", True, "3.11.7")])
    with pytest.raises(ChecksFailed, match=r"FAIL  numpy 2.1.0 -> fix: pin it"):
        require(
            [CheckResult("Python", True, "3.11.7"), CheckResult("numpy", False, "2.1.0", "pin it")]
        )


def test_one_result_renders_without_a_summary():
    assert render_checks([CheckResult("Python", True, "3.11.7")]) == "PASS  Python 3.11.7"
