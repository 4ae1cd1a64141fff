"""schemathesis, from the app's own OpenAPI spec, with a valid key: no request gets a 5xx, every
answer is documented (status, content type, body schema, headers), and every error is the
API's JSON `{"error": {...}}`.

The app runs over the real local store and SQLite (the endpoint and onboarding driver are
test_api's recorders). Its user has photos and an AVAILABLE model, so the success paths run
too. `DELETE /v1/users/me` and key rotation are left out: they end the key the fuzzing uses
(test_api and test_tenant_sweep cover them). The admin route gets the admin key.

The fast tests after it pin what schemathesis found, one by one.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_api import ADMIN_KEY, UNLIMITED, api_services, photo_files

from helpers.api import create_app
from helpers.api.postman import openapi_spec
from helpers.domain.records import ModelStatus

#: Examples per operation and generation mode: 2,190 requests in about 35 s on 2 cores.
MAX_EXAMPLES = 60
#: Answers seen, by status (printed at the end with `pytest -s`: the figures for the note).
SEEN: Counter[int] = Counter()
KEYS_SENT = [0]


@schemathesis.check
def errors_are_json(ctx, response, case) -> bool | None:
    """Every 4xx/5xx is `{"error": {"code", "message", ...}}` with a JSON content type."""
    SEEN[response.status_code] += 1
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith("application/json"):
        raise AssertionError(f"a {response.status_code} answered as {content_type!r}")
    body = response.json()
    if set(body) != {"error"} or not {"code", "message"} <= set(body["error"]):
        raise AssertionError(f"not the API's error shape: {response.text[:200]}")
    return True


@schemathesis.check
def accepts_schema_valid_data(ctx, response, case) -> bool | None:
    """schemathesis' `positive_data_acceptance`, less what a schema cannot state: that an
    uploaded file is a decodable photo of 64 px or more (random bytes are refused), and the
    bound on a generation's work, pixels x steps x images (422 `work_too_large`)."""
    if case.operation.path == "/v1/photos" and case.method == "POST":
        return None
    if response.status_code == 422 and response.json()["error"]["code"] == "work_too_large":
        return None
    return positive_data_acceptance(ctx, response, case)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # The spec is what this tests; test_quotas tests the limits.
    services = api_services(tmp_path_factory.mktemp("fuzz"), limits=UNLIMITED)
    metadata = services.metadata
    app = APP.app = create_app(services)
    with TestClient(app) as client:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        key = client.post("/v1/users", json={"user_id": "fuzz"}, headers=admin).json()["api_key"]
        user = {"Authorization": f"Bearer {key}"}
        assert client.post("/v1/photos", files=photo_files(), headers=user).status_code == 201
        assert client.post("/v1/models", json={}, headers=user).status_code == 202
    for status in (ModelStatus.TRAINING, ModelStatus.PACKAGING, ModelStatus.AVAILABLE):
        model = metadata.get_model("fuzz", "m1")
        metadata.update_model("fuzz", "m1", expected_version=model.version, status=status)
    yield app, user, admin
    print(f"\nschemathesis: {sum(SEEN.values())} requests, by status {dict(sorted(SEEN.items()))}")


class FixtureApp:
    """The `world` fixture's app, bound when the fixture starts: schemathesis needs an app
    when this module loads (to parametrize the test), the app a folder that pytest makes."""

    app = None

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


APP = FixtureApp()
#: The app's own spec (`app.openapi()`, the same whatever services are behind it).
_spec = schemathesis.openapi.from_dict(openapi_spec())
_spec.app = APP  # as `schemathesis.openapi.from_asgi` binds its app
#: Less the operations that would end the fuzzing key.
schema = _spec.exclude(method="DELETE", path="/v1/users/me").exclude(
    method="POST", path_regex=r"^/v1/users/me/keys"
)


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_answer_is_documented_json_and_no_5xx(case, world):
    _, user, admin = world
    headers = admin if case.operation.path == "/v1/users" else user
    if case.headers and "idempotency-key" in case.headers:
        # A client sends a new key with each new request (the same key with another body is
        # a documented 422); the counter keeps the generated key's shape and length bound.
        KEYS_SENT[0] += 1
        case.headers["idempotency-key"] = f"{KEYS_SENT[0]}-{case.headers['idempotency-key']}"[:128]
    case.call_and_validate(
        headers=headers,
        additional_checks=[errors_are_json, accepts_schema_valid_data],
        excluded_checks=[positive_data_acceptance],
    )


# ---------------------------------------------------------------------------- what it found


@pytest.fixture
def client(world):
    with TestClient(world[0]) as client:
        yield client


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("seed", False, "an integer"),
        ("seed", "5", "an integer"),
        ("seed", 5.5, "an integer"),
        ("guidance_scale", float("nan"), "a finite number"),
        ("guidance_scale", float("inf"), "a finite number"),
    ],
)
def test_numbers_are_taken_as_sent_and_refused_naming_what_is_allowed(
    client, world, field, value, allowed
):
    body = json.dumps({"prompt": "x", field: value})  # NaN and Infinity as Python writes them
    answer = client.post(
        "/v1/generations",
        content=body,
        headers={**world[1], "Content-Type": "application/json"},
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == field and error["allowed"].startswith(allowed), error
    assert "<=" not in error["message"]  # NaN used to be refused as "should be <= 20"


def test_whole_numbers_are_integers_as_json_schema_says(client, world):
    answer = client.post("/v1/generations", json={"prompt": "x", "seed": 7.0}, headers=world[1])
    assert answer.status_code == 200, answer.text


def test_a_route_whose_body_is_optional_takes_no_body(client, world):
    assert client.post("/v1/models", headers=world[1]).status_code == 202
    sent_text = client.post("/v1/models", content=b"x", headers=world[1])
    assert sent_text.status_code == 415 and sent_text.json()["error"]["field"] == "Content-Type"


def test_405_names_every_method_of_the_path(client, world):
    answer = client.put("/v1/users/me", headers=world[1])
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "DELETE, GET"
    assert answer.json()["error"]["allowed"] == "DELETE, GET"
    # The most specific path's methods, not also those of /v1/photos/{name} (DELETE)
    assert client.options("/v1/photos/uploads", headers=world[1]).headers["Allow"] == "GET"


def test_every_error_an_operation_can_answer_is_documented():
    spec = openapi_spec()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            documented = set(operation["responses"])
            assert {"413", "429"} <= documented, (method, path)
            if operation.get("security"):
                assert "401" in documented, (method, path)
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                assert {"400", "415", "422"} <= documented, (method, path)
    assert "403" in spec["paths"]["/v1/users"]["post"]["responses"]
    assert "404" in spec["paths"]["/v1/generations"]["post"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # ours is ErrorResponse
    files = spec["paths"]["/v1/photos"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert files["schema"]["properties"]["files"]["minItems"] == 1
