"""Settings: environment variables, overrides, and errors that name the setting and the fix."""

from __future__ import annotations

import pytest

from helpers import settings as settings_module
from helpers.settings import (
    DEFAULT_BASE_MODEL,
    PROJECT_ROOT,
    Settings,
    SettingsError,
    get_settings,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"WORKSHOP_{name.upper()}", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_run_locally_with_the_committed_base_model():
    settings = load_settings()
    assert settings.backend == "local"
    assert settings.base_model == str(DEFAULT_BASE_MODEL)
    assert settings.uri("users/u1/a.png") == "s3://workshop-artifacts/users/u1/a.png"
    assert settings.metadata_path.parent == settings.work_dir


def test_environment_then_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKSHOP_BUCKET", "from-env")
    monkeypatch.setenv("WORKSHOP_WORK_DIR", str(tmp_path))
    assert load_settings().bucket == "from-env"
    assert load_settings().store_root == tmp_path / "store"
    # a notebook parameter wins; None and "" mean "not given" in notebooks' parameters
    assert load_settings(bucket="from-notebook").bucket == "from-notebook"
    assert load_settings(bucket=None).bucket == "from-env"


def test_get_settings_is_cached_and_resettable(monkeypatch):
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("WORKSHOP_REGION", "eu-west-1")
    get_settings.cache_clear()
    assert get_settings().region == "eu-west-1"


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"backend": "azure"}, ["WORKSHOP_BACKEND", "'local' or 'sagemaker'"]),
        ({"bucket": "Not_A_Bucket"}, ["WORKSHOP_BUCKET", "lowercase"]),
        ({"region": "mars"}, ["WORKSHOP_REGION", "us-east-1"]),
        ({"api_port": 80}, ["WORKSHOP_API_PORT", "1024"]),
        (
            {"router_port": 8100},
            [
                "ports must all differ",
                "WORKSHOP_ROUTER_PORT and WORKSHOP_TRITON_HTTP_PORT are both 8100",
            ],
        ),
        (
            {"base_model": "/nowhere/model"},
            ["WORKSHOP_BASE_MODEL", "looked for /nowhere/model", "diffusers pipeline directory"],
        ),
    ],
)
def test_errors_name_the_setting_and_the_fix(overrides, names):
    with pytest.raises(SettingsError) as raised:
        load_settings(**overrides)
    for name in names:
        assert name in str(raised.value)


def test_environment_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("WORKSHOP_BACKEND", "gcp")
    with pytest.raises(SettingsError, match=r"WORKSHOP_BACKEND.*got 'gcp'"):
        load_settings()


def test_unknown_override_is_rejected():
    with pytest.raises(SettingsError, match=r"unknown setting.*'bukket'"):
        load_settings(bukket="x")


def test_hub_ids_only_with_sagemaker():
    with pytest.raises(SettingsError, match="sagemaker backend"):
        load_settings(base_model="stabilityai/stable-diffusion-2-1-base")
    settings = load_settings(
        backend="sagemaker", base_model="stabilityai/stable-diffusion-2-1-base"
    )
    assert settings.base_model.startswith("stabilityai/")


def test_an_s3_folder_base_model_only_with_sagemaker():
    """What the stack's `base_model` prop may name: the pipeline uploaded for the jobs."""
    folder = "s3://workshop-artifacts/base-models/tiny-sd-shapes-fe26d8a10bd5"
    with pytest.raises(SettingsError, match="s3:// folder works only with the sagemaker"):
        load_settings(base_model=folder)
    assert load_settings(backend="sagemaker", base_model=folder).base_model == f"{folder}/"
    with pytest.raises(SettingsError, match="WORKSHOP_BASE_MODEL"):
        load_settings(backend="sagemaker", base_model="s3://Bad_Bucket/x/")


def test_port_clash_names_every_clashing_setting():
    with pytest.raises(SettingsError) as raised:
        load_settings(api_port=8100, router_port=8100)
    message = str(raised.value)
    assert "WORKSHOP_API_PORT, WORKSHOP_ROUTER_PORT and WORKSHOP_TRITON_HTTP_PORT are all 8100" in (
        message
    )
    assert "WORKSHOP_TRITON_GRPC_PORT" not in message


def test_relative_base_model_is_found_from_the_notebooks_directory(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT / "notebooks")
    monkeypatch.setenv("WORKSHOP_BASE_MODEL", "assets/tiny-sd-shapes")
    assert load_settings().base_model == str(DEFAULT_BASE_MODEL)


def test_relative_base_model_in_the_current_directory_comes_first(monkeypatch, tmp_path):
    (tmp_path / "assets" / "tiny-sd-shapes").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(base_model="assets/tiny-sd-shapes")
    assert settings.base_model == str(tmp_path / "assets" / "tiny-sd-shapes")


def test_missing_relative_base_model_names_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as raised:
        load_settings(base_model="models/mine")
    message = str(raised.value)
    assert str(tmp_path / "models" / "mine") in message
    assert str(PROJECT_ROOT / "models" / "mine") in message
    assert "make base-model" not in message  # it would not build models/mine


def test_missing_default_base_model_says_how_to_build_it(monkeypatch, tmp_path):
    absent = tmp_path / "assets" / "tiny-sd-shapes"
    monkeypatch.setattr(settings_module, "DEFAULT_BASE_MODEL", absent)
    with pytest.raises(SettingsError, match=r"looked for .*tiny-sd-shapes.*make base-model"):
        load_settings(base_model=str(absent))
