"""The whole local service, as a workshop user runs it: the API over real training jobs and the
real Triton endpoint. A user onboards through HTTP only, and generates with their own model."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from helpers.api.local import LocalApi
from helpers.domain.generation import invoke_model
from helpers.infra.local.triton_server import free_ports
from helpers.settings import load_settings
from helpers.workshop.demo_subjects import get_demo_subject, subject_images
from helpers.workshop.personalization import png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(tmp_path, tiny_pipeline_dir):
    api, router, http, grpc, metrics = free_ports(5)
    return load_settings(
        work_dir=tmp_path,
        base_model=str(tiny_pipeline_dir),
        api_port=api,
        router_port=router,
        triton_http_port=http,
        triton_grpc_port=grpc,
        triton_metrics_port=metrics,
    )


def wait_until_available(client, model_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        model = client.get(f"/v1/models/{model_id}").json()
        if model["status"] in ("AVAILABLE", "FAILED") or time.monotonic() > deadline:
            return model
        time.sleep(0.5)


def test_a_user_onboards_and_generates_through_the_api_and_a_restart_keeps_everything(settings):
    images = subject_images(get_demo_subject("demo-ada"), count=3)
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    with LocalApi(settings) as api:
        admin = api.client(api.admin_key)
        key = admin.post("/v1/users", json={"user_id": "ada"}).json()["api_key"]
        ada = api.client(key)
        assert ada.post("/v1/photos", files=files).status_code == 201
        started = ada.post("/v1/models", json={"max_train_steps": 10})
        assert started.status_code == 202
        model = wait_until_available(ada, started.json()["model_id"])
        assert model["status"] == "AVAILABLE", model
        answer = ada.post(
            "/v1/generations", json={"prompt": "a photo of sks toy", "num_inference_steps": 2}
        )
        assert answer.status_code == 200, answer.text
        first = Image.open(io.BytesIO(answer.content))
        assert first.format == "PNG" and first.size == (64, 64)
        endpoint = api.endpoint
    assert not endpoint.triton.is_running()

    with LocalApi(settings, admin_key=api.admin_key) as again:  # the same machine, restarted
        ada = again.client(key)
        assert again.resumed == 0
        assert ada.get("/v1/models/m1").json()["status"] == "AVAILABLE"
        answer = ada.post(
            "/v1/generations", json={"prompt": "a photo of sks toy", "num_inference_steps": 2}
        )
        assert answer.status_code == 200
        assert Image.open(io.BytesIO(answer.content)).tobytes() == first.tobytes()


def test_the_shared_base_mode_serves_each_user_their_own_adapter(settings):
    """Two users onboard through the API; the endpoint holds one shared model and swaps their
    adapters. Their pictures differ, and equal what each gets from their own per-user model."""
    generate = {"prompt": "a photo of sks toy", "num_inference_steps": 2, "seed": 5}
    pictures = {}
    with LocalApi(settings, serving_mode="shared-base") as api:
        admin = api.client(api.admin_key)
        clients = {}
        for user, subject in (("ada", "demo-ada"), ("bo", "demo-bo")):
            key = admin.post("/v1/users", json={"user_id": user}).json()["api_key"]
            clients[user] = api.client(key)
            images = subject_images(get_demo_subject(subject), count=3)
            files = [
                ("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)
            ]
            assert clients[user].post("/v1/photos", files=files).status_code == 201
            assert clients[user].post("/v1/models", json={"max_train_steps": 10}).status_code == 202
        for client in clients.values():
            assert wait_until_available(client, "m1")["status"] == "AVAILABLE"
        for user in ("ada", "bo", "ada"):  # interleaved: a swap each time
            answer = clients[user].post("/v1/generations", json=generate)
            assert answer.status_code == 200, answer.text
            pictures.setdefault(user, []).append(answer.content)
        assert list(api.endpoint.cache.loaded) == [api.serving.shared_model]
        runtime = api.endpoint.runtime_client()
        own = invoke_model(
            runtime,
            api.endpoint.name,
            "ada--m1.tar.gz",
            generate["prompt"],
            num_inference_steps=2,
            seed=5,
        )[0]
    first, again = (Image.open(io.BytesIO(png)) for png in pictures["ada"])
    assert first.tobytes() == again.tobytes()  # bo's adapter in between left no trace
    assert first.tobytes() != Image.open(io.BytesIO(pictures["bo"][0])).tobytes()
    pairs = zip(first.tobytes(), own.convert("RGB").tobytes(), strict=True)
    difference = max(abs(a - b) for a, b in pairs)
    assert difference <= 1  # the shared base with ada's adapter draws what her own model draws
