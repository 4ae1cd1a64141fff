"""Shared fixtures: a random-init tiny pipeline (built in about a second) for fast tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_training import train_lora


@pytest.fixture(scope="session")
def tiny_pipeline():
    from helpers.workshop.basemodel.architecture import make_pipeline

    return make_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tiny_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-pipeline")
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def lora_weights(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """Real LoRA weights: two steps of the training script on the random-init tiny base."""
    return train_lora(tiny_pipeline_dir, tmp_path_factory.mktemp("lora"), "demo-ada")


@pytest.fixture
def moto_server(monkeypatch):
    """A moto server on a free loopback port; boto3 in this process and in notebook kernels
    started from it talk to it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    from helpers.infra.local.triton_server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    # The server's backends are moto's, global to this process: the next test starts empty.
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()
