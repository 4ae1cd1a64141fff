"""The SaaS API's routes, auth, isolation and errors, over the real local store and SQLite.

The endpoint and the onboarding driver are recorders here (what they were asked is what these
tests check); `tests/test_api_local.py` runs the same API over real Triton and training jobs.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from unittest.mock import Mock

import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient
from PIL import Image

from helpers.api import ApiServices, create_app, schemas
from helpers.api.auth import (
    ADMIN_KEY_ENV,
    admin_key_path,
    hash_key,
    load_admin_key,
    mask_key,
    new_key,
)
from helpers.api.dependencies import get_services
from helpers.api.generation import GenerationError
from helpers.api.quotas import QuotaLimits
from helpers.domain.records import ModelStatus, utc_now
from helpers.infra.local.metadata import SqliteMetadataStore
from helpers.infra.local.store import LocalArtifactStore
from helpers.ports.onboarding import Onboarding
from helpers.services.packaging import load_model_code
from helpers.settings import load_settings
from helpers.workshop.demo_subjects import get_demo_subject, subject_images
from helpers.workshop.personalization import png_bytes

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"


class RecordingOnboarding(Onboarding):
    def __init__(self) -> None:
        self.started = []
        self.cancelled = []

    def start(self, model) -> None:
        self.started.append((model.user_id, model.model_id))

    def cancel(self, model) -> None:
        self.cancelled.append((model.user_id, model.model_id))


class RecordingGenerator:
    """Answers with solid-colour PNGs and records which endpoint model each call targeted."""

    def __init__(self) -> None:
        self.calls = []
        self.error: Exception | None = None

    def generate(self, endpoint_model_name, prompt, **parameters):
        self.calls.append((endpoint_model_name, prompt, parameters))
        if self.error is not None:
            raise self.error
        count = parameters.get("num_images", 1)
        return [png_bytes(Image.new("RGB", (64, 64), (i * 40, 0, 0))) for i in range(count)]


#: Limits no test reaches: for tests of something other than the quotas (test_quotas tests them).
UNLIMITED = QuotaLimits(**{f.name: 10**9 for f in dataclasses.fields(QuotaLimits)})


def api_services(tmp_path, **overrides) -> ApiServices:
    """The API's services over a real local store and SQLite, with recording stand-ins for
    onboarding and generation; `overrides` sets other `ApiServices` fields."""
    settings = load_settings(work_dir=tmp_path)
    store = LocalArtifactStore(settings.store_root)
    store.create_bucket(settings.bucket)
    metadata = SqliteMetadataStore(settings.metadata_path)
    metadata.create_table()
    return ApiServices(
        settings=settings,
        store=store,
        metadata=metadata,
        onboarding=RecordingOnboarding(),
        generator=RecordingGenerator(),
        admin_key_hash=hash_key(ADMIN_KEY),
        **overrides,
    )


@pytest.fixture
def services(tmp_path):
    return api_services(tmp_path)


@pytest.fixture
def client(services):
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        yield client


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def make_user(client, user_id: str) -> dict:
    answer = client.post("/v1/users", json={"user_id": user_id}, headers=bearer(ADMIN_KEY))
    assert answer.status_code == 201, answer.text
    return bearer(answer.json()["api_key"])


def photo_files(user_id: str = "demo-ada", count: int = 3) -> list:
    images = subject_images(get_demo_subject(user_id), count=count)
    return [
        ("files", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)
    ]


def onboard(client, user_id: str) -> dict:
    """A user with photos and one model (REQUESTED)."""
    headers = make_user(client, user_id)
    assert client.post("/v1/photos", files=photo_files(), headers=headers).status_code == 201
    assert client.post("/v1/models", json={}, headers=headers).status_code == 202
    return headers


def make_available(services, user_id: str, model_id: str = "m1") -> None:
    for status in (ModelStatus.TRAINING, ModelStatus.PACKAGING, ModelStatus.AVAILABLE):
        model = services.metadata.get_model(user_id, model_id)
        services.metadata.update_model(
            user_id, model_id, expected_version=model.version, status=status
        )


def error_of(answer) -> dict:
    body = answer.json()
    assert set(body) == {"error"}, body
    assert "Traceback" not in answer.text
    return body["error"]


# ---------------------------------------------------------------------------- users and keys


def test_health_needs_no_key_and_names_the_backend(client):
    answer = client.get("/health")
    assert answer.status_code == 200
    # no endpoint in these services: its state is not checked
    assert answer.json() == {"status": "ok", "backend": "local", "endpoint": None}


def test_only_the_admin_key_creates_users(client):
    body = {"user_id": "ada"}
    assert client.post("/v1/users", json=body).status_code == 401
    answer = client.post("/v1/users", json=body, headers=bearer("not-the-admin-key"))
    assert answer.status_code == 403
    assert error_of(answer)["field"] == "Authorization"
    assert client.post("/v1/users", json=body, headers=bearer(ADMIN_KEY)).status_code == 201
    again = client.post("/v1/users", json=body, headers=bearer(ADMIN_KEY))
    assert again.status_code == 409 and error_of(again)["code"] == "user_exists"


def test_the_key_is_shown_once_and_only_its_hash_is_stored(client, services):
    answer = client.post("/v1/users", json={"user_id": "ada"}, headers=bearer(ADMIN_KEY))
    key = answer.json()["api_key"]
    stored = services.metadata.get_user("ada").api_key_hash
    assert stored == hash_key(key) and key not in stored
    assert key.encode() not in services.settings.metadata_path.read_bytes()
    assert client.get("/v1/users/me", headers=bearer(key)).json()["user_id"] == "ada"


def test_every_route_but_health_refuses_missing_or_wrong_keys(client):
    wrong = bearer("ada." + "x" * 43)
    client.post("/v1/users", json={"user_id": "ada"}, headers=bearer(ADMIN_KEY))
    routes = [
        (method.upper(), path.replace("{model_id}", "m1"))
        for path, operations in client.app.openapi()["paths"].items()
        for method in operations
        if path != "/health"
    ]
    assert len(routes) >= 9
    for method, path in routes:
        for headers in ({}, wrong):
            answer = client.request(method, path, headers=headers)
            expected = 403 if path == "/v1/users" and headers else 401
            assert answer.status_code == expected, (method, path, headers)
            assert error_of(answer)["code"] in ("unauthorized", "forbidden")


# ---------------------------------------------------------------------------- photos


def test_photos_upload_validated_and_deduplicated(client, services):
    headers = make_user(client, "ada")
    answer = client.post("/v1/photos", files=photo_files(count=3), headers=headers)
    assert answer.status_code == 201 and answer.json()["count"] == 3
    again = client.post("/v1/photos", files=photo_files(count=4), headers=headers)
    assert again.json()["count"] == 4  # the same first three are kept once
    assert client.get("/v1/photos", headers=headers).json()["count"] == 4


def test_a_bad_photo_refuses_the_whole_upload_and_names_it(client, services):
    headers = make_user(client, "ada")
    files = [*photo_files(count=2), ("files", ("notes.png", b"not an image", "image/png"))]
    answer = client.post("/v1/photos", files=files, headers=headers)
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["code"] == "invalid_photos" and "notes.png" in error["field"]
    assert any(problem["file"] == "notes.png" for problem in error["problems"])
    assert client.get("/v1/photos", headers=headers).json()["count"] == 0  # nothing stored


def test_presigned_uploads_are_explained_on_the_local_backend(client):
    headers = make_user(client, "ada")
    answer = client.post("/v1/photos/upload-urls", json={"count": 2}, headers=headers)
    assert answer.status_code == 409  # a 4xx: nothing failed, the backend has no such thing
    assert "POST /v1/photos" in error_of(answer)["message"]


# ---------------------------------------------------------------------------- fine-tuning


def test_fine_tuning_needs_three_photos(client, services):
    headers = make_user(client, "ada")
    client.post("/v1/photos", files=photo_files(count=2), headers=headers)
    answer = client.post("/v1/models", json={}, headers=headers)
    assert answer.status_code == 409
    assert error_of(answer)["field"] == "photos"
    assert services.onboarding.started == []


def test_fine_tuning_starts_a_requested_model_on_a_snapshot_of_the_photos(client, services):
    headers = onboard(client, "ada")
    model = client.get("/v1/models/m1", headers=headers).json()
    assert model["status"] == "REQUESTED" and model["max_train_steps"] == 300
    assert services.onboarding.started == [("ada", "m1")]
    record = services.metadata.get_model("ada", "m1")
    assert len(services.store.list(record.instance_data_uri)) == 3
    assert record.endpoint_model_name == "ada--m1"


def test_an_idempotency_key_makes_a_retry_return_the_same_model(client, services):
    headers = make_user(client, "ada")
    client.post("/v1/photos", files=photo_files(), headers=headers)
    retry = {**headers, "Idempotency-Key": "order-17"}
    first = client.post("/v1/models", json={"max_train_steps": 50}, headers=retry)
    second = client.post("/v1/models", json={"max_train_steps": 50}, headers=retry)
    assert first.status_code == second.status_code == 202
    assert first.json()["model_id"] == second.json()["model_id"] == "m1"
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.headers["Location"] == "/v1/models/m1"
    reused = client.post("/v1/models", json={"max_train_steps": 60}, headers=retry)
    assert reused.status_code == 422
    assert error_of(reused)["code"] == "idempotency_key_reused"
    other = client.post("/v1/models", json={}, headers=headers)
    assert other.json()["model_id"] == "m2"  # model ids are never reused
    assert services.onboarding.started == [("ada", "m1"), ("ada", "m2")]


def test_a_model_whose_training_cannot_start_is_failed_not_left_requested(client, services):
    headers = make_user(client, "ada")
    client.post("/v1/photos", files=photo_files(), headers=headers)
    services.onboarding.start = lambda model: (_ for _ in ()).throw(RuntimeError("no queue"))
    retry = {**headers, "Idempotency-Key": "order-18"}
    answer = client.post("/v1/models", json={}, headers=retry)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "30"
    error = error_of(answer)
    assert error["code"] == "onboarding_unavailable" and "no queue" not in answer.text
    model = services.metadata.get_model("ada", "m1")
    assert model.status == ModelStatus.FAILED and "could not start" in model.failure_reason
    replayed = client.post("/v1/models", json={}, headers=retry)  # the same request: its model
    assert replayed.json()["status"] == "FAILED"
    assert replayed.headers["Idempotent-Replayed"] == "true"


def test_a_prompt_of_spaces_is_a_422_naming_the_prompt(client, services):
    headers = onboard(client, "ada")
    make_available(services, "ada")
    answer = client.post("/v1/generations", json={"prompt": "   "}, headers=headers)
    assert answer.status_code == 422
    assert error_of(answer)["field"] == "prompt" and services.generator.calls == []


def test_training_parameters_out_of_range_name_the_field_and_the_bounds(client):
    headers = make_user(client, "ada")
    answer = client.post("/v1/models", json={"max_train_steps": 10**6}, headers=headers)
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["field"] == "max_train_steps" and error["allowed"] == "<= 2000"


# ---------------------------------------------------------------------------- isolation


def test_a_user_never_sees_or_uses_another_users_model(client, services):
    ada = onboard(client, "ada")
    make_available(services, "ada")
    bo = make_user(client, "bo")
    assert client.get("/v1/models/m1", headers=bo).status_code == 404
    assert client.get("/v1/models", headers=bo).json() == {"models": []}
    assert client.get("/v1/photos", headers=bo).json()["count"] == 0
    answer = client.post("/v1/generations", json={"prompt": "x", "model_id": "m1"}, headers=bo)
    assert answer.status_code == 404
    answer = client.post("/v1/generations", json={"prompt": "x"}, headers=bo)
    assert answer.status_code == 409 and error_of(answer)["code"] == "no_available_model"
    assert services.generator.calls == []  # bo's requests never reached the endpoint
    assert client.post("/v1/generations", json={"prompt": "x"}, headers=ada).status_code == 200
    assert [call[0] for call in services.generator.calls] == ["ada--m1"]


def test_a_client_cannot_name_an_endpoint_model(client, services):
    ada = onboard(client, "ada")
    make_available(services, "ada")
    for extra in ({"target_model": "bo--m1.tar.gz"}, {"model_id": "../bo--m1"}):
        answer = client.post("/v1/generations", json={"prompt": "x", **extra}, headers=ada)
        assert answer.status_code in (404, 422), extra
    assert services.generator.calls == []


def test_deleting_a_user_removes_their_data_and_key_but_nobody_elses(client, services):
    ada = onboard(client, "ada")
    bo = onboard(client, "bo")
    assert client.delete("/v1/users/me", headers=ada).status_code == 204
    assert services.onboarding.cancelled == [("ada", "m1")]  # its training stops first
    assert client.get("/v1/users/me", headers=ada).status_code == 401
    assert services.store.list(services.settings.uri("users/ada/")) == []
    assert services.metadata.list_models("ada") == []
    assert client.get("/v1/models/m1", headers=bo).json()["status"] == "REQUESTED"
    assert client.get("/v1/photos", headers=bo).json()["count"] == 3


def test_the_admin_key_lives_in_a_file_only_its_owner_reads(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    key, where = load_admin_key(tmp_path / "work")
    path = admin_key_path(tmp_path / "work")
    assert where == str(path) and path.stat().st_mode & 0o777 == 0o600
    assert load_admin_key(tmp_path / "work") == (key, where)  # made once, then reused
    assert len(key) >= 43 and mask_key(key) == key[:4] + "…"
    with pytest.raises(FileNotFoundError, match=r"admin\.key"):
        load_admin_key(tmp_path / "elsewhere", create=False)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_admin_key(tmp_path / "work")
    monkeypatch.setenv(ADMIN_KEY_ENV, "from-the-environment")
    assert load_admin_key(tmp_path / "work") == ("from-the-environment", f"${ADMIN_KEY_ENV}")


def test_a_masked_user_key_shows_no_more_than_its_user_and_four_characters():
    key = new_key("ada")
    assert mask_key(key) == f"ada.{key[4:8]}…" and key[8:] not in mask_key(key)


def test_a_deleted_users_id_is_never_given_again(client, services):
    ada = onboard(client, "ada")
    assert client.delete("/v1/users/me", headers=ada).status_code == 204
    answer = client.post("/v1/users", json={"user_id": "ada"}, headers=bearer(ADMIN_KEY))
    assert answer.status_code == 409
    error = error_of(answer)
    assert error["code"] == "user_id_retired" and error["field"] == "user_id"
    assert "deleted account" in error["message"] and "choose another" in error["message"]
    assert services.metadata.get_user("ada") is None
    answer = client.post("/v1/users", json={"user_id": "bo"}, headers=bearer(ADMIN_KEY))
    assert answer.status_code == 201  # other ids stay free


def test_rotating_a_key_revokes_the_old_one_at_once(client, services):
    ada, bo = make_user(client, "ada"), make_user(client, "bo")
    answer = client.post("/v1/users/me/keys", headers=ada)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["user_id"] == "ada" and body["api_key"].startswith("ada.")
    new = bearer(body["api_key"])
    assert new != ada
    assert error_of(client.get("/v1/users/me", headers=ada))["code"] == "unauthorized"
    assert client.get("/v1/users/me", headers=new).json()["user_id"] == "ada"
    assert client.get("/v1/users/me", headers=bo).status_code == 200  # bo's key untouched
    assert client.post("/v1/users/me/keys", headers=ada).status_code == 401  # no second use
    assert services.metadata.get_user("ada").api_key_hash == hash_key(body["api_key"])


def test_an_account_being_deleted_can_only_finish_the_deletion(client, services):
    ada = onboard(client, "ada")
    user = services.metadata.get_user("ada")
    services.metadata.update_user("ada", expected_version=user.version, deleting_since=utc_now())
    for answer in (
        client.get("/v1/users/me", headers=ada),
        client.post("/v1/models", json={}, headers=ada),
        client.post("/v1/users/me/keys", headers=ada),
    ):
        assert answer.status_code == 409
        assert error_of(answer)["code"] == "account_being_deleted"
    assert client.delete("/v1/users/me", headers=ada).status_code == 204
    assert client.get("/v1/users/me", headers=ada).status_code == 401


# ---------------------------------------------------------------------------- generation


def test_dependency_overrides_replace_the_services_every_route_uses(client, services):
    """Routes, auth included, reach the services only through `get_services`, so a test can
    swap them all (here, the generator) without building another app."""
    headers = onboard(client, "ada")
    make_available(services, "ada")
    stand_in = RecordingGenerator()
    client.app.dependency_overrides[get_services] = lambda: dataclasses.replace(
        services, generator=stand_in
    )
    try:
        answer = client.post("/v1/generations", json={"prompt": "x"}, headers=headers)
    finally:
        client.app.dependency_overrides.clear()
    assert answer.status_code == 200, answer.text
    assert [call[0] for call in stand_in.calls] == ["ada--m1"]
    assert services.generator.calls == []  # the app's own generator was never asked


def test_generation_returns_a_png_of_the_latest_available_model(client, services):
    headers = onboard(client, "ada")
    client.post("/v1/models", json={}, headers=headers)  # m2 stays REQUESTED
    make_available(services, "ada", "m1")
    answer = client.post(
        "/v1/generations", json={"prompt": "a photo of sks toy", "seed": 3}, headers=headers
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["X-Model-Id"] == "m1"
    assert Image.open(io.BytesIO(answer.content)).size == (64, 64)
    name, prompt, parameters = services.generator.calls[0]
    assert (name, prompt) == ("ada--m1", "a photo of sks toy")
    assert parameters == {
        "negative_prompt": "",
        "num_inference_steps": 20,
        "seed": 3,
        "num_images": 1,
    }


def test_json_generation_returns_every_image_with_its_seed(client, services):
    headers = onboard(client, "ada")
    make_available(services, "ada")
    body = {"prompt": "x", "num_images": 3, "seed": 10, "response_format": "json"}
    answer = client.post("/v1/generations", json=body, headers=headers).json()
    assert [image["seed"] for image in answer["images"]] == [10, 11, 12]
    for image in answer["images"]:
        assert Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))).format == "PNG"


def test_a_model_not_available_yet_is_a_409_with_its_status(client, services):
    headers = onboard(client, "ada")
    answer = client.post("/v1/generations", json={"prompt": "x", "model_id": "m1"}, headers=headers)
    assert answer.status_code == 409
    assert "REQUESTED" in error_of(answer)["message"]


def test_a_model_still_loading_is_a_503_with_retry_after(client, services):
    headers = onboard(client, "ada")
    make_available(services, "ada")
    services.generator.error = GenerationError("still loading", "model_loading", retry_after=5)
    answer = client.post("/v1/generations", json={"prompt": "x"}, headers=headers)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert error_of(answer)["code"] == "model_loading"


@pytest.mark.parametrize(
    ("body", "field", "allowed"),
    [
        ({"prompt": "x" * 501}, "prompt", "length <= 500"),
        ({"prompt": ""}, "prompt", "length >= 1"),
        ({"prompt": "x", "num_images": 5}, "num_images", "<= 4"),
        ({"prompt": "x", "width": 100}, "width", "a multiple of 8"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", ">= 0.0"),
        (
            {"prompt": "x", "num_images": 2},
            "num_images",
            "1 with response_format 'png', 1-4 with 'json'",
        ),
        ({"prompt": "x", "steps": 5}, "steps", None),
    ],
)
def test_bad_generation_parameters_name_the_field_and_what_is_allowed(
    client, services, body, field, allowed
):
    headers = onboard(client, "ada")
    make_available(services, "ada")
    answer = client.post("/v1/generations", json=body, headers=headers)
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["field"] == field and error["allowed"] == allowed
    assert services.generator.calls == []


def test_malformed_wrong_type_and_oversized_bodies_are_clear_errors(client, services):
    headers = make_user(client, "ada")
    content = {**headers, "Content-Type": "application/json"}
    answer = client.post("/v1/generations", content=b'{"prompt": ', headers=content)
    assert answer.status_code == 400 and error_of(answer)["code"] == "malformed_json"
    answer = client.post("/v1/generations", content=b"prompt=x", headers=headers)
    assert answer.status_code == 415 and error_of(answer)["allowed"] == "application/json"
    huge = b'{"prompt": "' + b"x" * 100_000 + b'"}'
    answer = client.post("/v1/generations", content=huge, headers=content)
    assert answer.status_code == 413 and error_of(answer)["code"] == "body_too_large"


def test_an_unexpected_failure_is_a_500_without_a_traceback(client, services):
    headers = onboard(client, "ada")
    make_available(services, "ada")
    services.generator.error = RuntimeError("secret internal detail")
    answer = client.post("/v1/generations", json={"prompt": "x"}, headers=headers)
    assert answer.status_code == 500
    assert "secret internal detail" not in answer.text
    assert error_of(answer)["code"] == "internal_error"


def test_an_unexpected_failure_gives_a_reference_to_the_log_line(client, services, caplog):
    headers = onboard(client, "ada")
    make_available(services, "ada")
    services.generator.error = RuntimeError("secret internal detail")
    answer = client.post("/v1/generations", json={"prompt": "x"}, headers=headers)
    reference = re.search(r"\(ref ([0-9a-f]{12})\)", error_of(answer)["message"]).group(1)
    [logged] = [r for r in caplog.records if reference in r.getMessage()]
    assert "secret internal detail" in str(logged.exc_info[1])


def aws_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} detail"}}, "Query")


def test_a_busy_aws_service_is_a_503_to_retry_and_a_refusal_a_500(client, services, monkeypatch):
    headers = onboard(client, "ada")
    for code in ("ProvisionedThroughputExceededException", "ThrottlingException", "SlowDown"):
        monkeypatch.setattr(services.metadata, "list_models", Mock(side_effect=aws_error(code)))
        answer = client.get("/v1/models", headers=headers)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "2"
        assert error_of(answer)["code"] == "service_busy" and code not in answer.text
    # The API's role lacks a permission: no retry helps, and the client learns nothing of AWS.
    monkeypatch.setattr(
        services.metadata, "list_models", Mock(side_effect=aws_error("AccessDeniedException"))
    )
    answer = client.get("/v1/models", headers=headers)
    assert answer.status_code == 500 and error_of(answer)["code"] == "internal_error"
    assert "AccessDenied" not in answer.text and "Retry-After" not in answer.headers


def test_the_openapi_spec_documents_auth_and_examples(client):
    spec = client.app.openapi()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    schemas = spec["components"]["schemas"]
    assert schemas["GenerateRequest"]["examples"][0]["prompt"]
    assert schemas["GenerateRequest"]["properties"]["num_images"]["maximum"] == 4


def test_the_apis_generation_bounds_are_the_models():
    """What the API accepts, the Triton model accepts: a request never passes validation here
    only to fail on the endpoint."""
    inputs = load_model_code().INPUTS
    fields = schemas.GenerateRequest.model_json_schema()["properties"]

    def bounds(name):
        field = fields[name]
        options = field.get("anyOf", [field])
        number = next(o for o in options if o.get("type") in ("integer", "number", "string"))
        if number["type"] == "string":
            return number.get("minLength", 0), number["maxLength"]
        return number["minimum"], number["maximum"]

    for name, (_, _, low, high) in inputs.items():
        assert bounds(name) == (low, high), name


def test_oversized_photos_and_uploads_are_refused_before_anything_is_stored(client):
    headers = make_user(client, "ada")
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024)
    answer = client.post(
        "/v1/photos",
        files=[*photo_files(count=2), ("files", ("big.png", big, "image/png"))],
        headers=headers,
    )
    assert answer.status_code == 422
    assert error_of(answer)["field"] == "files[big.png].bytes"
    huge = [("files", (f"{i}.png", big, "image/png")) for i in range(6)]  # over 60 MiB in all
    answer = client.post("/v1/photos", files=huge, headers=headers)
    assert answer.status_code == 413 and error_of(answer)["code"] == "body_too_large"
    assert client.get("/v1/photos", headers=headers).json()["count"] == 0
